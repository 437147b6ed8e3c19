"""One small exception class per failure.

The CLI maps the two families to exit codes: :class:`InputError` (the user must change
something: a path, a region, an option) and everything else under :class:`BamcountdError`
(the data or a tool failed).  Every message names the file and the cause in one line.
"""

from __future__ import annotations


class BamcountdError(Exception):
    """Base class of every error bamcountd raises on purpose."""


def leaf_exceptions(error: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, in order; anyio's task groups wrap what
    their tasks raise, and callers want to report the one that matters."""
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in leaf_exceptions(inner)]
    return [error]


def one_line(error: BaseException) -> str:
    """``Type: last line of the message``: what a log line or a status shows of an error."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1] if text else ''}"


# --- input errors: the user must change what they asked for -------------------------------


class InputError(BamcountdError):
    """The request cannot be carried out as given (exit status 2)."""


class BamNotFound(InputError):
    """The BAM (or index, or regions file) does not exist or cannot be read."""


class UnknownRegion(InputError):
    """A region names a reference that the BAM header does not have, or is malformed."""


class AmbiguousRegion(InputError):
    """A region could be read two ways because contig names contain ':'."""


class BadRegionsFile(InputError):
    """A BED file line cannot be parsed or names an unknown reference."""


class IndexMissing(InputError):
    """No usable index and building one was not allowed."""


class NotCoordinateSorted(InputError):
    """The BAM is not coordinate-sorted, so it cannot be indexed or queried by region."""


class BadOption(InputError):
    """An option value is out of range or contradicts another option."""


class BadReference(InputError):
    """The reference FASTA given for a CRAM is missing, unindexed, or not the CRAM's reference."""


class RemoteNotFound(InputError):
    """A URL's object (or its index) does not exist (HTTP 404)."""


class RemoteAccessDenied(InputError):
    """A URL's server refused access (HTTP 401/403): credentials refused, or a presigned URL
    that has expired, before or during the count."""


class RemoteUnsupported(InputError):
    """A URL's scheme or server cannot be counted from: one that ignores Range requests, say."""


class MissingExtra(InputError):
    """The command needs an optional dependency (an extra) that is not installed."""


# --- data errors: the file is not what it claims to be -------------------------------------


class CorruptBam(BamcountdError):
    """The BAM is truncated, corrupt or not a BAM at all."""


class IndexMismatch(BamcountdError):
    """Counts disagree with the index's own totals: the index belongs to another file."""


class PartsIncomplete(BamcountdError):
    """A scattered count's parts do not hold each shard of its plan exactly once, as planned."""


class RemoteUnavailable(BamcountdError):
    """A URL's server failed in a way worth another try (a dropped connection, a body shorter
    than its Content-Length, 5xx), after bounded retries."""


class RemoteChanged(BamcountdError):
    """A URL's object changed (size, ETag or Last-Modified) while it was counted."""


# --- tool errors: samtools could not be run or misbehaved -----------------------------------


class SamtoolsNotFound(BamcountdError):
    """No samtools executable at the given path or on PATH."""


class SamtoolsFailed(BamcountdError):
    """A samtools command exited non-zero, was killed, or wrote a warning or error."""


class SamtoolsTimeout(SamtoolsFailed):
    """A samtools command ran past its time limit and was killed."""


class SamtoolsBadOutput(SamtoolsFailed):
    """A samtools command's output could not be parsed."""


# --- service (bamcountd serve) --------------------------------------------------------------


class CohortFailed(BamcountdError):
    """One or more BAMs of a many-BAM count failed; ``failures`` holds each one and its error."""

    def __init__(self, failures: list[tuple[object, BamcountdError]]) -> None:  # (the input, its error)
        super().__init__(f"{len(failures)} of the BAMs could not be counted")
        self.failures = failures

    @property
    def input_only(self) -> bool:
        """Every failure is the input's (usage/input exit status), none the data's or a tool's."""
        return all(isinstance(error, InputError) for _, error in self.failures)


class CohortRowsDiffer(InputError):
    """The BAMs of a many-BAM count have different rows, which no matrix can hold."""


class ConfigError(InputError):
    """The daemon's configuration (flags, BAMCOUNTD_* variables or TOML file) is invalid."""


class LedgerLocked(BamcountdError):
    """Another daemon already holds the ledger in this state folder."""


# --- DNAnexus (bamcountd.dnanexus) -----------------------------------------------------------


class DxAuthFailed(InputError):
    """The DNAnexus API rejected the token (401): the user must fix the credentials."""


class DxAccessDenied(InputError):
    """The DNAnexus project, folder or applet does not exist or is not accessible."""


class DxUnavailable(BamcountdError):
    """A DNAnexus API call failed after dxpy's own retries, or the network is down: a later try
    may succeed.  The message is the cause's :func:`one_line`."""


# --- what a runner does about a failed count (the daemon, dx-watch --local, the applet job) ---

PERMANENT = "permanent"  # the input is at fault: the same bytes fail the same way; never retried
RETRY = "retry"  # a tool or the machine failed: worth another try
FATAL = "fatal"  # the runner itself cannot work (a bad option, no samtools): no input can succeed


def classify(error: BaseException) -> str:
    """:data:`PERMANENT`, :data:`RETRY` or :data:`FATAL` for the error of one count."""
    if isinstance(error, BadOption | SamtoolsNotFound | MissingExtra):
        return FATAL
    if isinstance(error, InputError | CorruptBam | IndexMismatch):
        return PERMANENT
    return RETRY
