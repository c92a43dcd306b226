"""The production unit: systemd itself checks it (where systemd-analyze exists)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from conftest import require_tool

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "petriage.service"
WEB_UNIT = UNIT.with_name("petriage-web.service")


def _verify(path: Path) -> list[str]:
    proc = subprocess.run([require_tool("systemd-analyze"), "verify", str(path)], capture_output=True, text=True,
                          timeout=60)
    # the unit names the installed path /opt/petriage/.venv/bin/petriage, absent on a test machine
    return [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip() and "is not executable" not in ln]


def test_the_units_pass_systemd_analyze_verify(tmp_path):
    assert _verify(UNIT) == []
    assert _verify(WEB_UNIT) == []


def test_the_console_unit_runs_petriage_web_as_the_nodes_user():
    text = WEB_UNIT.read_text()
    assert "ExecStart=/opt/petriage/.venv/bin/petriage web" in text and "User=petriage" in text
    assert "StateDirectory=petriage" in text  # the node's storage: spool, outbox and store


def test_verify_would_catch_a_broken_directive(tmp_path):
    broken = tmp_path / "petriage.service"
    broken.write_text(UNIT.read_text().replace("Restart=on-failure", "Restart=on-failure\nRestartSecs=5"))
    assert any("RestartSecs" in line for line in _verify(broken))


def test_the_unit_runs_serve_as_a_dedicated_user_with_a_stop_timeout_longer_than_the_workers():
    text = UNIT.read_text()
    assert "User=petriage" in text and "ProtectSystem=strict" in text and "NoNewPrivileges=yes" in text
    stop = int(text.split("--stop-timeout ")[1].split()[0])
    assert int(text.split("TimeoutStopSec=")[1].split()[0]) > stop


def test_systemd_analyze_security_rates_each_units_exposure_at_most_2():
    for unit in (UNIT, WEB_UNIT):
        proc = subprocess.run([require_tool("systemd-analyze"), "security", "--offline=true", "--threshold=20",
                               str(unit)], capture_output=True, text=True, timeout=60)
        overall = [ln for ln in proc.stdout.splitlines() if "Overall exposure level" in ln]
        assert overall, proc.stdout + proc.stderr
        exposure = float(overall[0].split(":")[1].split()[0])  # 0 (sealed) .. 10 (exposed)
        print(f"\n{unit.name}: {overall[0]}")
        assert proc.returncode == 0 and exposure <= 2.0
