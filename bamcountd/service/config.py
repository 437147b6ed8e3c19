"""The daemon's settings, from flags, ``BAMCOUNTD_*`` environment variables and a TOML file.

Precedence: flags > environment > file > defaults.  Every key has the flag's name with ``_``
for ``-`` (``--max-files`` is ``max_files``, ``BAMCOUNTD_MAX_FILES``); ``--region`` is
``regions``.  A bad value anywhere is a :class:`ConfigError` naming where it came from and
the key, which the CLI turns into exit status 2 (and systemd's ``RestartPreventExitStatus=2``
into "do not restart a daemon that cannot work").
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bamcountd.errors import ConfigError
from bamcountd.options import (
    APPEND,
    OPTIONS,
    CountOptions,
    Option,
    OptionValueError,
    convert,
    from_values,
    path,
    positive_int,
    positive_seconds,
    seconds,
    strings,
)

ENV_PREFIX = "BAMCOUNTD_"
#: Extra result formats, written next to the JSON, and their suffixes.
EXTRA_FORMATS = {"tsv": ".counts.tsv", "seed": ".counts.txt"}


def _paths(value: Any) -> tuple[Path, ...]:
    if isinstance(value, str):
        value = [part for part in value.split(os.pathsep) if part]
    if not isinstance(value, list | tuple) or not value:
        raise ValueError("must be a list of folders")
    return tuple(path(item) for item in value)


def _formats(value: Any) -> tuple[str, ...]:
    formats = strings(value)
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


def _service(name: str, default: Any, convert: Any, help: str, **more: Any) -> Option:
    flag = "--" + name.replace("_", "-")
    return Option(name=name, default=default, convert=convert, flags=(flag,), help=help, group="service", **more)


#: Where the settings file is (a flag and BAMCOUNTD_CONFIG only, not a key of the file).
CONFIG_FILE = _service("config", None, path, "TOML file (default: $BAMCOUNTD_CONFIG if set)", metavar="FILE")
#: The daemon's own settings; the count options (bamcountd.options) follow them.
SERVICE_OPTIONS: tuple[Option, ...] = (
    _service("watch", None, _paths, "folder to watch, recursively; repeat for more", metavar="DIR", kind=APPEND),
    _service("results", None, path, "folder for the result files", metavar="DIR"),
    _service("state", None, path, "folder for the ledger and built indexes (default: $STATE_DIRECTORY)", metavar="DIR"),
    _service(
        "settle", 5.0, seconds, "a file is ready once its size and mtime stay unchanged this long", metavar="SECONDS"
    ),
    _service("rescan_interval", 60.0, positive_seconds, "seconds between full rescans", metavar="SECONDS"),
    _service("max_files", 2, positive_int, "BAMs counted at once", metavar="N"),
    _service("retries", 3, positive_int, "attempts before a BAM gets an error file", metavar="N"),
    _service("retry_delay", 30.0, seconds, "seconds before the first retry, doubled each time", metavar="SECONDS"),
    _service("drain_seconds", 10.0, seconds, "on SIGTERM, seconds running counts get to finish", metavar="SECONDS"),
    _service("formats", (), _formats, "extra result formats, comma-separated: tsv, seed", metavar="LIST"),
    _service("metrics_addr", None, _address, "serve /metrics and /healthz there", metavar="HOST:PORT"),
)
#: Every key of the file and of the environment.
KEYS: dict[str, Option] = {row.name: row for row in (*SERVICE_OPTIONS, *OPTIONS) if row.per_input is None}


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
    count: CountOptions


def load(flags: Mapping[str, Any], *, environ: Mapping[str, str] | None = None) -> ServiceConfig:
    """Merge flags (the options given, by name), ``BAMCOUNTD_*`` and the TOML file into one config.

    :raises ConfigError: a value no converter takes, an unknown key or a folder that cannot work
    """
    environ = os.environ if environ is None else environ
    refused = [key for key in flags if key not in KEYS and key != CONFIG_FILE.name]
    if refused:
        row = next(row for row in OPTIONS if row.name == refused[0])
        raise ConfigError(f"{row.flag} {row.per_input}")
    config_file = flags.get("config") or environ.get(ENV_PREFIX + "CONFIG")
    file_values = _read_file(Path(config_file)) if config_file else {}
    values: dict[str, Any] = {}
    for key, row in KEYS.items():
        env_name = ENV_PREFIX + key.upper()
        if key in flags:
            values[key] = _convert(row, flags[key], row.flag)
        elif environ.get(env_name):
            values[key] = _convert(row, environ[env_name], env_name)
        elif key in file_values:
            values[key] = _convert(row, file_values[key], f"{config_file}: {key}")
    service = {row.name: values.pop(row.name, row.default) for row in SERVICE_OPTIONS}
    if service["state"] is None and environ.get("STATE_DIRECTORY"):  # systemd's StateDirectory=
        service["state"] = path(environ["STATE_DIRECTORY"].split(":")[0])
    for key in ("watch", "results", "state"):
        if service[key] is None:
            hint = " (or run under systemd with StateDirectory=)" if key == "state" else ""
            raise ConfigError(
                f"{key}: not set; give --{key}, {ENV_PREFIX}{key.upper()} or `{key} =` in the config file{hint}"
            )
    count = from_values(values)  # converted above
    count = replace(count, index_cache=count.index_cache or service["state"] / "index")
    _check_folders(service, count)
    return ServiceConfig(**service, config_file=Path(config_file) if config_file else None, count=count)


def _convert(row: Option, value: Any, where: str) -> Any:
    try:
        return convert(row, value)
    except (OptionValueError, tomllib.TOMLDecodeError) as error:
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
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise ConfigError(f"{path}: {unknown[0]}: unknown key (known: {', '.join(KEYS)})")
    return data


def _check_folders(values: dict[str, Any], count: CountOptions) -> None:
    regions_file = count.regions_file
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
