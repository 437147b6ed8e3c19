from __future__ import annotations

from pathlib import Path

import pytest

from bamcountd.synth import tricky_bam


@pytest.fixture(scope="session")
def shared_bam(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tricky BAM made once per session; tests must not modify it (copy it first)."""
    return tricky_bam(tmp_path_factory.mktemp("shared"))


@pytest.fixture(scope="session", autouse=True)
def _children_waited_for_as_the_cli_does() -> None:
    # cli.main() has asyncio wait for samtools through pidfds from its first count on: every
    # test's count waits so, not only those that run after a test that called it.
    from bamcountd.samtools import wait_through_pidfds

    wait_through_pidfds()


@pytest.fixture(autouse=True)
def _private_index_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Built indexes go to a per-test cache, never to the developer's ~/.cache.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


@pytest.fixture(autouse=True)
def _quiet_logs() -> None:
    # Each test starts with warnings only, on the stderr of its own time: cli.main() points
    # structlog at the (captured, later closed) stderr of the test that called it.
    from bamcountd import logs

    logs.configure(level="warning", json=False)
