"""Settings: flags > BAMCOUNTD_* > TOML file > defaults, every bad value named."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bamcountd.errors import ConfigError
from bamcountd.service.config import load
from tests.support.daemon import REPO, Folders


def _file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bamcountd.toml"
    path.write_text(text)
    return path


def test_precedence_flags_env_file_default(folders: Folders, tmp_path: Path) -> None:
    config_file = _file(
        tmp_path,
        f'watch = ["{folders.watch}"]\nresults = "{folders.results}"\nstate = "{folders.state}"\n'
        'settle = 7\nmax_files = 3\nretries = 4\nformats = ["tsv"]\nexclude_flags = "DUP,SECONDARY"\n'
        'regions = ["chr1", "chr1:weird"]\n',
    )
    environ = {"BAMCOUNTD_MAX_FILES": "5", "BAMCOUNTD_RETRIES": "6", "BAMCOUNTD_MIN_MAPQ": "20"}
    config = load({"config": str(config_file), "retries": "8"}, environ=environ)
    assert config.retries == 8  # flag
    assert config.max_files == 5  # environment
    assert config.settle == 7.0 and config.formats == ("tsv",)  # file
    assert config.drain_seconds == 10.0 and config.count.jobs == 10  # defaults
    assert config.count.filters.min_mapq == 20 and config.count.filters.exclude_flags == 0x500
    assert config.count.regions == ("chr1", "chr1:weird")
    assert config.count.index_cache == folders.state / "index"
    assert config.watch == (folders.watch,)


def test_config_file_from_environment_and_state_from_systemd(folders: Folders, tmp_path: Path) -> None:
    config_file = _file(tmp_path, f'watch = ["{folders.watch}"]\nresults = "{folders.results}"\n')
    config = load({}, environ={"BAMCOUNTD_CONFIG": str(config_file), "STATE_DIRECTORY": str(folders.state)})
    assert config.state == folders.state and config.config_file == config_file


def test_the_example_config_is_valid(folders: Folders) -> None:
    example = REPO / "systemd" / "bamcountd.toml.example"
    flags = {"watch": [str(folders.watch)], "results": str(folders.results), "state": str(folders.state)}
    config = load({"config": str(example), **flags}, environ={})
    assert (config.settle, config.max_files, config.count.jobs, config.formats) == (5.0, 2, 10, ())


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("settle = -1\n", {}, "bamcountd.toml: settle: must be at least 0"),
        ('formats = ["xml"]\n', {}, "formats: unknown format 'xml'"),
        ('metrics_addr = "9464"\n', {}, "metrics_addr: must be HOST:PORT"),
        ("split = 3\n", {}, "split: must be true or false"),
        ("", {"BAMCOUNTD_JOBS": "many"}, "BAMCOUNTD_JOBS: invalid literal"),
        ("", {"BAMCOUNTD_EXCLUDE_FLAGS": "NOPE"}, "BAMCOUNTD_EXCLUDE_FLAGS: unknown flag name"),
        ("settle = [\n", {}, "not valid TOML"),
    ],
)
def test_bad_values_name_source_and_key(
    folders: Folders, tmp_path: Path, text: str, env: dict[str, str], message: str
) -> None:
    flags = {"watch": [str(folders.watch)], "results": str(folders.results), "state": str(folders.state)}
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load({"config": str(_file(tmp_path, text)), **flags}, environ=env)


def test_results_inside_a_watch_folder_is_refused(folders: Folders) -> None:
    with pytest.raises(ConfigError, match=r"results: .* is inside the watch folder"):
        load(
            {"watch": [str(folders.watch)], "results": str(folders.watch / "out"), "state": str(folders.state)},
            environ={},
        )


def test_count_command_imports_no_service_dependencies(shared_bam: Path, tmp_path: Path) -> None:
    bam = tmp_path / "x.bam"
    shutil.copyfile(shared_bam, bam)
    code = (
        "import sys\nfrom bamcountd.cli import main\n"
        f"assert main(['count', {str(bam)!r}, '--format', 'json', '-o', {str(tmp_path / 'x.json')!r}]) == 0\n"
        "heavy = {'watchfiles', 'prometheus_client', 'dxpy', 'sqlite3'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)


def test_missing_regions_file_and_samtools_fail_at_start(
    folders: Folders, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bamcountd.cli import main

    base = ["serve", "--watch", str(folders.watch), "--results", str(folders.results), "--state", str(folders.state)]
    assert main([*base, "--regions-file", str(tmp_path / "none.bed")]) == 2
    assert "regions_file: " in capsys.readouterr().err
    assert main([*base, "--samtools", str(tmp_path / "no-samtools")]) == 1
    assert "samtools not found at" in capsys.readouterr().err
