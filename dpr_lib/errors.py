"""The exceptions a user can act on. CLIs print their message, not a traceback, and exit non-zero."""


class DprError(Exception):
    """Base class: every error the product raises on purpose.

    Exit codes: 1 other, 2 config, 3 input, 4 encoder, 5 incompatible index, 6 index integrity,
    7 storage, 8 nightly lock held by another run (dpr_lib.nightly.LockError), 9 accounting,
    10 executor environment, 11 quality gate (dpr_lib.gate.QualityGateError).
    """

    exit_code = 1


class ConfigError(DprError):
    """A configuration key is unknown, has the wrong type or an invalid value."""

    exit_code = 2


class InputError(DprError):
    """Input data cannot be used (wrong format, too many rejects, empty corpus, ...)."""

    exit_code = 3


class EncoderError(DprError):
    """A model directory cannot be loaded, or the encoder produced invalid vectors."""

    exit_code = 4


class IncompatibleIndexError(DprError):
    """Vectors or an index were made by another encoder fingerprint, dimension or format version."""

    exit_code = 5


class IndexIntegrityError(DprError):
    """A published version is incomplete or a file does not match its sha256 in the manifest."""

    exit_code = 6


class StorageError(DprError):
    """Object storage failed after retries, or a path is not writable."""

    exit_code = 7


class ExecutorEnvironmentError(DprError):
    """Executors cannot import what the jobs need (a packed environment missing a dependency)."""

    exit_code = 10


class AccountingError(DprError):
    """Counts that must add up do not (records, passages, embeddings, vectors): nothing was published."""

    exit_code = 9


def refused_pickle(exc: BaseException) -> str:
    """What torch's weights-only loader refused (the global a pickle tried to call), without its
    advice to load the file unsafely; else the error's first line."""
    import re

    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(exc).splitlines()]
    said = [line for line in lines if "WeightsUnpickler error" in line or "Unsupported" in line]
    return (said[0].split("WeightsUnpickler error:", 1)[-1].strip() if said else (lines or [""])[0])[:300]
