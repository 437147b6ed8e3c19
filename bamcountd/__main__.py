"""``python -m bamcountd`` and the ``bamcountd`` command."""

from __future__ import annotations

import gc
import os
import sys
from typing import NoReturn


def run() -> NoReturn:
    # A command is a short process: collecting garbage during its ~400 imports cost about 20 ms
    # of a count's start on a 2-core VM, and the little cyclic garbage a count makes dies with
    # the process.  The long-running commands (serve, dx watch) turn collection back on.
    gc.disable()
    from bamcountd.cli import main

    exit_now(main())


def exit_now(code: int) -> NoReturn:
    """Exit without the interpreter's teardown, which took 30-60 ms of a count on a 2-core VM.

    By the time main() returns, every file is closed, every samtools reaped and every temporary
    folder removed; only the standard streams are left to flush.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: the output did not all get out
            code = code or 1
    os._exit(code)


if __name__ == "__main__":
    run()
