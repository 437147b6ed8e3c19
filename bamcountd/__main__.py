"""``python -m bamcountd`` and the ``bamcountd`` command."""

from __future__ import annotations

import gc
import os
import sys
from typing import NoReturn


def run() -> NoReturn:
    # Collecting garbage while the modules load cost about 20 ms of a count's start on a 2-core
    # VM, for nothing: what they make lives as long as the process, so it is frozen out of
    # every later collection too.
    gc.disable()
    from bamcountd.cli import main

    gc.freeze()
    gc.enable()
    exit_now(main())


def exit_now(code: int) -> NoReturn:
    """Exit without the interpreter's teardown, which took 30-60 ms of a count on a 2-core VM.

    By the time main() returns, every file is closed, every samtools reaped and every temporary
    folder removed; only the standard streams are left to flush.  As at a normal exit, output
    that cannot be flushed to stdout fails a run that had succeeded, and stderr's is let go.
    """
    for stream in (sys.stdout, sys.stderr):
        if stream is None:  # started with the descriptor closed
            continue
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream
            if stream is sys.stdout:
                code = code or 1
    os._exit(code)


if __name__ == "__main__":
    run()
