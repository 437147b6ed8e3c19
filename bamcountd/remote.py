"""The HTTP boundary: nothing else in bamcountd talks to an object store.

samtools (htslib's libcurl, S3 and GCS plugins) reads the records; this module does what
htslib cannot be asked for: what identifies the object (its size, ETag, Last-Modified), its
first and last bytes (magic and EOF marker, before any samtools runs), whether the server
honours Range requests (htslib needs them to read a region, and some servers answer a range
with the whole file), and the index, fetched once into the count's private folder.

``s3://`` and ``gs://`` are reached as htslib reaches them: S3 at ``HTS_S3_HOST`` (default
``s3.amazonaws.com``), path- or host-style (``HTS_S3_ADDRESS_STYLE``), signed (AWS Signature
Version 4) with the keys of ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``
or of ``~/.aws/credentials`` (``AWS_PROFILE``), else unsigned; GCS at
``BUCKET.storage-download.googleapis.com`` with ``GCS_OAUTH_TOKEN`` as the bearer token when
set.  Proxies come from the usual variables (``https_proxy``...), as for libcurl.  Transient
failures (a dropped connection, a body shorter than its Content-Length, 5xx, 429) are tried
again a bounded number of times; 401/403 and 404 are not.
"""

from __future__ import annotations

import configparser
import datetime
import hashlib
import hmac
import http.client
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

from bamcountd.errors import RemoteAccessDenied, RemoteChanged, RemoteNotFound, RemoteUnavailable, RemoteUnsupported
from bamcountd.urls import ATTEMPTS, ObjectInfo, Url, pause, redact

_TIMEOUT = 30.0
_CONTENT_RANGE = re.compile(r"\Abytes ([0-9]+)-([0-9]+)/([0-9]+)\Z")
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class Probe:
    """An object's identity, its first bytes and its last bytes."""

    info: ObjectInfo
    head: bytes
    tail: bytes


class _Response:
    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body


def probe(url: Url, *, head: int = 65536, tail: int = 64) -> Probe:
    """The object's identity, its first ``head`` and last ``tail`` bytes, by two range
    requests; checks the server honours them.

    :raises RemoteNotFound: 404
    :raises RemoteAccessDenied: 401 or 403
    :raises RemoteUnsupported: the server answers a range with the whole object
    :raises RemoteUnavailable: transient failures, tried :data:`ATTEMPTS` times
    """
    first = _ranged(url, f"bytes=0-{head - 1}")
    info, start, _ = _identity(url, first, asked=head)
    if start != 0:
        raise RemoteUnsupported(f"{url}: the server answered the first bytes with bytes from {start}")
    if info.size <= head:
        return Probe(info, first.body, first.body[-tail:])
    last = _ranged(url, f"bytes={info.size - tail}-{info.size - 1}")
    again, start, _ = _identity(url, last, asked=tail)
    if again.size != info.size or start != info.size - tail:
        raise RemoteUnsupported(f"{url}: the server answered a range request for the last bytes with other bytes")
    return Probe(info, first.body, last.body)


def identify(url: Url) -> ObjectInfo:
    """The object's identity now (one byte's range request).

    :raises RemoteAccessDenied, RemoteNotFound, RemoteUnavailable: as :func:`probe`
    """
    info, _, _ = _identity(url, _ranged(url, "bytes=0-0"), asked=1)
    return info


def fetch(url: Url, out: Path, *, limit: int = 1 << 30) -> ObjectInfo:
    """Download the whole object into ``out`` (written atomically), checked against its
    Content-Length; an index is small, so it is read into memory.

    :raises RemoteNotFound: 404
    :raises RemoteAccessDenied: 401 or 403
    :raises RemoteUnavailable: transient failures, tried :data:`ATTEMPTS` times, or too large
    """
    response = _request(url, {})
    length = response.headers.get("Content-Length")
    if len(response.body) > limit:
        raise RemoteUnavailable(f"{url}: the object is larger than {limit} bytes, too large for an index")
    if response.status == 206:
        raise RemoteUnsupported(f"{url}: the server answered a request for the whole object with part of it")
    partial = out.with_name(f".{out.name}.{os.getpid()}.part")
    try:
        partial.write_bytes(response.body)
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return ObjectInfo(
        size=int(length) if length is not None and length.isdigit() else len(response.body),
        etag=response.headers.get("ETag"),
        last_modified=response.headers.get("Last-Modified"),
    )


def fetch_ranges(url: Url, ranges: tuple[tuple[int, int], ...], out: Path, *, info: ObjectInfo) -> None:
    """Download the bytes ``[first, end)`` of each range, in order, into ``out``, by range
    requests of at most :data:`_RANGE_CHUNK` bytes, each checked to be of the object ``info``.

    :raises RemoteChanged: the object is not ``info`` any more
    :raises RemoteNotFound, RemoteAccessDenied, RemoteUnavailable, RemoteUnsupported: as :func:`probe`
    """
    with open(out, "wb") as handle:
        for first, end in ranges:
            at = first
            while at < end:
                stop = min(end, at + _RANGE_CHUNK)
                response = _ranged(url, f"bytes={at}-{stop - 1}")
                now, start, last = _identity(url, response, asked=stop - at)
                if now != info:
                    raise RemoteChanged(f"{url}: the object changed during the count")
                if (start, last) != (at, stop - 1):
                    raise RemoteUnsupported(f"{url}: the server answered bytes {at}-{stop - 1} with {start}-{last}")
                handle.write(response.body)
                at = stop


#: The most one range request of fetch_ranges asks for (a response is held in memory).
_RANGE_CHUNK = 8 << 20


def _ranged(url: Url, byte_range: str) -> _Response:
    return _request(url, {"Range": byte_range})


def _identity(url: Url, response: _Response, *, asked: int) -> tuple[ObjectInfo, int, int]:
    """(identity, first byte, last byte) of a ranged response."""
    etag, modified = response.headers.get("ETag"), response.headers.get("Last-Modified")
    if response.status == 206:
        match = _CONTENT_RANGE.match(response.headers.get("Content-Range", "").strip())
        if match is None:
            raise RemoteUnsupported(f"{url}: the server's partial answer has no usable Content-Range header")
        start, end, size = (int(group) for group in match.groups())
        if len(response.body) != end - start + 1:
            raise RemoteUnavailable(
                f"{url}: the server sent {len(response.body)} bytes for a range of {end - start + 1}"
            )
        return ObjectInfo(size, etag, modified), start, end
    # 200: the whole object.  Only an object no larger than the range asked for may answer so.
    if len(response.body) > asked:
        raise RemoteUnsupported(
            f"{url}: the server ignores Range requests (it sent the whole object, {len(response.body)} bytes, for "
            f"{asked}); samtools needs them to read regions"
        )
    return ObjectInfo(len(response.body), etag, modified), 0, len(response.body) - 1


def _request(url: Url, headers: dict[str, str]) -> _Response:
    """One GET, tried again on transient failures."""
    problem = ""
    region: str | None = None  # an S3 bucket's own, once its endpoint has named it
    for attempt in range(ATTEMPTS):
        if attempt:
            time.sleep(pause(attempt))
        target, signed = _http_request(url, headers, region=region)
        request = urllib.request.Request(target, headers=signed, method="GET")
        try:
            # A new opener each time: it reads the proxy variables now, as libcurl does.
            with urllib.request.build_opener().open(request, timeout=_TIMEOUT) as answer:
                body = answer.read()
                return _Response(answer.status, answer.headers, body)
        except urllib.error.HTTPError as error:
            said = _server_words(error)
            error.close()
            named = error.headers.get("x-amz-bucket-region") if error.headers is not None else None
            if error.code in (301, 307, 400) and named and named != region and url.scheme.startswith("s3"):
                region, problem = named, f"HTTP {error.code} (the bucket is in {named})"
                continue  # signed for another region: sign for the bucket's, as htslib does
            if error.code in (401, 403):
                raise RemoteAccessDenied(
                    f"{url}: access denied (HTTP {error.code}): the URL has expired or its credentials are refused"
                    + (f" (the server said: {said})" if said else "")
                ) from None
            if error.code in (404, 410):
                raise RemoteNotFound(f"{url}: no such object (HTTP {error.code})") from None
            if error.code not in _TRANSIENT_STATUS:
                raise RemoteUnavailable(f"{url}: the server answered HTTP {error.code}") from None
            problem = f"HTTP {error.code}"
        except http.client.IncompleteRead as error:
            problem = f"the body ended after {len(error.partial)} bytes, short of its Content-Length"
        except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
            reason = error.reason if isinstance(error, urllib.error.URLError) else error
            problem = f"{type(reason).__name__}: {reason}" if not isinstance(reason, str) else reason
    raise RemoteUnavailable(f"{url}: {redact(problem)} ({ATTEMPTS} tries)")  # a reason may quote the URL


def _server_words(error: urllib.error.HTTPError) -> str:
    """The start of an error's body, on one line and redacted, if it is short plain text."""
    if not (error.headers.get("Content-Type") or "").startswith("text/plain"):
        return ""  # XML or HTML documents would only add noise
    try:
        text = error.read(200).decode("utf-8", "replace")
    except (OSError, http.client.HTTPException):
        return ""
    return redact(" ".join(text.split()))


# --- where an s3:// or gs:// object is, and how a request for it is signed ------------------


def _http_request(url: Url, headers: dict[str, str], *, region: str | None = None) -> tuple[str, dict[str, str]]:
    """The http(s) URL of ``url`` and the headers of a GET of it (an S3 GET signed for
    ``region``, by default the environment's)."""
    scheme = url.scheme
    if scheme in ("http", "https"):
        return url.secret, dict(headers)
    parts = urlsplit(url.secret)
    transport = "http" if scheme.endswith("+http") else "https"
    bucket, key = parts.netloc, parts.path
    if scheme.startswith("gs"):  # where htslib's GCS plugin reads from
        target = urlunsplit((transport, f"{bucket}.storage-download.googleapis.com", key, parts.query, ""))
        token = os.environ.get("GCS_OAUTH_TOKEN")
        return target, {**headers, **({"Authorization": f"Bearer {token}"} if token else {})}
    host = os.environ.get("HTS_S3_HOST") or "s3.amazonaws.com"
    path_style = os.environ.get("HTS_S3_ADDRESS_STYLE", "").lower() == "path" or "." in bucket
    if path_style:
        netloc, path = host, f"/{bucket}{key}"
    else:
        netloc, path = f"{bucket}.{host}", key or "/"
    path = quote(path, safe="/~")
    target = urlunsplit((transport, netloc, path, parts.query, ""))
    credentials = _s3_credentials()
    if credentials is None:
        return target, dict(headers)
    return target, {**headers, **_sign_v4(netloc, path, parts.query, credentials, region=region)}


def _s3_credentials() -> tuple[str, str, str | None] | None:
    """(key id, secret, session token) from the environment, else ``~/.aws/credentials``."""
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        return key, secret, os.environ.get("AWS_SESSION_TOKEN") or None
    path = os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or os.path.expanduser("~/.aws/credentials")
    config = configparser.ConfigParser()
    try:
        config.read(path)
    except configparser.Error:
        return None
    profile = os.environ.get("HTS_S3_PROFILE") or os.environ.get("AWS_PROFILE") or "default"
    if not config.has_option(profile, "aws_access_key_id") or not config.has_option(profile, "aws_secret_access_key"):
        return None
    token = config.get(profile, "aws_session_token", fallback=None)
    return config.get(profile, "aws_access_key_id"), config.get(profile, "aws_secret_access_key"), token


def _sign_v4(
    host: str, path: str, query: str, credentials: tuple[str, str, str | None], *, region: str | None
) -> dict[str, str]:
    """The headers of an AWS Signature Version 4 GET (payload unsigned, as htslib sends it)."""
    key, secret, token = credentials
    region = region or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
    now = datetime.datetime.now(datetime.UTC)
    stamp, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
    signed_headers = {"host": host, "x-amz-content-sha256": "UNSIGNED-PAYLOAD", "x-amz-date": stamp}
    if token:
        signed_headers["x-amz-security-token"] = token
    names = ";".join(sorted(signed_headers))
    canonical_query = "&".join(sorted(query.split("&"))) if query else ""
    canonical = "\n".join(
        [
            "GET",
            path,
            canonical_query,
            "".join(f"{name}:{signed_headers[name]}\n" for name in sorted(signed_headers)),
            names,
            "UNSIGNED-PAYLOAD",
        ]
    )
    scope = f"{day}/{region}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    signing = f"AWS4{secret}".encode()
    for part in (day, region, "s3", "aws4_request"):
        signing = hmac.new(signing, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(signing, to_sign.encode(), hashlib.sha256).hexdigest()
    authorization = f"AWS4-HMAC-SHA256 Credential={key}/{scope}, SignedHeaders={names}, Signature={signature}"
    headers = {name: value for name, value in signed_headers.items() if name != "host"}
    return {**headers, "Authorization": authorization}
