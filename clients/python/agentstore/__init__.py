"""agentstore: a client of agentstore nodes.

>>> import agentstore
>>> client = agentstore.Client(["127.0.0.1:7001", "127.0.0.1:7002"], token=None)
>>> client.put("notes:plan", {"step": 1})           # doctest: +SKIP
>>> client.get("notes:plan", consistency="strong")  # doctest: +SKIP
"""

from .client import (
    SESSION_HEADER,
    Change,
    ChangePage,
    Client,
    Consistency,
    Entry,
    Page,
    Session,
    SiblingValues,
    Versioned,
)
from .errors import (
    AgentstoreError,
    Conflict,
    ConsistencyUnavailable,
    DiskFull,
    Forbidden,
    Indeterminate,
    InvalidRequest,
    LockHeld,
    NotFound,
    PositionUnavailable,
    QuorumUnavailable,
    ServerError,
    SessionBehind,
    Siblings,
    Unauthenticated,
    Unavailable,
    Unsupported,
    VersionMismatch,
    WrongOperation,
)

__all__ = [
    "SESSION_HEADER",
    "AgentstoreError",
    "Change",
    "ChangePage",
    "Client",
    "Conflict",
    "Consistency",
    "ConsistencyUnavailable",
    "DiskFull",
    "Entry",
    "Forbidden",
    "Indeterminate",
    "InvalidRequest",
    "LockHeld",
    "NotFound",
    "Page",
    "PositionUnavailable",
    "QuorumUnavailable",
    "ServerError",
    "Session",
    "SessionBehind",
    "SiblingValues",
    "Siblings",
    "Unauthenticated",
    "Unavailable",
    "Unsupported",
    "VersionMismatch",
    "Versioned",
    "WrongOperation",
]
