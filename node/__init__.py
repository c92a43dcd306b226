"""petriage node: everything a hospital installs (DICOM in, triage, results out). Never imports torch."""
