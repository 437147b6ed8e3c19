"""What dx-watch's parts share: the platform's interface (:class:`DxApi`), a source BAM, a poll's tally.

:class:`~bamcountd.dnanexus.platform.Platform` implements :class:`DxApi` with dxpy; the policy
(:mod:`.watch`) and the local count (:mod:`.local`) see only this interface, and the tests give
them an in-memory platform.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from bamcountd.dnanexus.platform import DxFile, JobInfo

Json = dict[str, Any]


class DxApi(Protocol):
    """What the policy asks of DNAnexus; :class:`~bamcountd.dnanexus.platform.Platform` is the real one.

    Failures are bamcountd's errors: DxAuthFailed, DxAccessDenied (check_access), DxUnavailable.
    """

    def check_access(self, project: str, applet: str | None = None) -> None: ...

    def find_closed_files(
        self,
        project: str,
        folder: str,
        *,
        pattern: str,
        regexp: bool = False,
        recurse: bool = False,
        page_size: int | None = None,
    ) -> list[DxFile]: ...

    def find_closed_file(
        self, project: str, folder: str, *, pattern: str, properties: Mapping[str, str]
    ) -> str | None: ...

    def describe_file(self, file_id: str, project: str) -> DxFile: ...

    def set_properties(self, file_id: str, project: str, properties: Mapping[str, str]) -> None: ...

    def run_applet(
        self,
        applet: str,
        job_input: Json,
        *,
        project: str,
        folder: str,
        name: str,
        properties: Mapping[str, str],
        nonce: str,
    ) -> str: ...

    def describe_job(self, job_id: str) -> JobInfo: ...

    def dxlink(self, file_id: str, project: str | None = None) -> Json: ...

    def download(self, file: str | Json, path: Path, *, project: str | None = None) -> None: ...

    def upload(
        self,
        path: Path,
        *,
        project: str | None = None,
        folder: str | None = None,
        properties: Mapping[str, str] | None = None,
        wait_on_close: bool = False,
    ) -> str: ...


@dataclass(frozen=True)
class SourceBam:
    id: str
    project: str
    name: str
    folder: str
    size: int
    properties: Mapping[str, str]
    index: str | None  # file ID of its .bai/.csi in the same folder
    index_name: str = ""


@dataclass
class Stats:
    """What one poll did; also the Prometheus metrics' source."""

    seen: int = 0
    launched: int = 0
    counted: int = 0
    done: int = 0
    failed: int = 0
    retried: int = 0
