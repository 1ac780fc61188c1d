"""Typed errors: one class per error code the node answers (see docs/openapi.yaml)."""

from __future__ import annotations

from typing import Any, Dict, Optional, Type


class AgentstoreError(Exception):
    """An error answer from a node, or a failure to reach one.

    ``code`` is the node's stable error code (``quorum_unavailable``, ``version_mismatch``,
    ...), ``status`` the HTTP status (0 when no node answered), ``details`` the error body's
    extra fields (``acknowledged`` and ``needed``, ``holder``, ``waited_ms``, ...).
    """

    def __init__(
        self,
        code: str,
        message: str,
        status: int = 0,
        details: Optional[Dict[str, Any]] = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status
        self.details: Dict[str, Any] = details or {}


class InvalidRequest(AgentstoreError):
    """400: a key, body, query or session token that does not parse."""


class Unauthenticated(AgentstoreError):
    """401: no token, or one that is malformed, forged or expired."""


class Forbidden(AgentstoreError):
    """403: the token does not grant this key or prefix, or a signature is refused."""


class NotFound(AgentstoreError):
    """404 for something other than a missing key (a missing key reads as ``None``)."""


class Conflict(AgentstoreError):
    """409: the call does not fit the collection or the key's state."""


class WrongOperation(Conflict):
    """The collection's conflict strategy does not support the operation."""


class VersionMismatch(Conflict):
    """A compare-and-set found the key at another version."""


class ConsistencyUnavailable(Conflict):
    """The call asks for a level the collection does not deliver; it was not weakened."""


class Unsupported(Conflict):
    """Not possible at this level (compare-and-set or batches without a leader)."""


class Siblings(Conflict):
    """A multi-value key has several values; read them with ``siblings``."""


class StaleRevision(Conflict):
    """A document edit against a revision the document has not reached, or one older than
    the edits it keeps: read the document again and redo the edit."""


class LockHeld(Conflict):
    """The lock is held by another holder (``details``: ``holder``, ``expires_at_ms``)."""


class Unavailable(AgentstoreError):
    """503: not enough replicas, no leader, or no node reachable; nothing was applied."""


class QuorumUnavailable(Unavailable):
    """Fewer than W replicas acknowledged in time: the write may spread (indeterminate)."""


class Indeterminate(Unavailable):
    """The write may or may not have been applied; read to find out."""


class SessionBehind(Unavailable):
    """The node did not catch up with the session in time; retry or ask another node."""


class DiskFull(AgentstoreError):
    """507: the node's disk is full; nothing was written."""


class PositionUnavailable(AgentstoreError):
    """A watch position this node cannot resume from (another node's, or older than the
    changes it keeps): scan the prefix again and watch from now."""


class ServerError(AgentstoreError):
    """500: the node's storage failed, or a bug."""


_BY_CODE: Dict[str, Type[AgentstoreError]] = {
    "wrong_operation": WrongOperation,
    "wrong_kind": WrongOperation,
    "version_mismatch": VersionMismatch,
    "consistency_unavailable": ConsistencyUnavailable,
    "unsupported": Unsupported,
    "siblings": Siblings,
    "lock_held": LockHeld,
    "stale_revision": StaleRevision,
    "quorum_unavailable": QuorumUnavailable,
    "indeterminate": Indeterminate,
    "session_behind": SessionBehind,
    "disk_full": DiskFull,
    "position_unavailable": PositionUnavailable,
}

_BY_STATUS: Dict[int, Type[AgentstoreError]] = {
    400: InvalidRequest,
    401: Unauthenticated,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    503: Unavailable,
    507: DiskFull,
}


def from_answer(status: int, body: Dict[str, Any]) -> AgentstoreError:
    """The typed error of an error answer (``{"error": {"code", "message", ...}}``)."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return ServerError("internal", f"an answer without an error body (HTTP {status})", status)
    code = str(error.get("code", "internal"))
    message = str(error.get("message", ""))
    details = {k: v for k, v in error.items() if k not in ("code", "message")}
    cls = _BY_CODE.get(code) or _BY_STATUS.get(status) or ServerError
    return cls(code, message, status, details)
