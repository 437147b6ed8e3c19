"""Result files stay inside the results folder, whatever is planted there."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bamcountd.service.results import OutsideResults, result_base, sweep_temporaries, write_error
from bamcountd.service.watch import WatchRoot


def test_a_symlinked_results_subfolder_is_refused(tmp_path: Path) -> None:
    results, outside, watch = tmp_path / "results", tmp_path / "outside", tmp_path / "watch"
    for folder in (results, outside, watch / "run"):
        folder.mkdir(parents=True)
    os.symlink(outside, results / "run")  # planted: results/run -> outside
    base = result_base(results, WatchRoot(watch, ""), watch / "run" / "a.bam")
    assert base == results / "run" / "a"
    with pytest.raises(OutsideResults, match="symlink"):
        write_error(base, results, {"error": "x"})
    assert list(outside.iterdir()) == []


def test_several_roots_get_their_own_subfolder(tmp_path: Path) -> None:
    root = WatchRoot(tmp_path / "lab-a", "lab-a")
    assert (
        result_base(tmp_path / "r", root, tmp_path / "lab-a" / "x" / "s.1.bam")
        == tmp_path / "r" / "lab-a" / "x" / "s.1"
    )


def test_sweep_removes_only_our_temporaries(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    ours = [tmp_path / ".a.counts.json.x1.tmp", tmp_path / "sub" / ".b c.error.json.Zz_9.tmp"]
    theirs = [tmp_path / ".notes.tmp", tmp_path / "a.counts.json", tmp_path / ".a.counts.json"]
    for path in ours + theirs:
        path.write_text("x")
    assert sweep_temporaries(tmp_path) == 2
    assert [p.exists() for p in ours + theirs] == [False, False, True, True, True]
