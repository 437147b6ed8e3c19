from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from bamcountd.synth import tricky_bam
from tests.support.daemon import Daemons, Folders


@pytest.fixture(scope="session")
def templates(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three small BAMs with different contents (tests copy them; never modify these)."""
    folder = tmp_path_factory.mktemp("templates")
    return [
        tricky_bam(folder, reads=400 + 150 * seed, unplaced=20 * seed, seed=seed, name=f"t{seed}.bam")
        for seed in (1, 2, 3)
    ]


@pytest.fixture
def folders(tmp_path: Path) -> Folders:
    return Folders.under(tmp_path)


@pytest.fixture
def daemons(folders: Folders) -> Iterator[Daemons]:
    """``daemons.start(extra, env)`` runs ``bamcountd serve`` on the test's folders; any still
    running at the end are killed with their children."""
    started = Daemons(folders)
    yield started
    started.close()


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    # bamcountd.cli.main configures structlog onto the (captured) stderr/stdout of the test that
    # calls it; later tests must not log to that closed stream.
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)
