"""The emulator's file downloads as dxpy asks for them: Range, preauthenticated URLs, bytes served."""

from __future__ import annotations

import time
import urllib.error
import urllib.request

import dxpy  # type: ignore[import-untyped]
import pytest

from devtools.dnanexus_emulator import Emulator

DATA = bytes(range(256)) * 40


def _get(url: str, byte_range: str | None = None) -> tuple[int, bytes, str | None]:
    headers = {"Range": byte_range} if byte_range else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as answer:
        return answer.status, answer.read(), answer.headers.get("Content-Range")


def test_a_preauthenticated_url_serves_ranges_and_counts_bytes(emulator: Emulator) -> None:
    dxid = emulator.add_file("x.bam", DATA)
    url, headers = dxpy.DXFile(dxid).get_download_url(preauthenticated=True, duration=3600, project=emulator.project)
    assert headers == {} and "/F/D/" in url and dxid not in url
    assert _get(url, "bytes=10-19") == (206, DATA[10:20], f"bytes 10-19/{len(DATA)}")
    assert _get(url, "bytes=-5") == (206, DATA[-5:], f"bytes {len(DATA) - 5}-{len(DATA) - 1}/{len(DATA)}")
    assert _get(url, f"bytes={len(DATA) - 3}-") == (
        206,
        DATA[-3:],
        f"bytes {len(DATA) - 3}-{len(DATA) - 1}/{len(DATA)}",
    )
    assert _get(url) == (200, DATA, None)
    assert emulator.served[dxid] == 10 + 5 + 3 + len(DATA)


def test_a_preauthenticated_url_needs_the_project_and_expires(emulator: Emulator) -> None:
    dxid = emulator.add_file("x.bam", DATA)
    with pytest.raises(dxpy.exceptions.InvalidInput, match="project must be given"):
        dxpy.api.file_download(dxid, {"preauthenticated": True, "duration": 60})
    emulator.url_lifetime = 0.3
    url, _ = dxpy.DXFile(dxid).get_download_url(preauthenticated=True, duration=3600, project=emulator.project)
    assert _get(url, "bytes=0-0")[1] == DATA[:1]
    time.sleep(0.4)
    with pytest.raises(urllib.error.HTTPError) as refused:
        _get(url, "bytes=0-0")
    assert refused.value.code == 403
    assert refused.value.read() == b"the download URL has expired"


def test_dxpy_downloads_count_as_served(emulator: Emulator, tmp_path: object) -> None:
    dxid = emulator.add_file("x.bam", DATA)
    out = f"{tmp_path}/x.bam"
    dxpy.download_dxfile(dxid, out)
    with open(out, "rb") as handle:
        assert handle.read() == DATA
    assert emulator.served[dxid] == len(DATA)
