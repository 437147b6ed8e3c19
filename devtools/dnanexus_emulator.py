"""A local DNAnexus API emulator for tests: the routes dxpy uses, with the platform's wire format.

It listens on 127.0.0.1 only.  Objects live in memory; IDs have the platform's form
(``file-`` + 24 characters of its alphabet).  Jobs run the way the platform runs them: a home
folder with ``job_input.json``, ``DX_JOB_ID`` and a job token in the environment, the applet's
script run with this Python, then ``job_output.json`` or ``job_error.json`` read back.  Job-based
object references (``{"$dnanexus_link": {"job": ..., "field": ...}}``) in a job's input hold it
until the job they name is done; in a job's output they hold it in ``waiting_on_output``.

Downloads: ``/file-xxxx/download`` gives a URL that dxpy must send the job's token with, or, with
``preauthenticated``, one that needs nothing and carries its token in its path as the platform's
do (``/F/D/<token>/<name>``), valid for ``duration`` seconds; both serve HTTP ``Range`` requests,
and :attr:`Emulator.served` counts the bytes sent of each file.

Fault injection: :meth:`Emulator.inject` (an HTTP status, optionally with ``Retry-After``, for the
next N calls of a route), :meth:`Emulator.fail_next_jobs`, :meth:`Emulator.hold_runs` (the job is
created but the reply waits), and :meth:`Emulator.stop_listening` / :meth:`Emulator.listen`
(the API unreachable, then back on the same port).
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

_ALPHABET = "0123456789BFGJKPQVXYZbfgjkpqvxyz"
_ID = re.compile(r"\A/((?:file|project|container|applet|job)-[0-9A-Za-z]{24})/([A-Za-z]+)\Z")
UPLOAD_PARAMETERS = {
    "minimumPartSize": 5 * 1024 * 1024,
    "maximumPartSize": 5 * 1024**3,
    "emptyLastPartAllowed": True,
    "maximumNumParts": 10000,
    "maximumFileSize": 5 * 1024**4,
}
Json = dict[str, Any]
_CHUNK = 16384  # bytes per write of a download's body


class ApiError(Exception):
    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


def new_id(kind: str) -> str:
    return f"{kind}-" + "".join(secrets.choice(_ALPHABET) for _ in range(24))


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class DxFile:
    id: str
    project: str
    name: str
    folder: str
    state: str = "open"
    parts: dict[int, bytes] = field(default_factory=dict)
    data: bytes = b""
    properties: dict[str, str] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    created: int = field(default_factory=_now_ms)

    def describe(self, fields: Json | None = None) -> Json:
        out: Json = {
            "id": self.id,
            "class": "file",
            "project": self.project,
            "name": self.name,
            "folder": self.folder,
            "state": self.state,
            "size": len(self.data),
            "media": "application/octet-stream",
            "hidden": False,
            "types": [],
            "tags": list(self.tags),
            "properties": dict(self.properties),
            "created": self.created,
            "modified": self.created,
            "sponsored": False,
            "archivalState": "live",
        }
        parts = self.parts if self.state == "open" or self.parts else {1: self.data}
        out["parts"] = {
            str(index): {"size": len(part), "md5": hashlib.md5(part).hexdigest(), "state": "complete"}
            for index, part in sorted(parts.items())
        }
        if fields:
            wanted = {key for key, on in fields.items() if on} | {"id"}
            out = {key: value for key, value in out.items() if key in wanted}
        return out


@dataclass
class Applet:
    id: str
    project: str
    name: str
    spec: Json  # dxapp.json
    script: Path

    def describe(self) -> Json:
        return {
            "id": self.id,
            "class": "applet",
            "project": self.project,
            "name": self.name,
            "state": "closed",
            "inputSpec": self.spec.get("inputSpec", []),
            "outputSpec": self.spec.get("outputSpec", []),
            "runSpec": self.spec.get("runSpec", {}),
            "properties": {},
            "tags": [],
        }


@dataclass
class Job:
    id: str
    applet: str
    function: str
    input: Json
    project: str
    folder: str
    name: str
    workspace: str
    token: str
    parent: str | None = None
    root: str = ""
    state: str = "idle"
    output: Json | None = None
    resolved_input: Json | None = None
    properties: dict[str, str] = field(default_factory=dict)
    failure_reason: str | None = None
    failure_message: str | None = None
    created: int = field(default_factory=_now_ms)
    tries: int = 0

    def describe(self) -> Json:
        out: Json = {
            "id": self.id,
            "class": "job",
            "name": self.name,
            "applet": self.applet,
            "function": self.function,
            "project": self.project,
            "folder": self.folder,
            "workspace": self.workspace,
            "parentJob": self.parent,
            "rootExecution": self.root,
            "originalInput": self.input,
            "input": self.resolved_input if self.resolved_input is not None else self.input,
            "output": self.output if self.state == "done" else None,
            "state": self.state,
            "properties": dict(self.properties),
            "tags": [],
            "created": self.created,
            "modified": _now_ms(),
            "launchedBy": "user-test",
            "tryCount": self.tries,
        }
        if self.state in ("failed", "terminated"):
            out["failureReason"] = self.failure_reason
            out["failureMessage"] = self.failure_message
        return out


@dataclass
class Fault:
    route: str  # regular expression matched against the path
    status: int
    remaining: int
    retry_after: int | None = None
    kind: str = "ServiceUnavailable"


class Emulator:
    """The platform's state plus an HTTP server; use as a context manager or call close()."""

    def __init__(self, work: Path, *, token: str = "test-token-0123456789", python: str = sys.executable) -> None:
        self.work = work
        self.token = token
        self.python = python
        self.lock = threading.RLock()
        self.files: dict[str, DxFile] = {}
        self.applets: dict[str, Applet] = {}
        self.jobs: dict[str, Job] = {}
        self.projects: dict[str, str] = {}  # id -> name (containers too)
        self.folders: set[tuple[str, str]] = set()
        self.nonces: dict[str, str] = {}
        self.faults: list[Fault] = []
        self.calls: list[str] = []
        self.find_requests: list[Json] = []
        #: Bytes of each file's data sent by downloads (any route, any range), by file ID.
        self.served: dict[str, int] = {}
        #: What each download request asked for: (file ID, its Range header or "").
        self.downloads: list[tuple[str, str]] = []
        self.preauthenticated: dict[str, tuple[str, float]] = {}  # token -> (file ID, expiry)
        #: Preauthenticated URLs last at most this long (seconds): a test's way to let them expire.
        self.url_lifetime: float | None = None
        #: False: preauthenticated URLs ignore Range (a server samtools cannot read regions from).
        self.preauthenticated_ranges = True
        self.connections: set[socket.socket] = set()
        self.run_requests = 0
        self.job_env: dict[str, str] = {}
        self._fail_jobs: list[tuple[str, str, str]] = []
        self._held_runs = 0
        self.run_created = threading.Event()
        self.release_runs = threading.Event()
        self._threads: list[threading.Thread] = []
        self._server: ThreadingHTTPServer | None = None
        self.port = 0
        self.project = self.new_project("test-project")
        self.listen()

    # --- server --------------------------------------------------------------------------

    def listen(self) -> None:
        emulator = self

        class Handler(_Handler):
            api = emulator

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()

    def stop_listening(self) -> None:
        """The API becomes unreachable: no listener, and kept-alive connections are cut."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self.lock:
            connections, self.connections = self.connections, set()
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        # Let running jobs finish first: cut off from the API, dxpy in them would retry for minutes.
        self.release_runs.set()
        if self._server is None:
            self.listen()
        for thread in list(self._threads):
            thread.join(timeout=60)
        self.stop_listening()

    def __enter__(self) -> Emulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, *, token: str | None = None) -> dict[str, str]:
        """The environment that points dxpy at this emulator."""
        return {
            "DX_APISERVER_HOST": "127.0.0.1",
            "DX_APISERVER_PORT": str(self.port),
            "DX_APISERVER_PROTOCOL": "http",
            "DX_SECURITY_CONTEXT": json.dumps({"auth_token_type": "Bearer", "auth_token": token or self.token}),
            "DX_PROJECT_CONTEXT_ID": self.project,
        }

    # --- fixtures' helpers ----------------------------------------------------------------

    def new_project(self, name: str, kind: str = "project") -> str:
        with self.lock:
            dxid = new_id(kind)
            self.projects[dxid] = name
            self.folders.add((dxid, "/"))
            return dxid

    def add_file(
        self, name: str, data: bytes, *, folder: str = "/", project: str | None = None, state: str = "closed"
    ) -> str:
        with self.lock:
            dxfile = DxFile(new_id("file"), project or self.project, name, folder, state=state, data=data)
            self.files[dxfile.id] = dxfile
            self._mkdir(dxfile.project, folder)
            return dxfile.id

    def close_file(self, dxid: str) -> None:
        with self.lock:
            self.files[dxid].state = "closed"

    def add_applet(self, name: str, spec: Json, script: Path, *, project: str | None = None) -> str:
        with self.lock:
            applet = Applet(new_id("applet"), project or self.project, name, spec, script)
            self.applets[applet.id] = applet
            return applet.id

    def inject(self, route: str, status: int, *, times: int = 1, retry_after: int | None = None) -> None:
        kinds = {500: "InternalError", 503: "ServiceUnavailable", 401: "InvalidAuthentication"}
        with self.lock:
            self.faults.append(Fault(route, status, times, retry_after, kinds.get(status, "InternalError")))

    def fail_next_jobs(
        self, count: int, *, reason: str = "AppInternalError", message: str = "injected failure", state: str = "failed"
    ) -> None:
        """The next ``count`` root jobs end in ``state`` (failed, or terminated as by a user) without running."""
        with self.lock:
            self._fail_jobs += [(reason, message, state)] * count

    def hold_runs(self, count: int = 1) -> None:
        """The next ``count`` /applet-xxxx/run calls create their job, then wait for release_runs."""
        with self.lock:
            self._held_runs = count
            self.run_created.clear()
            self.release_runs.clear()

    def files_in(self, folder: str, project: str | None = None) -> list[DxFile]:
        with self.lock:
            return [f for f in self.files.values() if f.project == (project or self.project) and f.folder == folder]

    def root_jobs(self) -> list[Job]:
        with self.lock:
            return [job for job in self.jobs.values() if job.parent is None]

    def wait_for_jobs(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if all(job.state in ("done", "failed", "terminated") for job in self.jobs.values()):
                    return
            time.sleep(0.05)
        raise TimeoutError("jobs still running: " + ", ".join(f"{j.id}={j.state}" for j in self.jobs.values()))

    # --- request handling ----------------------------------------------------------------

    def handle(self, path: str, body: Json, token: str | None) -> Json:
        with self.lock:
            self.calls.append(path)
            for fault in self.faults:
                if fault.remaining > 0 and re.search(fault.route, path):
                    fault.remaining -= 1
                    raise _FaultError(fault)
            caller = self._caller(token)
        if path == "/system/whoami":
            return {"id": "user-test"}
        if path == "/system/findDataObjects":
            return self._find(body)
        if path == "/file/new":
            return self._file_new(body, caller)
        if path == "/job/new":
            return self._job_new(body, caller)
        match = _ID.match(path)
        if match is None:
            raise ApiError(404, "ResourceNotFound", f"the route {path} is not emulated")
        dxid, method = match.groups()
        kind = dxid.split("-", 1)[0]
        handler: Callable[[str, Json, Job | None], Json] | None = getattr(self, f"_{kind}_{method}", None)
        if handler is None:
            raise ApiError(404, "ResourceNotFound", f"the route {path} is not emulated")
        return handler(dxid, body, caller)

    def _caller(self, token: str | None) -> Job | None:
        if token == self.token:
            return None
        for job in self.jobs.values():
            if job.token == token and job.state == "running":
                return job
        raise ApiError(401, "InvalidAuthentication", "the token could not be found")

    def _mkdir(self, project: str, folder: str) -> None:
        parts = [p for p in folder.split("/") if p]
        for depth in range(len(parts) + 1):
            self.folders.add((project, "/" + "/".join(parts[:depth])))

    def _find(self, body: Json) -> Json:
        scope = body.get("scope", {})
        name = body.get("name")
        limit = int(body.get("limit", 1000))
        with self.lock:
            self.find_requests.append(body)
            candidates = sorted(self.files.values(), key=lambda f: (f.created, f.id))
            hits: list[DxFile] = []
            for dxfile in candidates:
                if body.get("class") not in (None, "file"):
                    continue
                if body.get("state") and dxfile.state != body["state"]:
                    continue
                if "project" in scope and dxfile.project != scope["project"]:
                    continue
                folder = scope.get("folder")
                if folder is not None:
                    inside = dxfile.folder == folder or (
                        scope.get("recurse", True) and dxfile.folder.startswith(folder.rstrip("/") + "/")
                    )
                    if not inside:
                        continue
                if isinstance(name, str) and dxfile.name != name:
                    continue
                if isinstance(name, dict) and "glob" in name and not fnmatch.fnmatchcase(dxfile.name, name["glob"]):
                    continue
                if isinstance(name, dict) and "regexp" in name and not re.search(name["regexp"], dxfile.name):
                    continue
                wanted = body.get("properties") or {}
                if any(dxfile.properties.get(key) != value for key, value in wanted.items()):
                    continue
                hits.append(dxfile)
            start = 0
            if body.get("starting"):
                ids = [f.id for f in hits]
                start = ids.index(body["starting"]["id"]) if body["starting"]["id"] in ids else len(hits)
            page = hits[start : start + limit]
            following = hits[start + limit] if start + limit < len(hits) else None
            describe = body.get("describe")
            results: list[Json] = []
            for dxfile in page:
                result: Json = {"project": dxfile.project, "id": dxfile.id}
                if describe:
                    fields = describe.get("fields") if isinstance(describe, dict) else None
                    result["describe"] = dxfile.describe(fields)
                results.append(result)
        return {
            "results": results,
            "next": {"project": following.project, "id": following.id} if following else None,
        }

    def _get_file(self, dxid: str) -> DxFile:
        if dxid not in self.files:
            raise ApiError(404, "ResourceNotFound", f'the entity "{dxid}" could not be found')
        return self.files[dxid]

    def _file_describe(self, dxid: str, body: Json, caller: Job | None) -> Json:
        with self.lock:
            return self._get_file(dxid).describe(body.get("fields") if not body.get("defaultFields") else None)

    def _file_download(self, dxid: str, body: Json, caller: Job | None) -> Json:
        with self.lock:
            dxfile = self._get_file(dxid)
            if dxfile.state != "closed":
                raise ApiError(422, "InvalidState", f"{dxid} is not in the closed state")
            if not body.get("preauthenticated"):
                return {"url": f"{self.url}/F/{dxid}/{dxfile.name}", "headers": {}, "expires": _now_ms() + 3_600_000}
            project = body.get("project")
            if project is None:
                raise ApiError(400, "InvalidInput", "project must be given for a preauthenticated download URL")
            if project != dxfile.project and not (caller is not None and project == caller.workspace):
                raise ApiError(404, "ResourceNotFound", f'"{dxid}" is not in the project "{project}"')
            duration = body.get("duration", 86400)
            if not isinstance(duration, int) or duration <= 0:
                raise ApiError(400, "InvalidInput", "duration must be a positive integer")
            lifetime = duration if self.url_lifetime is None else min(duration, self.url_lifetime)
            token = secrets.token_urlsafe(24)
            expires = time.time() + lifetime
            self.preauthenticated[token] = (dxid, expires)
            name = body.get("filename") or dxfile.name
        return {"url": f"{self.url}/F/D/{token}/{name}", "headers": {}, "expires": int(expires * 1000)}

    def download_bytes(self, token_or_id: str, preauthenticated: bool) -> tuple[str, bytes] | str:
        """(file ID, data) of a download, or why it is refused (an expired or unknown URL)."""
        with self.lock:
            dxid = token_or_id
            if preauthenticated:
                grant = self.preauthenticated.get(token_or_id)
                if grant is None:
                    return "the download URL is not valid"
                dxid, expires = grant
                if time.time() >= expires:
                    return "the download URL has expired"
            dxfile = self.files.get(dxid)
            if dxfile is None or dxfile.state != "closed":
                return "the file is not available"
            return dxid, dxfile.data

    def count_served(self, dxid: str, byte_range: str | None, sent: int) -> None:
        """Count ``sent`` bytes of a file; a request's first call names the range it asked for."""
        with self.lock:
            if byte_range is not None:
                self.downloads.append((dxid, byte_range))
            self.served[dxid] = self.served.get(dxid, 0) + sent

    def _file_new(self, body: Json, caller: Job | None) -> Json:
        with self.lock:
            nonce = body.get("nonce")
            if nonce and nonce in self.nonces:
                return {"id": self.nonces[nonce]}
            project = body.get("project") or (caller.workspace if caller else self.project)
            if project not in self.projects:
                raise ApiError(404, "ResourceNotFound", f'the entity "{project}" could not be found')
            folder = body.get("folder", "/")
            if (project, folder) not in self.folders and not body.get("parents"):
                raise ApiError(404, "ResourceNotFound", f"the folder {folder} could not be found in {project}")
            self._mkdir(project, folder)
            dxfile = DxFile(new_id("file"), project, body.get("name") or "untitled", folder)
            dxfile.properties.update(body.get("properties") or {})
            dxfile.tags += body.get("tags") or []
            self.files[dxfile.id] = dxfile
            if nonce:
                self.nonces[nonce] = dxfile.id
            return {"id": dxfile.id}

    def _file_upload(self, dxid: str, body: Json, caller: Job | None) -> Json:
        with self.lock:
            if self._get_file(dxid).state != "open":
                raise ApiError(422, "InvalidState", f"{dxid} is not open")
        index = int(body.get("index", 1))
        headers = {"content-md5": body.get("md5", ""), "content-length": str(body.get("size", 0))}
        return {"url": f"{self.url}/U/{dxid}/{index}", "headers": headers, "expires": _now_ms() + 3_600_000}

    def put_part(self, dxid: str, index: int, data: bytes, md5: str | None) -> None:
        if md5 and hashlib.md5(data).hexdigest() != md5:
            raise ApiError(400, "InvalidInput", "the part's MD5 does not match")
        with self.lock:
            dxfile = self._get_file(dxid)
            if dxfile.state != "open":
                raise ApiError(422, "InvalidState", f"{dxid} is not open")
            dxfile.parts[index] = data

    def _file_close(self, dxid: str, body: Json, caller: Job | None) -> Json:
        with self.lock:
            dxfile = self._get_file(dxid)
            if dxfile.state == "open":
                dxfile.data = b"".join(dxfile.parts[i] for i in sorted(dxfile.parts))
                dxfile.state = "closed"
            return {"id": dxid}

    def _file_setProperties(self, dxid: str, body: Json, caller: Job | None) -> Json:
        with self.lock:
            properties = self._get_file(dxid).properties
            for key, value in body.get("properties", {}).items():
                if value is None:
                    properties.pop(key, None)
                else:
                    properties[key] = str(value)
            return {"id": dxid}

    def _file_addTags(self, dxid: str, body: Json, caller: Job | None) -> Json:
        with self.lock:
            dxfile = self._get_file(dxid)
            dxfile.tags += [tag for tag in body.get("tags", []) if tag not in dxfile.tags]
            return {"id": dxid}

    def _project_describe(self, dxid: str, body: Json, caller: Job | None) -> Json:
        with self.lock:
            if dxid not in self.projects:
                raise ApiError(404, "ResourceNotFound", f'the entity "{dxid}" could not be found')
            return {
                "id": dxid,
                "class": dxid.split("-", 1)[0],
                "name": self.projects[dxid],
                "level": "ADMINISTER",
                "region": "aws:us-east-1",
                "billTo": "user-test",
                "fileUploadParameters": UPLOAD_PARAMETERS,
                "folders": sorted(folder for project, folder in self.folders if project == dxid),
            }

    _container_describe = _project_describe

    def _project_newFolder(self, dxid: str, body: Json, caller: Job | None) -> Json:
        with self.lock:
            self._mkdir(dxid, body["folder"])
            return {"id": dxid}

    def _applet_describe(self, dxid: str, body: Json, caller: Job | None) -> Json:
        with self.lock:
            if dxid not in self.applets:
                raise ApiError(404, "ResourceNotFound", f'the entity "{dxid}" could not be found')
            return self.applets[dxid].describe()

    def _applet_run(self, dxid: str, body: Json, caller: Job | None) -> Json:
        with self.lock:
            self.run_requests += 1
            if dxid not in self.applets:
                raise ApiError(404, "ResourceNotFound", f'the entity "{dxid}" could not be found')
            nonce = body.get("nonce")
            if nonce and nonce in self.nonces:
                return {"id": self.nonces[nonce]}
            project = body.get("project") or self.project
            job = self._create_job(
                applet=dxid,
                function="main",
                job_input=body.get("input", {}),
                project=project,
                folder=body.get("folder", "/"),
                name=body.get("name") or self.applets[dxid].name,
                parent=None,
            )
            job.properties.update(body.get("properties") or {})
            if nonce:
                self.nonces[nonce] = job.id
            hold = self._held_runs > 0
            if hold:
                self._held_runs -= 1
        if hold:
            self.run_created.set()
            self.release_runs.wait(timeout=60)
        return {"id": job.id}

    def _job_new(self, body: Json, caller: Job | None) -> Json:
        if caller is None:
            raise ApiError(401, "PermissionDenied", "/job/new needs a job token")
        with self.lock:
            nonce = body.get("nonce")
            if nonce and nonce in self.nonces:
                return {"id": self.nonces[nonce]}
            job = self._create_job(
                applet=caller.applet,
                function=body["function"],
                job_input=body.get("input", {}),
                project=caller.project,
                folder=caller.folder,
                name=body.get("name") or f"{caller.name}:{body['function']}",
                parent=caller.id,
                workspace=caller.workspace,
                root=caller.root,
            )
            if nonce:
                self.nonces[nonce] = job.id
            return {"id": job.id}

    def _job_describe(self, dxid: str, body: Json, caller: Job | None) -> Json:
        with self.lock:
            if dxid not in self.jobs:
                raise ApiError(404, "ResourceNotFound", f'the entity "{dxid}" could not be found')
            return self.jobs[dxid].describe()

    # --- jobs ------------------------------------------------------------------------------

    def _create_job(
        self,
        *,
        applet: str,
        function: str,
        job_input: Json,
        project: str,
        folder: str,
        name: str,
        parent: str | None,
        workspace: str | None = None,
        root: str | None = None,
    ) -> Job:
        job = Job(
            id=new_id("job"),
            applet=applet,
            function=function,
            input=job_input,
            project=project,
            folder=folder,
            name=name,
            workspace=workspace or self.new_project(f"workspace of {name}", "container"),
            token="job-token-" + secrets.token_hex(12),
            parent=parent,
        )
        job.root = root or job.id
        self.jobs[job.id] = job
        self._schedule()
        return job

    def _resolve(self, value: Any) -> tuple[bool, Any]:
        """(ready, value with job-based references replaced by the job's output)."""
        if isinstance(value, dict):
            link = value.get("$dnanexus_link")
            if isinstance(link, dict) and "job" in link:
                job = self.jobs[link["job"]]
                if job.state == "failed":
                    raise _DependencyFailed(job)
                if job.state != "done" or job.output is None:
                    return False, value
                return True, job.output[link["field"]]
            ready = True
            out: Json = {}
            for key, inner in value.items():
                ok, out[key] = self._resolve(inner)
                ready = ready and ok
            return ready, out
        if isinstance(value, list):
            items = [self._resolve(inner) for inner in value]
            return all(ok for ok, _ in items), [inner for _, inner in items]
        return True, value

    def _schedule(self) -> None:
        """Start jobs whose input is ready; finish jobs whose output became ready."""
        with self.lock:
            changed = True
            while changed:
                changed = self._schedule_once()

    def _schedule_once(self) -> bool:
        changed = False
        for job in list(self.jobs.values()):
            before = job.state
            try:
                if job.state == "idle":
                    ready, resolved = self._resolve(job.input)
                    if ready:
                        job.resolved_input = resolved
                        job.state = "runnable"
                        thread = threading.Thread(target=self._run_job, args=(job,), daemon=True)
                        self._threads.append(thread)
                        thread.start()
                elif job.state == "waiting_on_output":
                    ready, resolved = self._resolve(job.output)
                    if ready:
                        job.output = resolved
                        self._finish(job)
            except _DependencyFailed as failed:
                job.state = "failed"
                job.failure_reason = failed.job.failure_reason
                job.failure_message = failed.job.failure_message
            changed = changed or job.state != before
        return changed

    def _finish(self, job: Job) -> None:
        # The platform clones a root job's output files into its project and output folder.
        if job.parent is None:
            for value in _links(job.output):
                dxfile = self.files.get(value)
                if dxfile is not None:
                    dxfile.project, dxfile.folder = job.project, job.folder
                    self._mkdir(job.project, job.folder)
        job.state = "done"

    def _run_job(self, job: Job) -> None:
        with self.lock:
            job.tries += 1
            injected = self._fail_jobs.pop(0) if self._fail_jobs and job.parent is None else None
            job.state = "running"
            applet = self.applets[job.applet]
        if injected is not None:
            self._end_job(job, None, {"error": {"type": injected[0], "message": injected[1]}}, state=injected[2])
            return
        home = self.work / "jobs" / job.id
        home.mkdir(parents=True)
        (home / "job_input.json").write_text(json.dumps(job.resolved_input))
        env = {
            **os.environ,
            **self.job_env,
            **self.env(token=job.token),
            "HOME": str(home),
            "DX_JOB_ID": job.id,
            "DX_WORKSPACE_ID": job.workspace,
            "DX_PROJECT_CONTEXT_ID": job.project,
            "DX_USER_CONF_DIR": str(home / ".dnanexus_config"),
            "DX_RUN_DETACH": "1",
        }
        with (home / "job.log").open("wb") as log:
            completed = subprocess.run(
                [self.python, str(applet.script)],
                cwd=home,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                check=False,
                timeout=300,
            )
        output = _read_json(home / "job_output.json")
        error = _read_json(home / "job_error.json")
        if completed.returncode != 0 and error is None:
            error = {"error": {"type": "AppInternalError", "message": f"exit status {completed.returncode}"}}
        self._end_job(job, output, error)

    def _end_job(self, job: Job, output: Json | None, error: Json | None, *, state: str = "failed") -> None:
        with self.lock:
            if error is not None:
                job.state = state
                job.failure_reason = error["error"]["type"]
                job.failure_message = error["error"]["message"]
            else:
                job.output = output or {}
                job.state = "waiting_on_output"
            self._schedule()


class _DependencyFailed(Exception):
    def __init__(self, job: Job) -> None:
        super().__init__(job.id)
        self.job = job


class _FaultError(Exception):
    def __init__(self, fault: Fault) -> None:
        super().__init__(fault.kind)
        self.fault = fault


def _links(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        link = value.get("$dnanexus_link")
        if isinstance(link, str):
            yield link
        elif isinstance(link, dict) and "id" in link:
            yield link["id"]
        else:
            for inner in value.values():
                yield from _links(inner)
    elif isinstance(value, list):
        for inner in value:
            yield from _links(inner)


def _read_json(path: Path) -> Json | None:
    try:
        value: Json = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    return value


class _Handler(BaseHTTPRequestHandler):
    api: Emulator
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        with self.api.lock:
            self.api.connections.add(self.connection)

    def finish(self) -> None:
        with self.api.lock:
            self.api.connections.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _reply(self, status: int, body: bytes, content_type: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, value: Json, extra: dict[str, str] | None = None) -> None:
        self._reply(status, json.dumps(value).encode(), "application/json", extra)

    def _error(self, status: int, kind: str, message: str, extra: dict[str, str] | None = None) -> None:
        self._json(status, {"error": {"type": kind, "message": message}}, extra)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_POST(self) -> None:
        raw = self._body()
        auth = self.headers.get("Authorization", "")
        token = auth.split(" ", 1)[1] if auth.startswith("Bearer ") else None
        try:
            body = json.loads(raw) if raw else {}
            self._json(200, self.api.handle(self.path, body, token))
        except _FaultError as fault:
            extra = {"Retry-After": str(fault.fault.retry_after)} if fault.fault.retry_after is not None else None
            self._error(fault.fault.status, fault.fault.kind, f"injected {fault.fault.status}", extra)
        except ApiError as error:
            self._error(error.status, error.kind, error.message)

    def do_HEAD(self) -> None:
        self._download(head=True)

    def do_GET(self) -> None:
        self._download(head=False)

    def _download(self, *, head: bool) -> None:
        match = re.match(r"\A/F/(?:D/([A-Za-z0-9_-]+)|(file-[0-9A-Za-z]{24}))(?:/[^?]*)?\Z", self.path)
        if match is None:
            self._error(404, "ResourceNotFound", self.path)
            return
        found = self.api.download_bytes(match.group(1) or match.group(2), match.group(1) is not None)
        if isinstance(found, str):
            # The platform's download servers refuse an expired URL with 403 and a short reason.
            self._reply(403 if match.group(1) else 404, found.encode(), "text/plain")
            return
        dxid, data = found
        extra = {"Accept-Ranges": "bytes", "ETag": f'"{dxid}"'}
        asked = self.headers.get("Range", "")
        ranged = re.match(r"\Abytes=(\d*)-(\d*)\Z", asked)
        ignored = match.group(1) is not None and not self.api.preauthenticated_ranges
        if ranged is None or ranged.group(1) == ranged.group(2) == "" or ignored:
            body, status = data, 200
        else:
            if ranged.group(1) == "":  # the last N bytes
                start, end = max(len(data) - int(ranged.group(2)), 0), len(data) - 1
            else:
                start = int(ranged.group(1))
                end = min(int(ranged.group(2)) if ranged.group(2) else len(data) - 1, len(data) - 1)
            if start >= len(data) or start > end:
                self._reply(416, b"", "text/plain", {"Content-Range": f"bytes */{len(data)}"})
                return
            body, status = data[start : end + 1], 206
            extra["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        for key, value in extra.items():
            self.send_header(key, value)
        self.end_headers()
        self.api.count_served(dxid, asked, 0)
        if not head:
            # Small writes into a small send buffer: what counts is what a reader took before
            # it closed (samtools reads a header from an unbounded request, then hangs up).
            # Each chunk is counted before it is written, so a reader that has it sees it counted.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _CHUNK)
            for start in range(0, len(body), _CHUNK):
                chunk = body[start : start + _CHUNK]
                self.api.count_served(dxid, None, len(chunk))
                try:
                    self.wfile.write(chunk)
                except ConnectionError:
                    self.api.count_served(dxid, None, -len(chunk))
                    break

    def do_PUT(self) -> None:
        data = self._body()
        match = re.match(r"\A/U/(file-[0-9A-Za-z]{24})/(\d+)\Z", self.path)
        if match is None:
            self._error(404, "ResourceNotFound", self.path)
            return
        try:
            self.api.put_part(match.group(1), int(match.group(2)), data, self.headers.get("content-md5"))
        except ApiError as error:
            self._error(error.status, error.kind, error.message)
            return
        self._reply(200, b"", "text/plain")
