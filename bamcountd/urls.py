"""URLs of objects (``http``, ``https``, ``s3``, ``gs``) and the one rule that shows them.

A presigned URL carries its credentials in its query string (S3's ``X-Amz-Signature`` and
``X-Amz-Credential``, GCS's ``X-Goog-Signature``, DNAnexus' and others' tokens), a URL may
carry a password, and keys come from the environment.  :func:`redact` is what shows any of
them: a :class:`Url` prints itself through it, samtools' stderr passes through it before any
error quotes it, and so do the log lines and the command line's error messages.  The text
with its secrets (:attr:`Url.secret`) is handed to samtools and the HTTP client only.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

#: The schemes samtools' htslib reads (with libcurl, its S3 and its GCS plugins); ``s3+http``
#: and ``gs+http`` are htslib's own spellings for a store reached without TLS.
SCHEMES = ("http", "https", "s3", "s3+http", "s3+https", "gs", "gs+http", "gs+https")
#: What a redacted value reads as.
HIDDEN = "REDACTED"
#: Variables whose values are credentials (htslib's S3 and GCS plugins read them).
SECRET_VARIABLES = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "GCS_OAUTH_TOKEN")

#: How many times a transient failure of a URL's server is tried in all (bamcountd.remote's
#: requests, and samtools' reads of the object), and the pauses between tries.
ATTEMPTS = 3
BACKOFF = (0.25, 1.0)

_URL_START = re.compile(r"\A[A-Za-z][A-Za-z0-9+.-]*://")
# A URL inside any text: up to a space, a quote or a bracket (htslib quotes file names).
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s\"'<>()\[\]{}]+")
_QUERY_VALUE = re.compile(r"([?&;][^=&#;?\s]*=)[^&#;\s]*")
_USERINFO = re.compile(r"(://)[^/@\s]*@")
# DNAnexus' preauthenticated download URLs carry their token in the path: .../F/D/<token>/<name>.
_PATH_TOKEN = re.compile(r"(/F/D/)[^/\s]+")


def redact(text: str) -> str:
    """``text`` with every URL's query values and user information replaced, and the value of
    every credential variable set in the environment hidden; the one way a URL is shown."""
    shown = _URL_IN_TEXT.sub(_redact_match, text)
    for name in SECRET_VARIABLES:
        value = os.environ.get(name, "")
        if len(value) >= 8:  # a short value would hide ordinary words
            shown = shown.replace(value, HIDDEN)
    return shown


def _redact_match(match: re.Match[str]) -> str:
    found = match.group()
    url = found.rstrip(":,.;!?")  # the punctuation of the sentence the URL is in
    return _redact_url(url) + found[len(url) :]


def _redact_url(url: str) -> str:
    url = _USERINFO.sub(lambda match: f"{match.group(1)}{HIDDEN}@", url, count=1)
    url = _PATH_TOKEN.sub(lambda match: f"{match.group(1)}{HIDDEN}", url, count=1)
    return _QUERY_VALUE.sub(lambda match: f"{match.group(1)}{HIDDEN}", url)


def looks_like_url(text: str) -> bool:
    """True for ``scheme://...`` (any scheme: an unsupported one is refused, not read as a path)."""
    return _URL_START.match(text) is not None


@dataclass(frozen=True)
class Url:
    """An object's URL.  ``str()``, ``repr()`` and f-strings give the redacted form; only
    :attr:`secret` holds what was given."""

    secret: str = field(repr=False)

    def __post_init__(self) -> None:
        if not looks_like_url(self.secret):
            raise ValueError(f"{redact(self.secret)}: not a URL")
        if self.scheme not in SCHEMES:
            raise ValueError(f"{self}: the scheme {self.scheme}:// is not one samtools reads ({', '.join(SCHEMES)})")
        if "##idx##" in self.secret:
            raise ValueError(f"{self}: the URL contains '##idx##', which htslib reads as an index marker")
        parts = urlsplit(self.secret)
        if not parts.netloc:
            raise ValueError(f"{self}: the URL names no host or bucket")
        if not parts.path.strip("/"):
            raise ValueError(f"{self}: the URL names no object")

    def __str__(self) -> str:
        return redact(self.secret)

    def __repr__(self) -> str:
        return f"Url({str(self)!r})"

    @property
    def scheme(self) -> str:
        return self.secret.partition("://")[0].lower()

    @property
    def name(self) -> str:
        """The object's last path segment (no query): what a file name would be."""
        return urlsplit(self.secret).path.rstrip("/").rpartition("/")[2]

    @property
    def without_query(self) -> str:
        """The URL without its query string or user information: no secret, and the same for
        every presigned URL of one object (what an index cache is keyed by)."""
        parts = urlsplit(self.secret)
        host = parts.netloc.rpartition("@")[2]
        return urlunsplit((parts.scheme, host, parts.path, "", ""))

    def with_suffix_added(self, suffix: str, *, keep_query: bool) -> Url:
        """The URL of ``path + suffix`` (an index next to the object), with or without this
        URL's query string."""
        parts = urlsplit(self.secret)
        query = parts.query if keep_query else ""
        return Url(urlunsplit((parts.scheme, parts.netloc, parts.path + suffix, query, "")))

    def with_path_suffix_replaced(self, old: str, new: str, *, keep_query: bool) -> Url | None:
        """``x.bam`` -> ``x.bai``: the URL with its path's ``old`` ending replaced, or None."""
        parts = urlsplit(self.secret)
        if not parts.path.endswith(old):
            return None
        query = parts.query if keep_query else ""
        return Url(urlunsplit((parts.scheme, parts.netloc, parts.path[: -len(old)] + new, query, "")))


@dataclass(frozen=True)
class ObjectInfo:
    """What identifies an object: its size, and the ETag and Last-Modified its server gives."""

    size: int
    etag: str | None
    last_modified: str | None

    def as_dict(self) -> dict[str, Any]:
        return {"size": self.size, "etag": self.etag, "last_modified": self.last_modified}

    @property
    def key(self) -> str | None:
        """A text that changes when the object does, or None when only its size is known."""
        if self.etag is None and self.last_modified is None:
            return None
        return f"{self.size}\0{self.etag}\0{self.last_modified}"


def pause(attempt: int) -> float:
    """Seconds to wait after try ``attempt`` failed."""
    return BACKOFF[min(attempt - 1, len(BACKOFF) - 1)]
