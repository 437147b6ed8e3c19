"""DNAnexus: the applet's job mode (:mod:`.job`) and the project-folder runner (:mod:`.watch`).

:mod:`.platform` is the one module that imports dxpy; :mod:`.job` and :mod:`.local` reach the
platform through it, and dx-watch's policy (:mod:`.watch`) through a protocol it satisfies.
:mod:`.runtime` holds the runner's service plumbing (systemd notify, metrics, redaction,
signals), :mod:`.state` its ledger.  The counting core never imports this package.
"""

from __future__ import annotations
