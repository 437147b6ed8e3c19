from __future__ import annotations

import sys

from bamcountd.cli import main

sys.exit(main())
