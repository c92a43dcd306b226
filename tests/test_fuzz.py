"""The fuzz harness (benchmarks/fuzz.py) against the whole running node, with a few hundred objects.

The closing note's figures come from the same script with 10,000 objects; here it runs small enough
for the suite and must hold every property: understood statuses, nothing acknowledged altered, the
node answering throughout, no traceback, every job final with a named reason, none an internal
error, analyses per study bounded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_three_hundred_mutated_objects_leave_the_node_answering_and_every_study_with_a_named_outcome(tmp_path):
    out = tmp_path / "fuzz.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fuzz.py"), "--objects", "300", "--studies",
                           "3", "--seed", "1", "--json", str(out), "--timeout", "400"],
                          capture_output=True, text=True, timeout=580, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["objects"] == 300 and set(figures["mutations"]) == {"flip", "truncate", "insert", "huge-length",
                                                                        "duplicate-chunk"}
    assert figures["acknowledged"] > 0 and figures["acknowledged_but_altered"] == 0
    assert set(figures["statuses"]) <= {"0x0000", "0xC000", "0xA900", "0xA700"}
    assert figures["internal_errors"] == 0 and figures["tracebacks_logged"] == 0
    assert sum(figures["jobs"].values()) >= 3
    assert figures["studies_over_their_allowance"] == {}  # analyses per study within the completion rules
