"""A JSON webhook for chat or paging systems: what was found, where, how sure; no patient identity.

The body names the study by StudyInstanceUID and AccessionNumber (what a radiologist types into the
PACS to open it) and never carries patient names, IDs or birth dates: chat systems are not where
those belong. Any 2xx answer is delivered; 4xx other than 408/429 is a permanent error (retrying
sends the same body to the same refusal); anything else is retried.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pydicom

from node.errors import NodeError
from node.inference import NOTICE


class WebhookError(NodeError):
    def __init__(self, message: str, permanent: bool = False):
        super().__init__(message)
        self.permanent = permanent


def build_payload(source: pydicom.Dataset, summary: dict, priority: int) -> str:
    body = {
        "event": "pe-triage-result",
        "decision": summary["decision"], "positive": bool(summary["positive"]),
        "probability": round(float(summary["probability"]), 4), "threshold": summary["threshold"],
        "priority": priority,
        "study_instance_uid": summary["study_instance_uid"],
        "accession_number": str(getattr(source, "AccessionNumber", "") or ""),
        "study_description": str(getattr(source, "StudyDescription", "") or ""),
        "model": f"{summary['model'].get('name')} {summary['model'].get('version')}",
        "notice": NOTICE,
        "text": f"{summary['decision']} (p = {summary['probability']:.2f}) in accession "
                f"{getattr(source, 'AccessionNumber', '') or '?'} - {NOTICE}",
    }
    return json.dumps(body)


def post(url: str, payload: str, timeout_seconds: float) -> int:
    """POST the JSON; returns the HTTP status, WebhookError unless 2xx."""
    request = urllib.request.Request(url, data=payload.encode(), method="POST",  # noqa: S310 - http(s) by config
                                     headers={"Content-Type": "application/json", "User-Agent": "petriage"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_seconds) as response:  # noqa: S310
            return int(response.status)
    except urllib.error.HTTPError as exc:
        permanent = 400 <= exc.code < 500 and exc.code not in (408, 429)
        raise WebhookError(f"webhook answered HTTP {exc.code} {exc.reason}", permanent=permanent) from exc
    except (urllib.error.URLError, OSError) as exc:
        raise WebhookError(f"webhook unreachable: {getattr(exc, 'reason', exc)}") from exc
