"""``python -m bamcountd`` and the ``bamcountd`` command."""

from __future__ import annotations

import sys


def run() -> None:
    from bamcountd import logs

    logs.import_structlog_without_extras()  # before anything else imports structlog
    from bamcountd.cli import main

    sys.exit(main())


if __name__ == "__main__":
    run()
