"""Logging set-up for the node's processes: text or JSON lines, libraries kept at WARNING.

The node never logs patient names, IDs or birth dates: log lines name studies by the last digits of
their StudyInstanceUID and senders by AE title and address. pynetdicom, which can dump whole data
sets at DEBUG, is held at WARNING whatever ``logging.level`` says.
"""

from __future__ import annotations

import json
import logging

from node.cli_runner import quiet_libraries
from node.config import LoggingSettings


class JsonFormatter(logging.Formatter):
    def __init__(self, role: str):
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
                 "level": record.levelname, "role": self.role, "pid": record.process, "logger": record.name,
                 "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(settings: LoggingSettings, role: str) -> None:
    handler = logging.StreamHandler()
    if settings.format == "json":
        handler.setFormatter(JsonFormatter(role))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {role} %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.level)
    quiet_libraries()
