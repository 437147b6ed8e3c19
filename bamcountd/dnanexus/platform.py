"""The DNAnexus platform: the one module of bamcountd that imports dxpy.

The applet's entry points (:mod:`.job`) and dx-watch (:mod:`.watch`, :mod:`.local`) reach the
platform only through :class:`Platform`, which returns plain dataclasses and JSON and raises
bamcountd's errors: :class:`~bamcountd.errors.DxAuthFailed` for a rejected token,
:class:`~bamcountd.errors.DxAccessDenied` (from :meth:`Platform.check_access`) for a project or
applet that is not there, and :class:`~bamcountd.errors.DxUnavailable` for any other API or
network failure, which a later try may not meet.  A job reports failures as the platform's
:data:`AppError` (bad input) and :data:`AppInternalError` (anything else), re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import dxpy  # type: ignore[import-untyped]
import urllib3

from bamcountd.dnanexus.model import DxFile, Json
from bamcountd.errors import DxAccessDenied, DxAuthFailed, DxUnavailable, one_line
from bamcountd.urls import Url

#: A job's failure for bad input (the job fails with reason ``AppError``).
AppError: type[Exception] = dxpy.AppError
#: A job's failure for anything else (reason ``AppInternalError``).
AppInternalError: type[Exception] = dxpy.AppInternalError


@dataclass(frozen=True)
class JobInfo:
    """What dx-watch reads of a job: its state, its output and why it failed."""

    id: str
    state: str  # idle, runnable, running, done, failed, terminated, …
    output: Json
    failure_reason: str | None
    failure_message: str | None

    def file_output(self, field: str) -> str:
        """The file ID of a file output (a link, ``{"$dnanexus_link": ID or {"id": ID, …}}``)."""
        link = self.output[field]["$dnanexus_link"]
        return str(link["id"] if isinstance(link, dict) else link)


def dxlink(file_id: str, project: str | None = None) -> Json:
    """A link to a file, as job inputs and outputs take it."""
    link: Json = dxpy.dxlink(file_id, project)
    return link


def register_entry_points(entry_points: Mapping[str, Callable[..., Json]]) -> None:
    """Make these functions the applet's entry points (dxpy.run() looks them up by name)."""
    for name, function in entry_points.items():
        dxpy.entry_point(name)(function)


def api_token() -> str | None:
    """The API token dxpy found (DX_SECURITY_CONTEXT, ``dx login``), if any."""
    context = dxpy.SECURITY_CONTEXT or {}
    token = context.get("auth_token")
    return str(token) if token else None


@contextmanager
def _translated() -> Iterator[None]:
    try:
        yield
    except (dxpy.AppError, dxpy.AppInternalError):
        raise
    except dxpy.exceptions.InvalidAuthentication as error:
        raise DxAuthFailed(f"DNAnexus rejected the API token ({error.msg})") from None
    except (dxpy.exceptions.DXError, urllib3.exceptions.HTTPError) as error:
        raise DxUnavailable(one_line(error)) from error


class Platform:
    """dxpy's calls as bamcountd makes them.

    ``api_retries``: dxpy's own retries per API call (it waits 1, 2, 4, … s between them);
    None leaves dxpy's default.  File transfers keep dxpy's default either way.
    """

    def __init__(self, *, api_retries: int | None = None) -> None:
        self._api: Json = {} if api_retries is None else {"max_retries": api_retries}

    # --- dx-watch ----------------------------------------------------------------------------

    def check_access(self, project: str, applet: str | None = None) -> None:
        """Fail with DxAuthFailed or DxAccessDenied unless the token can read the project (and applet)."""
        with _translated():
            try:
                dxpy.api.project_describe(project, {"fields": {"name": True}}, **self._api)
                if applet is not None:
                    dxpy.DXApplet(applet).describe(**self._api)
            except dxpy.exceptions.InvalidAuthentication as error:
                raise DxAuthFailed(
                    f"DNAnexus rejected the API token ({error.msg}): set DX_SECURITY_CONTEXT or run `dx login`"
                ) from None
            except (dxpy.exceptions.PermissionDenied, dxpy.exceptions.ResourceNotFound) as error:
                what = project if applet is None else f"{project} or {applet}"
                raise DxAccessDenied(f"{what}: {error.name}: {error.msg}") from None

    def find_closed_files(
        self,
        project: str,
        folder: str,
        *,
        pattern: str,
        regexp: bool = False,
        recurse: bool = False,
        page_size: int | None = None,
    ) -> list[DxFile]:
        """Every closed file in the folder whose name matches (a glob, or a regular expression), all pages."""
        fields = {"name": True, "folder": True, "size": True, "properties": True, "state": True}
        paging = {} if page_size is None else {"first_page_size": page_size}
        with _translated():
            hits = list(
                dxpy.find_data_objects(
                    classname="file",
                    state="closed",
                    name=pattern,
                    name_mode="regexp" if regexp else "glob",
                    project=project,
                    folder=folder,
                    recurse=recurse,
                    describe={"fields": fields},
                    **paging,
                    **self._api,
                )
            )
        return [_file(hit["id"], hit["project"], hit["describe"]) for hit in hits]

    def find_closed_file(self, project: str, folder: str, *, pattern: str, properties: Mapping[str, str]) -> str | None:
        """The ID of one closed file in the folder (not below it) with this name glob and these properties."""
        with _translated():
            for hit in dxpy.find_data_objects(
                classname="file",
                state="closed",
                name=pattern,
                name_mode="glob",
                properties=dict(properties),
                project=project,
                folder=folder,
                **self._api,
            ):
                return str(hit["id"])
        return None

    def describe_file(self, file_id: str, project: str) -> DxFile:
        with _translated():
            describe = dxpy.DXFile(file_id, project=project).describe(
                fields={"name": True, "folder": True, "size": True, "properties": True}, **self._api
            )
        return _file(file_id, project, describe)

    def set_properties(self, file_id: str, project: str, properties: Mapping[str, str]) -> None:
        with _translated():
            dxpy.DXFile(file_id, project=project).set_properties(dict(properties), **self._api)

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
    ) -> str:
        """Launch the applet; the ID of its job.  The platform returns the first job for a repeated nonce."""
        with _translated():
            job = dxpy.DXApplet(applet).run(
                job_input,
                project=project,
                folder=folder,
                name=name,
                properties=dict(properties),
                extra_args={"nonce": nonce},
                **self._api,
            )
            return str(job.get_id())

    def describe_job(self, job_id: str) -> JobInfo:
        with _translated():
            describe = dxpy.DXJob(job_id).describe(
                fields={"state": True, "output": True, "failureReason": True, "failureMessage": True}, **self._api
            )
        return JobInfo(
            id=job_id,
            state=describe["state"],
            output=describe.get("output") or {},
            failure_reason=describe.get("failureReason"),
            failure_message=describe.get("failureMessage"),
        )

    def dxlink(self, file_id: str, project: str | None = None) -> Json:
        """:func:`dxlink`, for callers that hold only a platform object."""
        return dxlink(file_id, project)

    # --- files, in a job or in dx-watch ---------------------------------------------------------

    def download(self, file: str | Json, path: Path, *, project: str | None = None) -> None:
        """Download a file (an ID or a link) to ``path``."""
        with _translated():
            handler = dxpy.get_handler(file) if isinstance(file, dict) else file
            dxpy.download_dxfile(handler, str(path), project=project)

    def upload(
        self,
        path: Path,
        *,
        project: str | None = None,
        folder: str | None = None,
        properties: Mapping[str, str] | None = None,
        wait_on_close: bool = False,
    ) -> str:
        """Upload a local file (into the job's workspace unless ``project`` is given); its file ID."""
        where: Json = {}
        if project is not None:
            where["project"] = project
        if folder is not None:
            where.update(folder=folder, parents=True)
        if properties is not None:
            where["properties"] = dict(properties)
        with _translated():
            return str(dxpy.upload_local_file(str(path), wait_on_close=wait_on_close, **where).get_id())

    # --- in a job ----------------------------------------------------------------------------

    def file_size(self, file: Json) -> int:
        """The size in bytes of a file input (a link)."""
        return self.describe_input(file).size

    def describe_input(self, file: Json) -> DxFile:
        """A file input (a link): its ID, project, name and size."""
        with _translated():
            handle = dxpy.DXFile(file)
            describe = handle.describe(
                fields={"name": True, "folder": True, "size": True, "project": True}, **self._api
            )
        return _file(handle.get_id(), describe["project"], describe)

    def download_url(self, file: Json, *, project: str, duration: int) -> Url:
        """A preauthenticated URL of a file input (a link), valid for ``duration`` seconds.

        A fresh handle each time: dxpy keeps a handle's URL and would hand back an old one.
        """
        with _translated():
            url, _ = dxpy.DXFile(file).get_download_url(
                preauthenticated=True, duration=duration, project=project, **self._api
            )
        return Url(url)

    def download_inputs(self, *, exclude: tuple[str, ...] = ()) -> dict[str, str]:
        """Download the job's file inputs but ``exclude``; ``NAME_path``, ``NAME_name`` and ``NAME_prefix`` of each."""
        with _translated():
            inputs = dxpy.download_all_inputs(exclude=list(exclude))
        # download_all_inputs gives one-element lists for single files in current dxpy.
        return {key: value[0] if isinstance(value, list) else value for key, value in inputs.items()}

    def new_subjob(self, function: str, job_input: Json, *, name: str) -> str:
        """Start a subjob of this job running the entry point ``function``; its job ID."""
        with _translated():
            return str(dxpy.new_dxjob(fn_input=job_input, fn_name=function, name=name).get_id())

    def output_ref(self, job_id: str, field: str) -> Json:
        """A reference to a job's output field, which the platform resolves when the job is done."""
        ref: Json = dxpy.DXJob(job_id).get_output_ref(field)
        return ref


def _file(file_id: str, project: str, describe: Json) -> DxFile:
    return DxFile(
        id=file_id,
        project=project,
        name=describe["name"],
        folder=describe["folder"],
        size=describe.get("size", 0),
        properties=describe.get("properties") or {},
    )
