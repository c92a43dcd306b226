"""The production unit: systemd itself checks it (where systemd-analyze exists)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from conftest import require_tool

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "petriage.service"


def _verify(path: Path) -> list[str]:
    proc = subprocess.run([require_tool("systemd-analyze"), "verify", str(path)], capture_output=True, text=True,
                          timeout=60)
    # the unit names the installed path /opt/petriage/.venv/bin/petriage, absent on a test machine
    return [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip() and "is not executable" not in ln]


def test_the_unit_passes_systemd_analyze_verify(tmp_path):
    assert _verify(UNIT) == []


def test_verify_would_catch_a_broken_directive(tmp_path):
    broken = tmp_path / "petriage.service"
    broken.write_text(UNIT.read_text().replace("Restart=on-failure", "Restart=on-failure\nRestartSecs=5"))
    assert any("RestartSecs" in line for line in _verify(broken))


def test_the_unit_runs_serve_as_a_dedicated_user_with_a_stop_timeout_longer_than_the_workers():
    text = UNIT.read_text()
    assert "User=petriage" in text and "ProtectSystem=strict" in text and "NoNewPrivileges=yes" in text
    stop = int(text.split("--stop-timeout ")[1].split()[0])
    assert int(text.split("TimeoutStopSec=")[1].split()[0]) > stop


def test_systemd_analyze_security_rates_the_unit_exposure_at_most_2():
    proc = subprocess.run([require_tool("systemd-analyze"), "security", "--offline=true", "--threshold=20",
                           str(UNIT)], capture_output=True, text=True, timeout=60)
    overall = [ln for ln in proc.stdout.splitlines() if "Overall exposure level" in ln]
    assert overall, proc.stdout + proc.stderr
    exposure = float(overall[0].split(":")[1].split()[0])  # 0 (sealed) .. 10 (exposed)
    print(f"\n{overall[0]}")
    assert proc.returncode == 0 and exposure <= 2.0
