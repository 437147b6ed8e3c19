#!/usr/bin/env python3
# bamcount applet: exact per-region read counts of a BAM with bamcountd (samtools view -c).
# The entry points live in bamcountd.dnanexus.job; this file only hands control to dxpy.
from __future__ import annotations

import os
import sys

# On a worker, dnanexus/build.sh's resources are unpacked at /: bamcountd and its
# dependencies are in /opt/bamcountd/lib.  Elsewhere (tests) the installed package is used.
BUNDLED = "/opt/bamcountd/lib"
if os.path.isdir(BUNDLED):
    sys.path.insert(0, BUNDLED)

import dxpy  # noqa: E402

import bamcountd.dnanexus.job  # noqa: E402, F401  (registers the entry points)

dxpy.run()
