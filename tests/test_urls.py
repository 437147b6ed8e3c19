"""BAM and CRAM counted over URLs: a Range-capable HTTP server with fault modes on loopback, an
S3 API server on loopback (moto's), and gs:// through a loopback proxy, all read by samtools'
own htslib.  Every count equals the local file's and ``samtools view -c`` on the same URL;
every fault is an error and no number; no secret shows anywhere; nothing is written into the
working folder."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from bamcountd import CountRequest, Filters, count_bam_sync, remote, urls
from bamcountd import samtools as st
from bamcountd.cli import main
from bamcountd.errors import (
    CorruptBam,
    IndexMissing,
    RemoteAccessDenied,
    RemoteNotFound,
    RemoteUnavailable,
    RemoteUnsupported,
)
from bamcountd.synth import tricky_bam
from bamcountd.urls import HIDDEN, Url, redact
from devtools.object_server import (
    BUCKET_REGION,
    DROP,
    ERROR_503,
    FORBIDDEN,
    IGNORE_RANGE,
    NOT_FOUND,
    SHORT,
    SLOW,
    WRONG_REGION,
    Fault,
    Server,
    serve,
)
from tests.support.bams import FILTER_CASES, header_names, oracle, samtools_count, write_cram

SECRET = "sig-5ec2e7-0123456789abcdef"
S3_SECRET = "s3-secret-key-0123456789abcdef"
GCS_TOKEN = "ya29.gcs-token-0123456789abcdef"
SHARDS = 100  # small shards: many range requests per count


@pytest.fixture(autouse=True)
def _short_pauses(monkeypatch: pytest.MonkeyPatch) -> None:
    # The same tries, with pauses too short to slow the suite.
    monkeypatch.setattr(urls, "BACKOFF", (0.01, 0.02))


@pytest.fixture(scope="session")
def objects(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the servers serve: a BAM and a CRAM with their indexes, one BAM without, and a
    BAM cut short."""
    folder = tmp_path_factory.mktemp("objects")
    bam = tricky_bam(folder, reads=3000, unplaced=60, seed=11, name="x.bam")
    write_cram(bam, folder / "x.cram", reference=None, slice_reads=500)
    bare = folder / "bare.bam"
    shutil.copy(bam, bare)
    data = bam.read_bytes()
    (folder / "short.bam").write_bytes(data[: len(data) * 2 // 3])
    return folder


@pytest.fixture
def server(objects: Path) -> Iterator[Server]:
    with serve(objects) as running:
        yield running


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The working folder of the test: bamcountd must leave nothing in it (htslib would drop
    the indexes it downloads there)."""
    folder = tmp_path / "work"
    folder.mkdir()
    monkeypatch.chdir(folder)
    yield folder
    assert sorted(path.name for path in folder.iterdir()) == []


@pytest.fixture
def oracle_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "oracle"  # samtools itself may drop an index where it runs
    folder.mkdir()
    return folder


def _rows(result: object) -> dict[str, int]:
    return {row.region: row.count for row in result.regions}  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", ["x.bam", "x.cram"])
@pytest.mark.parametrize("case", FILTER_CASES)
def test_a_url_counts_as_its_local_file_and_samtools(
    server: Server, objects: Path, workdir: Path, oracle_dir: Path, name: str, case: str
) -> None:
    args, filters = FILTER_CASES[case]
    url = server.url(name)
    by_url = count_bam_sync(CountRequest(bam=Url(url), filters=filters, min_shard_reads=SHARDS))
    local = count_bam_sync(CountRequest(bam=objects / name, filters=filters, min_shard_reads=SHARDS))
    names = [*header_names(objects / name), "*"]
    assert _rows(by_url) == _rows(local) == oracle(objects / name, names, args)
    assert by_url.total == local.total == samtools_count(url, *args, cwd=oracle_dir) > 0
    assert by_url.shards > len(names)
    assert by_url.verification in ("index", "records")
    assert by_url.object is not None and by_url.object.size == (objects / name).stat().st_size
    assert by_url.object.etag and by_url.object.last_modified
    assert str(by_url.index_url) == url + (".crai" if name.endswith(".cram") else ".bai")


def test_ranges_bed_and_an_index_url_on_a_presigned_url(
    server: Server, objects: Path, workdir: Path, oracle_dir: Path, tmp_path: Path
) -> None:
    server.token = ("X-Amz-Signature", SECRET)
    url = server.url("x.bam", f"X-Amz-Expires=600&X-Amz-Signature={SECRET}")
    index = server.url("x.bam.bai", f"X-Amz-Signature={SECRET}")
    regions = ("{chr1}:1000-50000", "{chr2}:5000-6000", "{HLA-A*01:01:01:01}", "*")
    args = ("-F", "0x904", "-q", "20")
    result = count_bam_sync(
        CountRequest(bam=Url(url), index=Url(index), regions=regions, filters=Filters(exclude_flags=0x904, min_mapq=20))
    )
    expected = oracle(objects / "x.bam", regions, args)
    assert _rows(result) == expected
    local_index = objects / "x.bam.bai"
    assert result.regions[0].count == samtools_count(url, *args, regions[0], index=local_index, cwd=oracle_dir)
    bed = tmp_path / "some.bed"
    bed.write_text("chr1\t999\t50000\nchr2\t4999\t6000\n")
    from_bed = count_bam_sync(CountRequest(bam=Url(url), index=Url(index), regions_file=bed))
    assert [row.count for row in from_bed.regions] == [
        samtools_count(objects / "x.bam", "chr1:1000-50000"),
        samtools_count(objects / "x.bam", "chr2:5000-6000"),
    ]
    assert SECRET not in repr(result) and SECRET not in json.dumps(result.as_dict())


def test_no_secret_in_any_output(
    server: Server, workdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """stdout, stderr (debug logs as JSON lines), the result file, and the error of a refused URL."""
    server.token = ("token", SECRET)
    url = server.url("x.bam", f"token={SECRET}")
    index = server.url("x.bam.bai", f"token={SECRET}")
    out = tmp_path / "result.json"
    argv = ["count", url, "--index", index, "-v", "--log-format", "json", "--min-shard-reads", str(SHARDS)]
    assert main([*argv, "--format", "json", "-o", str(out)]) == 0
    assert main([*argv, "--format", "json"]) == 0
    captured = capsys.readouterr()
    document = json.loads(captured.out)
    assert document == {**json.loads(out.read_text()), "seconds": document["seconds"]}
    assert document["bam"] == server.url("x.bam", f"token={HIDDEN}")
    assert document["index"] == server.url("x.bam.bai", f"token={HIDDEN}")
    assert document["total"] == samtools_count(Path(server.root) / "x.bam")
    assert '"shard_counted"' in captured.err  # the logs were on, and said where
    wrong = server.url("x.bam", "token=sig-wrong-0123456789")
    assert main(["count", wrong, "-v", "--log-format", "json"]) == 2
    failed = capsys.readouterr()
    assert f"{server.url('x.bam', f'token={HIDDEN}')}: access denied (HTTP 403)" in failed.err
    assert failed.out == ""
    for text in (captured.out, captured.err, out.read_text(), failed.out, failed.err):
        assert SECRET not in text and "sig-wrong" not in text


@pytest.mark.parametrize(
    ("mode", "error", "words"),
    [
        (FORBIDDEN, RemoteAccessDenied, "access denied (HTTP 403)"),
        (NOT_FOUND, RemoteNotFound, "no such object (HTTP 404)"),
        (DROP, RemoteUnavailable, "3 tries"),
        (SHORT, RemoteUnavailable, "short of its Content-Length"),
        (IGNORE_RANGE, RemoteUnsupported, "ignores Range requests"),
    ],
)
def test_a_fault_from_the_start_is_an_error_and_no_number(
    server: Server,
    workdir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    mode: str,
    error: type,
    words: str,
) -> None:
    server.fault = Fault(mode, paths=("x.bam",))
    with pytest.raises(error, match=re.escape(words)):
        count_bam_sync(CountRequest(bam=Url(server.url("x.bam"))))
    out = tmp_path / "out.tsv"
    assert main(["count", server.url("x.bam", f"sig={SECRET}"), "-o", str(out)]) in (1, 2)
    assert not out.exists()
    shown = capsys.readouterr()
    assert shown.out == "" and words in shown.err and SECRET not in shown.err


@pytest.mark.parametrize(
    ("mode", "error"),
    [
        (FORBIDDEN, RemoteAccessDenied),  # a presigned URL that expires mid-count
        (NOT_FOUND, RemoteNotFound),  # the object deleted mid-count
        (DROP, RemoteUnavailable),  # a server that keeps dropping connections
        (SHORT, RemoteUnavailable),
        (IGNORE_RANGE, RemoteUnsupported),  # a proxy put in front mid-count
    ],
)
@pytest.mark.parametrize("name", ["x.bam", "x.cram"])
def test_a_fault_mid_count_is_an_error_and_no_number(
    server: Server, workdir: Path, tmp_path: Path, mode: str, error: type, name: str
) -> None:
    # The probe (2 requests), quickcheck and the header go well; the shards' ranges do not.
    server.fault = Fault(mode, paths=(name,), after=6)
    with pytest.raises(error, match=r"http://127\.0\.0\.1:[0-9]+/x\.(bam|cram)"):
        count_bam_sync(CountRequest(bam=Url(server.url(name)), min_shard_reads=SHARDS, jobs=2))
    assert server.fault.applied > 0
    out = tmp_path / "out.json"
    server.fault = Fault(mode, paths=(name,), after=6)
    assert main(["count", server.url(name), "--min-shard-reads", str(SHARDS), "-o", str(out)]) in (1, 2)
    assert not out.exists()


@pytest.mark.parametrize("mode", [DROP, SHORT, ERROR_503])
@pytest.mark.parametrize("after", [0, 8])
def test_a_transient_failure_is_tried_again(
    server: Server, objects: Path, workdir: Path, oracle_dir: Path, mode: str, after: int
) -> None:
    server.fault = Fault(mode, paths=("x.bam",), after=after, times=1)
    result = count_bam_sync(CountRequest(bam=Url(server.url("x.bam")), min_shard_reads=SHARDS))
    assert server.fault.applied == 1
    assert result.total == samtools_count(server.url("x.bam"), cwd=oracle_dir)
    assert _rows(result) == oracle(objects / "x.bam", [*header_names(objects / "x.bam"), "*"])


def test_a_url_without_an_index_gets_one_in_the_cache(
    server: Server, objects: Path, workdir: Path, oracle_dir: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    result = count_bam_sync(CountRequest(bam=Url(server.url("bare.bam")), index_cache=cache, regions=("chr1",)))
    assert result.index is not None and result.index.parent == cache and result.index_url is None
    assert result.total == samtools_count(objects / "x.bam", "chr1")
    again = count_bam_sync(CountRequest(bam=Url(server.url("bare.bam")), index_cache=cache, regions=("chr1",)))
    assert again.index == result.index  # the same object (size, ETag, Last-Modified): the same index
    assert sorted(p.name for p in cache.iterdir()) == [result.index.name]  # the count's own folder is gone
    with pytest.raises(IndexMissing, match="has no index"):
        count_bam_sync(CountRequest(bam=Url(server.url("bare.bam")), build_index=False, index_cache=tmp_path / "c2"))


def test_a_truncated_object_is_an_error(server: Server, workdir: Path) -> None:
    with pytest.raises(CorruptBam, match="no BGZF EOF marker at its end: it is truncated"):
        count_bam_sync(CountRequest(bam=Url(server.url("short.bam"))))


def test_a_url_is_never_a_path(capsys: pytest.CaptureFixture[str], workdir: Path) -> None:
    assert main(["count", "ftp://example.org/x.bam"]) == 2
    assert "the scheme ftp:// is not one samtools reads" in capsys.readouterr().err
    assert main(["count", "http://127.0.0.1:9/x.bam"]) == 1  # nothing listens: refused, tried, reported
    err = capsys.readouterr().err
    assert "http://127.0.0.1:9/x.bam: " in err and "no such file" not in err
    assert main(["count", "x.bam", "--index", "https://example.org/"]) == 2
    assert "names no object" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "https://b.s3.amazonaws.com/k.bam?X-Amz-Credential=AKIA%2F1&X-Amz-Signature=abc&X-Amz-Expires=60",
            f"https://b.s3.amazonaws.com/k.bam?X-Amz-Credential={HIDDEN}&X-Amz-Signature={HIDDEN}"
            f"&X-Amz-Expires={HIDDEN}",
        ),
        ("https://user:pw@host/x.bam", f"https://{HIDDEN}@host/x.bam"),
        ("https://h/x.bam?token=t1#frag", f"https://h/x.bam?token={HIDDEN}#frag"),
        ("s3://bucket/x.bam", "s3://bucket/x.bam"),
        ("https://dl.dnanex.us/F/D/Zq4kXb7_s3cr3t/x.bam", f"https://dl.dnanex.us/F/D/{HIDDEN}/x.bam"),
    ],
)
def test_redact(url: str, shown: str) -> None:
    assert redact(url) == shown
    assert redact(f'[E::hts_open_format] Failed to open file "{url}" : Permission denied') == (
        f'[E::hts_open_format] Failed to open file "{shown}" : Permission denied'
    )
    assert str(Url(url)) == shown and repr(Url(url)) == f"Url({shown!r})"


def test_credentials_in_the_environment_never_show(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET)
    assert redact(f"htslib said {S3_SECRET}") == f"htslib said {HIDDEN}"


# --- s3:// on moto's S3 API server, and gs:// through a loopback proxy ---------------------------


@pytest.fixture(scope="session")
def s3_endpoint(objects: Path) -> Iterator[str]:
    """moto's S3 API on loopback, with a bucket that holds the objects."""
    import boto3  # type: ignore[import-untyped]  # the test extra's moto[server] brings it
    from moto.server import ThreadedMotoServer

    running = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    running.start()
    try:
        host, port = running.get_host_and_port()
        endpoint = f"{host}:{port}"
        client = boto3.client(
            "s3",
            endpoint_url=f"http://{endpoint}",
            aws_access_key_id="AKIATESTKEY",
            aws_secret_access_key=S3_SECRET,
            region_name="us-east-1",
        )
        client.create_bucket(Bucket="reads")
        for name in ("x.bam", "x.bam.bai", "x.cram", "x.cram.crai"):
            client.upload_file(str(objects / name), "reads", f"run1/{name}")
        yield endpoint
    finally:
        running.stop()


@pytest.mark.parametrize("name", ["x.bam", "x.cram"])
def test_s3_counts_as_the_local_file_and_samtools(
    s3_endpoint: str,
    objects: Path,
    workdir: Path,
    oracle_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    name: str,
) -> None:
    for variable, value in {
        "AWS_ACCESS_KEY_ID": "AKIATESTKEY",
        "AWS_SECRET_ACCESS_KEY": S3_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "HTS_S3_HOST": s3_endpoint,  # htslib's S3 plugin, and the probe, send requests here
        "HTS_S3_ADDRESS_STYLE": "path",
    }.items():
        monkeypatch.setenv(variable, value)
    url = f"s3+http://reads/run1/{name}"  # s3:// is the same over TLS
    args = ("-F", "0x904", "-q", "20")
    assert (
        main(["count", url, *args, "--format", "json", "-v", "--log-format", "json", "--min-shard-reads", "100"]) == 0
    )
    shown = capsys.readouterr()
    document = json.loads(shown.out)
    local = count_bam_sync(CountRequest(bam=objects / name, filters=Filters(exclude_flags=0x904, min_mapq=20)))
    assert {r["region"]: r["count"] for r in document["regions"]} == _rows(local)
    assert document["total"] == local.total == samtools_count(url, *args, cwd=oracle_dir) > 0
    assert document["object"]["size"] == (objects / name).stat().st_size and document["object"]["etag"]
    assert document["index"].startswith(url)
    assert S3_SECRET not in shown.out + shown.err


def test_gs_through_a_proxy_counts_as_the_local_file(
    objects: Path,
    tmp_path: Path,
    workdir: Path,
    oracle_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """htslib reads gs://BUCKET/KEY from BUCKET.storage-download.googleapis.com; a loopback
    proxy (the test server, as libcurl's http_proxy) answers for it.  gs+http:// is gs://
    without TLS."""
    root = tmp_path / "gcs"
    folder = root / "reads.storage-download.googleapis.com" / "run1"
    folder.mkdir(parents=True)
    for name in ("x.bam", "x.bam.bai"):
        shutil.copy(objects / name, folder / name)
    with serve(root) as proxy:
        for variable, value in {**proxy.proxy_env(), "GCS_OAUTH_TOKEN": GCS_TOKEN}.items():
            monkeypatch.setenv(variable, value)
        url = "gs+http://reads/run1/x.bam"
        assert main(["count", url, "--format", "json", "-v", "--log-format", "json"]) == 0
        shown = capsys.readouterr()
        document = json.loads(shown.out)
        assert document["total"] == samtools_count(url, cwd=oracle_dir) == samtools_count(objects / "x.bam")
        assert document["regions"] == [
            {"region": k, "count": v} for k, v in _rows(count_bam_sync(CountRequest(bam=objects / "x.bam"))).items()
        ]
        assert set(proxy.authorizations) == {f"Bearer {GCS_TOKEN}"}  # htslib's and the probe's
        assert GCS_TOKEN not in shown.out + shown.err


def test_an_error_never_leaks_what_samtools_quotes() -> None:
    """htslib quotes the URL it fails on, query and all; every error built from its stderr shows
    it redacted."""
    stderr = f'[E::hts_open_format] Failed to open file "http://h/x.bam?sig={SECRET}" : Permission denied\n'
    completed = st.Completed(("samtools", "view"), 1, b"", stderr.encode(), 0.1)
    failure = completed.describe_failure()
    assert failure is not None and f"http://h/x.bam?sig={HIDDEN}" in failure and SECRET not in failure


def test_a_proof_of_reach_is_kept_for_an_object_and_its_index(objects: Path, workdir: Path, tmp_path: Path) -> None:
    """A filtered count after an unfiltered one of the same object (URL without its query,
    size, ETag, Last-Modified) and index trusts its proof, as for a file; a new object at the
    same URL does not."""
    served = tmp_path / "served"
    served.mkdir()
    for name in ("x.bam", "x.bam.bai"):
        shutil.copy(objects / name, served / name)
    args, filters = FILTER_CASES["F904_q20"]
    names = [*header_names(objects / "x.bam"), "*"]
    cache = tmp_path / "cache"
    with serve(served) as running:
        url = Url(running.url("x.bam", f"sig={SECRET}"))
        assert count_bam_sync(CountRequest(bam=url, index_cache=cache)).verification == "index"
        again = Url(running.url("x.bam", "sig=another-signature-0123"))
        filtered = count_bam_sync(CountRequest(bam=again, index_cache=cache, filters=filters))
        assert filtered.verification == "earlier"
        assert _rows(filtered) == oracle(objects / "x.bam", names, args)
        (served / "x.bam").touch()  # a new upload of the same bytes: another Last-Modified and ETag
        os.utime(served / "x.bam", (1_000_000_000, 1_000_000_000))
        replaced = count_bam_sync(CountRequest(bam=url, index_cache=cache, filters=filters))
        assert replaced.verification == "index"  # accounted again, in full
        assert _rows(replaced) == _rows(filtered)


def test_a_server_too_slow_for_the_time_limit_is_an_error_without_secrets(
    server: Server, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server.fault = Fault(SLOW, paths=("x.bam",), after=8)  # the checks pass; the shards stall
    url = server.url("x.bam", f"sig={SECRET}")
    assert main(["count", url, "--timeout", "1", "--min-shard-reads", str(SHARDS)]) == 1
    shown = capsys.readouterr()
    assert "killed after the 1 s time limit" in shown.err and SECRET not in shown.err and shown.out == ""


def test_an_s3_probe_signs_again_for_the_region_its_endpoint_names(
    objects: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """S3 answers a request signed for another region with 400 and the bucket's region; the
    probe signs again for it (htslib does the same from the answer's body)."""
    bucket = tmp_path / "reads"
    bucket.mkdir()
    shutil.copy(objects / "x.bam", bucket / "x.bam")
    with serve(tmp_path) as running:
        running.fault = Fault(WRONG_REGION)
        for variable, value in {
            "AWS_ACCESS_KEY_ID": "AKIATESTKEY",
            "AWS_SECRET_ACCESS_KEY": S3_SECRET,
            "HTS_S3_HOST": f"127.0.0.1:{running.port}",
            "HTS_S3_ADDRESS_STYLE": "path",
        }.items():
            monkeypatch.setenv(variable, value)
        monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
        monkeypatch.delenv("AWS_REGION", raising=False)
        found = remote.probe(Url("s3+http://reads/x.bam"))
        assert found.info.size == (objects / "x.bam").stat().st_size
        assert "/us-east-1/s3/" in running.authorizations[0]
        assert f"/{BUCKET_REGION}/s3/" in running.authorizations[-1]
