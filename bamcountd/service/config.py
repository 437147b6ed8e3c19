"""The daemon's settings, from flags, ``BAMCOUNTD_*`` environment variables and a TOML file.

Precedence: flags > environment > file > defaults.  Every key has the flag's name with ``_``
for ``-`` (``--max-files`` is ``max_files``, ``BAMCOUNTD_MAX_FILES``); ``--region`` is
``regions``.  A bad value anywhere is a :class:`ConfigError` naming where it came from and
the key, which the CLI turns into exit status 2 (and systemd's ``RestartPreventExitStatus=2``
into "do not restart a daemon that cannot work").
"""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bamcountd.count import DEFAULT_MIN_SHARD_READS
from bamcountd.errors import ConfigError
from bamcountd.samtools import combine_flags

ENV_PREFIX = "BAMCOUNTD_"
#: Extra result formats, written next to the JSON, and their suffixes.
EXTRA_FORMATS = {"tsv": ".counts.tsv", "seed": ".counts.txt"}

Converter = Callable[[Any], Any]


def _path(value: Any) -> Path:
    if not isinstance(value, str | Path) or not str(value):
        raise ValueError("must be a path")
    return Path(os.path.abspath(os.path.expanduser(value)))


def _paths(value: Any) -> tuple[Path, ...]:
    if isinstance(value, str):
        value = [part for part in value.split(os.pathsep) if part]
    if not isinstance(value, list | tuple) or not value:
        raise ValueError("must be a list of folders")
    return tuple(_path(item) for item in value)


def _strings(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, list | tuple) or not all(isinstance(item, str) for item in value):
        raise ValueError("must be a list of strings")
    return tuple(value)


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("must be a non-empty string")
    return value


def _regions(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):  # one region: names may contain ',' and ':'
        value = tomllib.loads(f"v = {value}")["v"] if value.startswith("[") else [value]
    return _strings(value)


def _number(value: Any, *, integer: bool, minimum: float, inclusive: bool = True) -> Any:
    if isinstance(value, bool):
        raise ValueError("must be a number")
    if isinstance(value, str):
        value = value.strip()
        value = int(value) if integer else float(value)
    if integer and not isinstance(value, int):
        raise ValueError("must be a whole number")
    if not isinstance(value, int | float):
        raise ValueError("must be a number")
    if value < minimum or (not inclusive and value == minimum):
        raise ValueError(f"must be {'at least' if inclusive else 'more than'} {minimum:g}, not {value}")
    return value


def _positive_int(value: Any) -> int:
    return int(_number(value, integer=True, minimum=1))


def _non_negative_int(value: Any) -> int:
    return int(_number(value, integer=True, minimum=0))


def _seconds(value: Any) -> float:
    return float(_number(value, integer=False, minimum=0))


def _positive_seconds(value: Any) -> float:
    return float(_number(value, integer=False, minimum=0, inclusive=False))


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return value.strip().lower() in ("1", "true", "yes", "on")
    raise ValueError("must be true or false")


def _flag_value(value: Any) -> int:
    # A list (TOML) or several values in one string ("0x4 0x10") are ORed, as samtools ORs a
    # repeated -F; a repeated flag on the command line arrives here already ORed.
    return combine_flags(value)


def _choice(*choices: str) -> Converter:
    def convert(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, not {value!r}")
        return str(value)

    return convert


def _formats(value: Any) -> tuple[str, ...]:
    formats = _strings(value)
    unknown = [fmt for fmt in formats if fmt not in EXTRA_FORMATS]
    if unknown:
        raise ValueError(f"unknown format {unknown[0]!r} (extra formats: {', '.join(EXTRA_FORMATS)})")
    return formats


def _address(value: Any) -> tuple[str, int]:
    if not isinstance(value, str) or ":" not in value:
        raise ValueError("must be HOST:PORT, such as 127.0.0.1:9464")
    host, _, port = value.rpartition(":")
    number = int(port)
    if not 0 <= number <= 65535 or not host:
        raise ValueError(f"must be HOST:PORT with a port 0..65535, not {value!r}")
    return host.strip("[]"), number


@dataclass(frozen=True)
class Option:
    key: str
    convert: Converter
    default: Any
    help: str = ""


#: Every setting: TOML key, converter, default.  Count options keep the core's defaults.
OPTIONS: tuple[Option, ...] = (
    Option("watch", _paths, None, "folders to watch for BAMs"),
    Option("results", _path, None, "folder for result files"),
    Option("state", _path, None, "folder for the ledger and built indexes"),
    Option("settle", _seconds, 5.0, "seconds a file's size and mtime must stay unchanged"),
    Option("rescan_interval", _positive_seconds, 60.0, "seconds between full rescans"),
    Option("max_files", _positive_int, 2, "BAMs counted at once"),
    Option("retries", _positive_int, 3, "attempts before a BAM gets an error file"),
    Option("retry_delay", _seconds, 30.0, "seconds before the first retry (doubles each time)"),
    Option("drain_seconds", _seconds, 10.0, "on stop, seconds running counts may take to finish"),
    Option("formats", _formats, (), "extra result formats (tsv, seed)"),
    Option("metrics_addr", _address, None, "HOST:PORT for /metrics and /healthz"),
    # The counting options (bamcountd count's), applied to every BAM.
    Option("regions", _regions, ()),
    Option("regions_file", _path, None),
    Option("require_flags", _flag_value, 0),
    Option("exclude_flags", _flag_value, 0),
    Option("exclude_all_flags", _flag_value, 0),
    Option("min_mapq", _non_negative_int, 0),
    Option("jobs", _positive_int, 10),
    Option("threads", _positive_int, None),
    Option("timeout", _positive_seconds, None),
    Option("method", _choice("view", "index"), "view"),
    Option("verify", _choice("auto", "full"), "auto"),
    Option("split", _boolean, True),
    Option("min_shard_reads", _positive_int, DEFAULT_MIN_SHARD_READS),
    Option("build_index", _boolean, True),
    Option("index_cache", _path, None),
    Option("samtools", _text, None),
)
_BY_KEY = {option.key: option for option in OPTIONS}
#: argparse dest -> config key, where they differ.
FLAG_KEYS = {"region": "regions"}


@dataclass(frozen=True, kw_only=True)
class ServiceConfig:
    watch: tuple[Path, ...]
    results: Path
    state: Path
    settle: float
    rescan_interval: float
    max_files: int
    retries: int
    retry_delay: float
    drain_seconds: float
    formats: tuple[str, ...]
    metrics_addr: tuple[str, int] | None
    config_file: Path | None
    count: argparse.Namespace = field(compare=False)  # for bamcountd.cli.request_from_args


def load(flags: Mapping[str, Any], *, environ: Mapping[str, str] | None = None) -> ServiceConfig:
    """Merge flags (None = not given), ``BAMCOUNTD_*`` and the TOML file into one config."""
    environ = os.environ if environ is None else environ
    config_file = flags.get("config") or environ.get(ENV_PREFIX + "CONFIG")
    file_values = _read_file(Path(config_file)) if config_file else {}
    values: dict[str, Any] = {}
    for option in OPTIONS:
        flag = flags.get(_flag_dest(option.key))
        env_name = ENV_PREFIX + option.key.upper()
        if flag is not None and flag not in ([], ()):
            values[option.key] = _convert(option, flag, f"--{_flag_dest(option.key).replace('_', '-')}")
        elif environ.get(env_name):
            values[option.key] = _convert(option, environ[env_name], env_name)
        elif option.key in file_values:
            values[option.key] = _convert(option, file_values[option.key], f"{config_file}: {option.key}")
        else:
            values[option.key] = option.default
    if values["state"] is None and environ.get("STATE_DIRECTORY"):  # systemd's StateDirectory=
        values["state"] = _path(environ["STATE_DIRECTORY"].split(":")[0])
    for key in ("watch", "results", "state"):
        if values[key] is None:
            hint = " (or run under systemd with StateDirectory=)" if key == "state" else ""
            raise ConfigError(
                f"{key}: not set; give --{key}, {ENV_PREFIX}{key.upper()} or `{key} =` in the config file{hint}"
            )
    _check_folders(values)
    count = argparse.Namespace(
        region=list(values["regions"]),
        index=None,
        index_cache=values["index_cache"] or values["state"] / "index",
        **{key: values[key] for key in _COUNT_KEYS},
    )
    return ServiceConfig(
        watch=values["watch"],
        results=values["results"],
        state=values["state"],
        settle=values["settle"],
        rescan_interval=values["rescan_interval"],
        max_files=values["max_files"],
        retries=values["retries"],
        retry_delay=values["retry_delay"],
        drain_seconds=values["drain_seconds"],
        formats=values["formats"],
        metrics_addr=values["metrics_addr"],
        config_file=Path(config_file) if config_file else None,
        count=count,
    )


_COUNT_KEYS = (
    "regions_file",
    "require_flags",
    "exclude_flags",
    "exclude_all_flags",
    "min_mapq",
    "jobs",
    "threads",
    "timeout",
    "method",
    "verify",
    "split",
    "min_shard_reads",
    "build_index",
    "samtools",
)


def _flag_dest(key: str) -> str:
    return next((dest for dest, mapped in FLAG_KEYS.items() if mapped == key), key)


def _convert(option: Option, value: Any, where: str) -> Any:
    try:
        return option.convert(value)
    except (ValueError, TypeError, tomllib.TOMLDecodeError) as error:
        raise ConfigError(f"{where}: {error}") from None


def _read_file(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the config file ({error.strerror})") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML ({error})") from None
    unknown = sorted(set(data) - set(_BY_KEY))
    if unknown:
        raise ConfigError(f"{path}: {unknown[0]}: unknown key (known: {', '.join(_BY_KEY)})")
    return data


def _check_folders(values: dict[str, Any]) -> None:
    regions_file = values["regions_file"]
    if regions_file is not None and not os.access(regions_file, os.R_OK):
        # Checked here: per BAM it would turn every BAM into an error file.
        raise ConfigError(f"regions_file: {regions_file} is missing or not readable")
    for watch in values["watch"]:
        if not watch.is_dir():
            raise ConfigError(f"watch: {watch} is not a folder")
    results, state = values["results"], values["state"]
    for key, folder in (("results", results), ("state", state)):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError(f"{key}: cannot create {folder} ({error.strerror})") from None
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ConfigError(f"{key}: {folder} is not writable")
    real = [Path(os.path.realpath(w)) for w in values["watch"]]
    for watch in real:
        for key, folder in (("results", results), ("state", state)):
            inside = Path(os.path.realpath(folder))
            if inside == watch or watch in inside.parents:
                raise ConfigError(f"{key}: {folder} is inside the watch folder {watch}; keep them apart")
    if len(real) > 1 and len({w.name for w in real}) != len(real):
        raise ConfigError("watch: with several watch folders their names must differ (results go to RESULTS/<name>/)")
