"""petriage node: everything a hospital installs (DICOM in, triage, results out). Never imports torch."""

import pydicom.config

# The node checks every value it reads itself (node/screening.py) and names what is wrong by its
# attribute, never by its content. pydicom's own read validation would quote the raw value of any
# odd element (a patient's name among them) in a warning and a log line: switch it off.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
