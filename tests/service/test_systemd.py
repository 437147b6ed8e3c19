"""The shipped units pass ``systemd-analyze verify`` (no warnings) and score at most 2.0 in
``systemd-analyze security --offline=true``; they say what the issue asks of them."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "systemd"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze") or "systemd-analyze"  # scripts/setup installs it


def _installed_copy(unit: str, instance: str, folder: Path) -> Path:
    """The unit with ExecStart= pointing at this checkout's bamcountd (verify checks it exists)."""
    executable = Path(sys.executable).with_name("bamcountd")
    text = (UNITS / unit).read_text().replace("/opt/bamcountd/venv/bin/bamcountd", str(executable))
    target = folder / instance
    target.write_text(text)
    return target


@pytest.mark.parametrize(
    ("unit", "instance"), [("bamcountd.service", "bamcountd.service"), ("bamcountd@.service", "bamcountd@demo.service")]
)
def test_unit_verifies_and_scores_at_most_2(unit: str, instance: str, tmp_path: Path) -> None:
    path = _installed_copy(unit, instance, tmp_path)
    verify = subprocess.run([SYSTEMD_ANALYZE, "verify", str(path)], capture_output=True, text=True, check=False)
    assert verify.returncode == 0 and verify.stderr == "" and verify.stdout == "", verify.stderr + verify.stdout
    security = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=true", "--no-pager", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", security.stdout)
    assert match is not None, security.stdout + security.stderr
    assert float(match.group(1)) <= 2.0, security.stdout


def test_unit_has_the_required_settings() -> None:
    settings: dict[str, list[str]] = {}
    for line in (UNITS / "bamcountd.service").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    assert settings["Type"] == ["notify"]
    assert settings["Restart"] == ["on-failure"]
    assert settings["RestartPreventExitStatus"] == ["2"]
    assert settings["KillMode"] == ["mixed"]
    assert settings["StateDirectory"] == ["bamcountd"]
    assert settings["ProtectSystem"] == ["strict"]
    assert settings["CapabilityBoundingSet"] == [""]
    assert settings["NoNewPrivileges"] == settings["PrivateTmp"] == settings["ProtectHome"] == ["yes"]
    assert "@system-service" in settings["SystemCallFilter"]
    for key in ("TimeoutStopSec", "WatchdogSec", "ReadWritePaths", "ReadOnlyPaths", "RestrictAddressFamilies"):
        assert settings[key] and settings[key][0], key
    assert "serve --config /etc/bamcountd/bamcountd.toml" in settings["ExecStart"][0]
