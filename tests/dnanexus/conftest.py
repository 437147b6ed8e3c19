from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import dxpy  # type: ignore[import-untyped]
import pytest

from devtools.dnanexus_emulator import Emulator

ROOT = Path(__file__).resolve().parents[2]
APPLET_DIR = ROOT / "dnanexus" / "bamcount"


@pytest.fixture
def emulator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Emulator]:
    """A fresh emulator; dxpy in this process and in the jobs it runs point at it."""
    with Emulator(tmp_path / "platform") as api:
        api.job_env = {"XDG_CACHE_HOME": str(tmp_path / "job-cache")}
        for key, value in api.env().items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("DX_USER_CONF_DIR", str(tmp_path / "dx-config"))
        monkeypatch.delenv("DX_JOB_ID", raising=False)
        saved = (dxpy.APISERVER_HOST, dxpy.APISERVER_PORT, dxpy.APISERVER_PROTOCOL, dxpy.SECURITY_CONTEXT)
        saved_ids = (dxpy.PROJECT_CONTEXT_ID, dxpy.WORKSPACE_ID)
        dxpy.set_api_server_info(host="127.0.0.1", port=api.port, protocol="http")
        dxpy.set_security_context({"auth_token_type": "Bearer", "auth_token": api.token})
        dxpy.set_project_context(api.project)
        dxpy.set_workspace_id(api.project)
        try:
            yield api
        finally:
            dxpy.set_api_server_info(host=saved[0], port=saved[1], protocol=saved[2])
            dxpy.set_security_context(saved[3])
            dxpy.set_project_context(saved_ids[0])
            dxpy.set_workspace_id(saved_ids[1])


@pytest.fixture
def applet(emulator: Emulator) -> str:
    """The real applet (dnanexus/bamcount) registered in the emulator's project."""
    spec = json.loads((APPLET_DIR / "dxapp.json").read_text())
    return emulator.add_applet(spec["name"], spec, APPLET_DIR / spec["runSpec"]["file"])
