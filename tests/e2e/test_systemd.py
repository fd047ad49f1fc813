"""The unit files are valid for systemd (`systemd-analyze verify`) and start what we ship."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests import REPO_ROOT
from tests.integration import require

ROOT = REPO_ROOT
UNITS = sorted((ROOT / "systemd").glob("*.service"))


def test_units_exist() -> None:
    assert {unit.name for unit in UNITS} == {"studio-controller.service", "studio-agent.service"}


@pytest.mark.parametrize("unit", UNITS, ids=lambda unit: unit.name)
def test_unit_runs_our_console_script(unit: Path) -> None:
    exec_start = next(
        line for line in unit.read_text().splitlines() if line.startswith("ExecStart=")
    )
    script = unit.stem  # studio-controller / studio-agent
    assert exec_start.startswith(f"ExecStart=/usr/local/bin/{script} serve ")
    assert "Restart=on-failure" in unit.read_text()


@pytest.mark.parametrize("unit", UNITS, ids=lambda unit: unit.name)
def test_systemd_analyze_verify(unit: Path, tmp_path: Path) -> None:
    require(shutil.which("systemd-analyze") is not None, "systemd-analyze is not installed")
    # verify checks that ExecStart's binary exists; point it at the installed script.
    script = shutil.which(unit.stem)
    require(script is not None, f"{unit.stem} is not installed on PATH (pip install -e .)")
    assert script is not None
    copy = tmp_path / unit.name
    copy.write_text(unit.read_text().replace(f"/usr/local/bin/{unit.stem}", script))
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(copy)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
