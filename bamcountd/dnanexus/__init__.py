"""DNAnexus: the applet's job mode (:mod:`.job`) and the project-folder runner (:mod:`.watch`).

Everything that imports dxpy lives in this package; the counting core never imports it.
"""

from __future__ import annotations
