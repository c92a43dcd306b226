"""Training of the two-stage PE model (Shi et al., MIDL 2020) with PyTorch.

Imports ``node.preprocess`` and ``node.phantom``; the node never imports this package.
"""


class TrainingError(Exception):
    """Base of every error the training package raises deliberately."""
