"""Export of trained runs to ONNX and the model bundle the node loads."""


class ExportError(Exception):
    """Base of every error the export package raises deliberately."""
