"""Commands of the `petriage` CLI, one module each."""
