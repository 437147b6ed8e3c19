"""Output formats, and atomic file writes (a reader never sees half a result)."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

from bamcountd.count import CountResult

FORMATS = ("table", "tsv", "json", "seed")


def format_table(result: CountResult) -> str:
    rows = [(r.region, str(r.count)) for r in result.regions] + [("total", str(result.total))]
    name_width = max(len("region"), *(len(name) for name, _ in rows))
    count_width = max(len("count"), *(len(count) for _, count in rows))
    lines = [f"{'region':<{name_width}}  {'count':>{count_width}}"]
    lines += [f"{name:<{name_width}}  {count:>{count_width}}" for name, count in rows[:-1]]
    lines.append("-" * (name_width + 2 + count_width))
    lines.append(f"{rows[-1][0]:<{name_width}}  {rows[-1][1]:>{count_width}}")
    return "\n".join(lines) + "\n"


def format_tsv(result: CountResult) -> str:
    lines = [f"{r.region}\t{r.count}" for r in result.regions]
    lines.append(f"total\t{result.total}")
    return "\n".join(lines) + "\n"


def json_text(document: object) -> str:
    """JSON that is valid UTF-8 for any reference name.  Names are the header's bytes; a byte
    that is not UTF-8 is written as the escape ``\\udcXX`` (Python's surrogateescape), which
    ``json.loads`` and then ``.encode("utf-8", "surrogateescape")`` turn back into that byte."""
    import json  # here: its decoder's regexes are 4-6 ms of a start that prints TSV

    text = json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    return _LONE_SURROGATE.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


_LONE_SURROGATE = re.compile("[\udc80-\udcff]")


def format_json(result: CountResult) -> str:
    return json_text(result.as_dict())


def format_seed(result: CountResult) -> str:
    """The seed applet's count_file, byte for byte: no newline after the total."""
    lines = [f"Region {r.region}: {r.count}\n" for r in result.regions]
    return "".join(lines) + f"Total reads: {result.total}"


_FORMATTERS: dict[str, Callable[[CountResult], str]] = {
    "table": format_table,
    "tsv": format_tsv,
    "json": format_json,
    "seed": format_seed,
}


def render(result: CountResult, fmt: str) -> str:
    return _FORMATTERS[fmt](result)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder, fsync and rename."""
    path = Path(path)
    folder = path.parent
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
