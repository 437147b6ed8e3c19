"""Count options, declared once.

Every option a count takes besides its input is one field of :class:`CountOptions` (the read
filters one of :class:`Filters`), declared with :func:`option`: its default, converter, flags
and help.  :data:`OPTIONS` is that table; from it the CLI builds its argparse options, the
daemon reads its TOML keys and ``BAMCOUNTD_*`` variables, and the applet and dx-watch map their
inputs.  Nothing here knows argparse, TOML or dxpy: each of those ends in its own layer.

A converter takes a value as any source gives it (a command-line word, an environment string,
a TOML value, an applet input, or an already typed value: converting twice changes nothing)
and returns the typed value, or raises :class:`ValueError` saying what is wrong.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from bamcountd.urls import Url, looks_like_url

Converter = Callable[[Any], Any]

# SAM flag names as samtools spells them (sam_view.c / bam_str2flag).
FLAG_NAMES = {
    "PAIRED": 0x1,
    "PROPER_PAIR": 0x2,
    "UNMAP": 0x4,
    "MUNMAP": 0x8,
    "REVERSE": 0x10,
    "MREVERSE": 0x20,
    "READ1": 0x40,
    "READ2": 0x80,
    "SECONDARY": 0x100,
    "QCFAIL": 0x200,
    "DUP": 0x400,
    "SUPPLEMENTARY": 0x800,
}
_FLAG_NUMBER = re.compile(r"\A(?:0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)\Z")
# ASCII digits only: Python's int() also takes "1_024" and other scripts' digits.
_INTEGER = re.compile(r"\A[+-]?[0-9]+\Z")
_DECIMAL = re.compile(r"\A[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\Z")


def parse_flags(text: str) -> int:
    """Parse a flag value the way samtools does: decimal, ``0x`` hex, ``0`` octal or names.

    :raises ValueError: a value samtools would not read as flags
    """
    value = text.strip()
    if not value:
        raise ValueError("empty flag value")
    if _FLAG_NUMBER.match(value):  # strtol's base 0: 0x hex, 0 octal, else decimal
        if value[:2].lower() == "0x":
            number = int(value[2:], 16)
        else:
            number = int(value, 8) if value.startswith("0") else int(value)
    elif value[0].isdigit():
        raise ValueError(f"cannot read flag value {text!r} (use decimal, 0x hex or names)")
    else:
        number = 0
        for name in value.split(","):
            key = name.strip().upper()
            if key not in FLAG_NAMES:
                raise ValueError(f"unknown flag name {name!r} (known: {', '.join(FLAG_NAMES)})")
            number |= FLAG_NAMES[key]
    if not 0 <= number <= 0xFFFF:
        raise ValueError(f"flag value {text!r} is outside 0..0xFFFF")
    return number


def combine_flags(values: object) -> int:
    """Several flag values ORed, as samtools ORs repeated ``-f``/``-F``/``-G`` options: a number,
    a string of values separated by spaces (``"0x4 0x10"``, ``"UNMAP REVERSE"``), or a list of
    either (a TOML array).  Each value is read by :func:`parse_flags`.

    :raises ValueError: a value samtools would not read as flags
    """
    if isinstance(values, bool):
        raise ValueError("must be a flag value such as 0x904 or DUP,SECONDARY")
    if isinstance(values, int):
        return parse_flags(str(values))
    if isinstance(values, str):
        parts = values.split()
        if not parts:
            raise ValueError("empty flag value")
        combined = 0
        for part in parts:
            combined |= parse_flags(part)
        return combined
    if isinstance(values, list | tuple) and values:
        combined = 0
        for value in values:
            if isinstance(value, list | tuple):
                raise ValueError("must be a flag value or a list of them")
            combined |= combine_flags(value)
        return combined
    raise ValueError("must be a flag value such as 0x904 or DUP,SECONDARY, or a list of them")


# --- converters ------------------------------------------------------------------------------


def _number(value: Any, *, integer: bool, minimum: float, maximum: float | None = None, inclusive: bool = True) -> Any:
    if isinstance(value, bool):
        raise ValueError("must be a number")
    if isinstance(value, str):
        text = value.strip()
        if not (_INTEGER if integer else _DECIMAL).match(text) and not (not integer and text.lower() == "nan"):
            if integer:
                raise ValueError(f"invalid literal {value!r}: must be a whole number")
            raise ValueError(f"could not convert {value!r} to a number")
        value = int(text) if integer else float(text)
    if integer and not isinstance(value, int):
        raise ValueError("must be a whole number")
    if not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"must be a finite number, not {value}")
    if maximum is not None and not minimum <= value <= maximum:
        raise ValueError(f"must be between {minimum:g} and {maximum:g}, not {value}")
    if value < minimum or (not inclusive and value == minimum):
        raise ValueError(f"must be {'at least' if inclusive else 'more than'} {minimum:g}, not {value}")
    return value


def positive_int(value: Any) -> int:
    return int(_number(value, integer=True, minimum=1))


def non_negative_int(value: Any) -> int:
    return int(_number(value, integer=True, minimum=0))


def mapq(value: Any) -> int:
    return int(_number(value, integer=True, minimum=0, maximum=255))


def seconds(value: Any) -> float:
    return float(_number(value, integer=False, minimum=0))


def positive_seconds(value: Any) -> float:
    return float(_number(value, integer=False, minimum=0, inclusive=False))


def boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return value.strip().lower() in ("1", "true", "yes", "on")
    raise ValueError("must be true or false")


def path(value: Any) -> Path:
    """An absolute path (``~`` expanded): a daemon's working folder is not the user's."""
    if not isinstance(value, str | Path) or not str(value):
        raise ValueError("must be a path")
    return Path(os.path.abspath(os.path.expanduser(value)))


def path_or_url(value: Any) -> Path | Url:
    """A URL (``scheme://``, of a scheme samtools reads), or else a path as :func:`path`."""
    if isinstance(value, Url):
        return value
    if isinstance(value, str) and looks_like_url(value):
        return Url(value)  # its ValueError names the URL redacted
    return path(value)


def text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("must be a non-empty string")
    return value


def strings(value: Any) -> tuple[str, ...]:
    """A list, or one string of comma-separated items."""
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, list | tuple) or not all(isinstance(item, str) for item in value):
        raise ValueError("must be a list of strings")
    return tuple(value)


@dataclass(frozen=True)
class Choice:
    """One of a few words (the CLI shows them)."""

    choices: tuple[str, ...]

    def __call__(self, value: Any) -> str:
        if value not in self.choices:
            raise ValueError(f"must be one of {', '.join(self.choices)}, not {value!r}")
        return str(value)


def choice(*choices: str) -> Choice:
    return Choice(choices)


def regions(value: Any) -> tuple[str, ...]:
    """Region strings: a list, or one region (names may hold ',' and ':'), or a TOML-style list
    in one string (``BAMCOUNTD_REGIONS='["chr1", "chr2"]'``)."""
    if isinstance(value, str):
        if value.startswith("["):
            import tomllib

            value = tomllib.loads(f"v = {value}")["v"]
        else:
            value = [value]
    if not isinstance(value, list | tuple) or not all(isinstance(item, str) and item for item in value):
        raise ValueError("must be a list of regions")
    return tuple(value)


# --- the table -------------------------------------------------------------------------------

#: How an option reads on a command line.
VALUE = "value"  # --name VALUE
APPEND = "append"  # repeated: each adds one item to a list
OR = "or"  # repeated: the values are ORed, as samtools ORs a repeated -f/-F/-G
OFF = "off"  # a --no-… switch that sets the option to false


@dataclass(frozen=True, kw_only=True)
class Option:
    """One option: its name is the field, the TOML key and ``BAMCOUNTD_<NAME>``."""

    name: str
    default: Any
    convert: Converter
    flags: tuple[str, ...]
    help: str
    metavar: str | None = None
    kind: str = VALUE
    group: str = "how to run"
    #: The applet input that carries the option, or None if the applet does not take it.
    applet: str | None = None
    #: Why a runner of many inputs (the daemon, dx-watch) refuses it, if it does.
    per_input: str | None = None

    @property
    def flag(self) -> str:
        """The long flag, for messages."""
        return self.flags[-1]

    @property
    def choices(self) -> tuple[str, ...] | None:
        return self.convert.choices if isinstance(self.convert, Choice) else None


def option(default: Any, *flags: str, convert: Converter, help: str, **more: Any) -> Any:
    """A dataclass field that is a row of the options table (its name is filled in later)."""
    extra = {"default_factory": default} if callable(default) else {"default": default}
    return field(metadata={"option": {"flags": flags, "convert": convert, "help": help, **more}}, **extra)


_FILTERS = "read filters (samtools view's)"
_ORED = "repeated, ORed as by samtools"


def _flags_option(*flags: str, help: str, applet: str | None = None) -> Any:
    return option(0, *flags, convert=combine_flags, kind=OR, metavar="FLAGS", group=_FILTERS, applet=applet, help=help)


@dataclass(frozen=True, kw_only=True)
class Filters:
    """samtools view's own read filters, with samtools' meaning."""

    require_flags: int = _flags_option(
        "-f", "--require-flags", applet="require_flags", help=f"count only reads with all of FLAGS (e.g. 0x2); {_ORED}"
    )
    exclude_flags: int = _flags_option(
        "-F", "--exclude-flags", applet="exclude_flags", help=f"skip reads with any of FLAGS (e.g. 0x904); {_ORED}"
    )
    exclude_all_flags: int = _flags_option("-G", "--exclude-all-flags", help=f"skip reads with all of FLAGS; {_ORED}")
    min_mapq: int = option(
        0,
        "-q",
        "--min-mapq",
        convert=mapq,
        metavar="INT",
        group=_FILTERS,
        applet="min_mapq",
        help="skip MAPQ below INT",
    )

    @property
    def active(self) -> bool:
        return any((self.require_flags, self.exclude_flags, self.exclude_all_flags, self.min_mapq))

    def argv(self) -> list[str]:
        args: list[str] = []
        if self.require_flags:
            args += ["-f", str(self.require_flags)]
        if self.exclude_flags:
            args += ["-F", str(self.exclude_flags)]
        if self.exclude_all_flags:
            args += ["-G", str(self.exclude_all_flags)]
        if self.min_mapq:
            args += ["-q", str(self.min_mapq)]
        return args

    def as_dict(self) -> dict[str, int]:
        return {
            "require_flags": self.require_flags,
            "exclude_flags": self.exclude_flags,
            "exclude_all_flags": self.exclude_all_flags,
            "min_mapq": self.min_mapq,
        }


#: Below this many expected reads, cutting a shard costs more in start-up than it saves.
DEFAULT_MIN_SHARD_READS = 200_000


_REGION_HELP = "NAME, NAME:START-END or {NAME}:START-END; repeat for more (default: every reference, then *)"
_THREADS_HELP = "threads per samtools process, its own included (default: 1, more if --jobs leaves cores idle)"
_METHOD_HELP = "view: read every record (default); index: unfiltered totals from the index only, unverified"
_VERIFY_HELP = (
    "auto: a filtered count of a BAM and index that an earlier count proved record by record trusts that proof "
    "(default); full: count the records the filters leave out every time"
)
_NO_BUILD_HELP = "fail if the index is missing or older than the BAM instead of building one"
_REFERENCE_HELP = (
    "a CRAM's reference (with its .fai), checked against the header; a count decodes no bases, so none is needed"
)
_ONE_INDEX = "names one index file; each BAM's own is found (or built) next to it"


@dataclass(frozen=True, kw_only=True)
class CountOptions:
    """Everything a count needs but its input; every option has samtools' meaning where samtools
    has one.  Build one with keywords, or :func:`from_values` from any source's values."""

    regions: tuple[str, ...] = option(
        (), "-r", "--region", convert=regions, kind=APPEND, metavar="REGION", group="regions", help=_REGION_HELP
    )
    regions_file: Path | None = option(
        None, "--regions-file", convert=path, metavar="BED", group="regions", help="count each BED interval"
    )
    filters: Filters = field(default_factory=Filters)
    jobs: int = option(
        10, "-j", "--jobs", convert=positive_int, metavar="N", applet="jobs", help="most samtools processes at once"
    )
    threads: int | None = option(None, "--threads", convert=positive_int, metavar="N", help=_THREADS_HELP)
    timeout: float | None = option(
        None, "--timeout", convert=positive_seconds, metavar="SECONDS", help="kill a samtools command after SECONDS"
    )
    method: str = option("view", "--method", convert=choice("view", "index"), help=_METHOD_HELP)
    split: bool = option(
        True, "--no-split", convert=boolean, kind=OFF, help="one samtools per region (no balanced shards)"
    )
    min_shard_reads: int = option(
        DEFAULT_MIN_SHARD_READS,
        "--min-shard-reads",
        convert=positive_int,
        metavar="N",
        applet="min_shard_reads",
        help="smallest shard, in reads",
    )
    index: Path | Url | None = option(
        None,
        "--index",
        convert=path_or_url,
        metavar="FILE|URL",
        per_input=_ONE_INDEX,
        help="default: BAM.bai or BAM.csi (CRAM.crai) next to the input, a file or a URL",
    )
    build_index: bool = option(True, "--no-index-build", convert=boolean, kind=OFF, help=_NO_BUILD_HELP)
    # "auto": a filtered count of a BAM and index that an earlier count proved every record of
    # (see inputs.Verdict) need not count the records its filters leave out; "full": always.
    verify: str = option("auto", "--verify", convert=choice("auto", "full"), help=_VERIFY_HELP)
    index_cache: Path | None = option(
        None,
        "--index-cache",
        convert=path,
        metavar="DIR",
        help="built indexes (default: $XDG_CACHE_HOME/bamcountd/index)",
    )
    reference: Path | None = option(None, "-T", "--reference", convert=path, metavar="FASTA", help=_REFERENCE_HELP)
    samtools: str | None = option(
        None, "--samtools", convert=text, metavar="PATH", help="samtools executable (default: samtools on PATH)"
    )


def _rows(holder: type) -> list[Option]:
    rows: list[Option] = []
    for spec in fields(holder):
        if spec.name == "filters":  # the read filters' own rows, in their place
            rows += _rows(Filters)
            continue
        factory = spec.default_factory
        default = factory() if callable(factory) else spec.default
        rows.append(Option(name=spec.name, default=default, **spec.metadata["option"]))
    return rows


#: The table, in the order the CLI shows it.
OPTIONS: tuple[Option, ...] = tuple(_rows(CountOptions))
BY_NAME: Mapping[str, Option] = {row.name: row for row in OPTIONS}
_FILTER_NAMES = frozenset(spec.name for spec in fields(Filters))


class OptionValueError(ValueError):
    """A value that its option's converter refused; ``option`` names the option."""

    def __init__(self, option: Option, message: str) -> None:
        super().__init__(message)
        self.option = option


def convert(row: Option, value: Any) -> Any:
    """``value`` converted for ``row``.

    :raises OptionValueError: the converter refused it
    """
    try:
        return row.convert(value)
    except (ValueError, TypeError) as error:
        raise OptionValueError(row, str(error)) from None


def from_values(values: Mapping[str, Any], *, base: CountOptions | None = None) -> CountOptions:
    """Options from ``{name: value}`` (every value converted; a missing name keeps ``base``'s
    value, or the default).

    :raises OptionValueError: a value its converter refused
    :raises KeyError: a name that is not an option
    """
    base = CountOptions() if base is None else base
    unknown = sorted(set(values) - set(BY_NAME))
    if unknown:
        raise KeyError(unknown[0])
    converted = {name: convert(BY_NAME[name], value) for name, value in values.items()}
    filters = {name: converted.pop(name) for name in list(converted) if name in _FILTER_NAMES}
    return replace(base, filters=replace(base.filters, **filters), **converted)


def value_of(options: CountOptions, row: Option) -> Any:
    """The value ``options`` holds for ``row``."""
    holder: object = options.filters if row.name in _FILTER_NAMES else options
    return getattr(holder, row.name)


def check(options: CountOptions) -> None:
    """Every value is one its converter accepts (for options built with keywords).

    :raises OptionValueError: the first value that is not
    """
    for row in OPTIONS:
        value = value_of(options, row)
        if value is not None and value != row.default:
            convert(row, value)
