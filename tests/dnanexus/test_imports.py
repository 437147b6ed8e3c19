"""The counting core and ``bamcountd count`` never import dxpy (nor the service's libraries),
and the count's own process never imports numpy (only a sweep's reader process does: the
applet, which never sweeps, ships without it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.bams import samtools_count


def test_count_command_does_not_import_dxpy(shared_bam: Path, tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from bamcountd.cli import main\n"
        f"status = main(['count', {str(shared_bam)!r}, '--format', 'tsv', '--index-cache', {str(tmp_path)!r}])\n"
        "heavy = sorted(m for m in ('dxpy', 'watchfiles', 'prometheus_client', 'numpy') if m in sys.modules)\n"
        "print('HEAVY', heavy, file=sys.stderr)\n"
        "sys.exit(status)\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert completed.returncode == 0, completed.stderr
    assert "HEAVY []" in completed.stderr
    assert completed.stdout.splitlines()[-1] == f"total\t{samtools_count(shared_bam)}"


@pytest.mark.parametrize("module", ["count", "plan", "samtools", "report", "inputs"])
def test_core_modules_do_not_import_dxpy(module: str) -> None:
    heavy = "'dxpy' in sys.modules or 'bamcountd.dnanexus' in sys.modules or 'numpy' in sys.modules"
    code = f"import sys, bamcountd.{module}; sys.exit({heavy})"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
