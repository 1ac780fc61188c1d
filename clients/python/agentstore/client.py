"""A client of agentstore nodes over their HTTP/JSON API (``docs/openapi.yaml``)."""

from __future__ import annotations

import http.client
import json
import ssl
import threading
import urllib.parse
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Literal, Optional, Sequence, Tuple, Union

from .errors import AgentstoreError, Indeterminate, Siblings, Unavailable, from_answer

Consistency = Literal["eventual", "causal", "strong"]
"""A consistency level a call may ask for: the stronger of it and the collection's applies."""

SESSION_HEADER = "agentstore-session"


@dataclass(frozen=True)
class Versioned:
    """A value and the version a compare-and-set names."""

    value: Any
    version: str


@dataclass(frozen=True)
class SiblingValues:
    """Every concurrent value of a multi-value key, and the context that replaces them."""

    values: List[Any]
    context: str


@dataclass(frozen=True)
class Entry:
    """A key of a scan and its value."""

    key: str
    value: Any


@dataclass(frozen=True)
class Page:
    """One page of a scan; ``next`` continues it (``None``: the last page)."""

    entries: List[Entry]
    next: Optional[str]


@dataclass(frozen=True)
class Document:
    """An ``ot_text`` document: its text and the number of edits that made it."""

    revision: int
    text: str


EditOp = List[Union[int, str]]
"""A document edit over the whole text: ``n > 0`` keeps ``n`` characters, ``-n`` deletes
``n``, a string is inserted (characters are Unicode code points)."""


@dataclass(frozen=True)
class DocumentEdits:
    """The edits applied to a document since a revision, as applied, and its revision now."""

    revision: int
    edits: List[EditOp]


@dataclass(frozen=True)
class Edited:
    """An applied edit: the document's new revision and the edit as applied (transformed past
    the edits made since the revision it was made against)."""

    revision: int
    applied: EditOp
    version: str


@dataclass(frozen=True)
class Change:
    """One change under a watched prefix: the value from then on (``None`` once deleted)."""

    position: str
    key: str
    value: Any
    deleted: bool
    version: str


@dataclass(frozen=True)
class ChangePage:
    """Changes found, and the position to ask after next."""

    changes: List[Change]
    position: str


class _Node:
    """One node's address and its keep-alive connection."""

    def __init__(self, address: str, timeout: float, tls: Optional[ssl.SSLContext]) -> None:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"a node address is host:port, not {address!r}")
        self.address = address
        self.host, self.port = host, int(port)
        self.timeout = timeout
        self.tls = tls
        self.connection: Optional[http.client.HTTPConnection] = None

    def connect(self) -> http.client.HTTPConnection:
        if self.connection is None:
            if self.tls is not None:
                self.connection = http.client.HTTPSConnection(
                    self.host, self.port, timeout=self.timeout, context=self.tls
                )
            else:
                self.connection = http.client.HTTPConnection(
                    self.host, self.port, timeout=self.timeout
                )
            self.connection.connect()
        return self.connection

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


class Client:
    """A client of one agentstore cluster.

    ``nodes`` are addresses (``host:port``) of its nodes: the client talks to the first it
    reaches and moves to the next when that one goes away. A read also moves on when a node
    stops answering within ``timeout`` seconds; a write that was sent is never sent twice (it
    raises :class:`Indeterminate` instead: it may have applied). ``token`` is a capability
    token (``Authorization: Bearer``), ``ca_file`` the authority's certificate for a node
    that speaks HTTPS (``client_tls: true``).

    Calls are serialized on one client; share one per thread.
    """

    def __init__(
        self,
        nodes: Union[str, Sequence[str]],
        token: Optional[str] = None,
        timeout: float = 15.0,
        ca_file: Optional[str] = None,
    ) -> None:
        addresses = [nodes] if isinstance(nodes, str) else list(nodes)
        addresses = [a.strip() for n in addresses for a in n.split(",") if a.strip()]
        if not addresses:
            raise ValueError("a client needs at least one node address")
        tls = ssl.create_default_context(cafile=ca_file) if ca_file else None
        self._nodes = [_Node(a, timeout, tls) for a in addresses]
        self._timeout = timeout
        self._current = 0
        self._token = token
        self._lock = threading.Lock()
        self._session: Optional[str] = None

    # Sessions ------------------------------------------------------------------------------

    def session(self, token: str = "") -> "Session":
        """A session on this client's nodes: its calls see what it saw and wrote, on any
        node (``token`` carries on a session from elsewhere)."""
        return Session(self, token)

    # Keys ----------------------------------------------------------------------------------

    def get(
        self, key: str, consistency: Optional[Consistency] = None, stale: bool = False
    ) -> Any:
        """The value of ``key`` (``None`` when it has none): an ``lww`` value, a counter's
        total, a set's members."""
        reading = self._read_key(key, consistency, stale)
        if reading is None:
            return None
        if "members" in reading:
            return reading["members"]
        if "siblings" in reading:
            values = reading["siblings"]
            if len(values) == 1:
                return values[0]
            raise Siblings("siblings", f"{key} has {len(values)} concurrent values", 409)
        return reading.get("value")

    def get_versioned(
        self, key: str, consistency: Optional[Consistency] = None
    ) -> Optional[Versioned]:
        """The ``lww`` value of ``key`` with its version, for :meth:`put`'s ``if_version``."""
        reading = self._read_key(key, consistency, False)
        if reading is None:
            return None
        return Versioned(reading.get("value"), reading.get("version", ""))

    def siblings(self, key: str) -> SiblingValues:
        """Every concurrent value of a ``multi_value`` key and the context that replaces
        them (write it back with :meth:`put`'s ``context``)."""
        reading = self._read_key(key, None, False)
        if reading is None:
            return SiblingValues([], "")
        return SiblingValues(list(reading.get("siblings", [])), reading.get("context", ""))

    def put(
        self,
        key: str,
        value: Any,
        consistency: Optional[Consistency] = None,
        if_version: Optional[str] = None,
        context: Optional[str] = None,
        ttl: Optional[float] = None,
    ) -> str:
        """Writes ``value`` (any JSON value); answers its version. ``if_version``: only if the
        key is at that version (``"absent"``: has no value), else :class:`VersionMismatch`.
        ``ttl``: the value expires that many seconds later (lww collections); writing the key
        again renews it, as a heartbeat does."""
        ttl_ms = None if ttl is None else max(1, int(ttl * 1000))
        query = _query(
            consistency=consistency, if_version=if_version, context=context, ttl_ms=ttl_ms
        )
        answer = self._call("PUT", _key_path("keys", key) + query, value, write=True)
        return str(answer["version"])

    def delete(
        self,
        key: str,
        consistency: Optional[Consistency] = None,
        if_version: Optional[str] = None,
    ) -> str:
        """Deletes ``key`` (a tombstone that replicates); answers the tombstone's version."""
        query = _query(consistency=consistency, if_version=if_version)
        answer = self._call("DELETE", _key_path("keys", key) + query, None, write=True)
        return str(answer["version"])

    # Counters and sets -------------------------------------------------------------------------

    def counter_add(
        self, key: str, delta: int, consistency: Optional[Consistency] = None
    ) -> int:
        """Adds ``delta`` to a counter; answers the new total."""
        path = _key_path("counters", key) + _query(consistency=consistency)
        return int(self._call("POST", path, {"delta": delta}, write=True)["value"])

    def counter(self, key: str, consistency: Optional[Consistency] = None) -> int:
        """A counter's total (0 when it was never changed)."""
        value = self.get(key, consistency)
        return int(value or 0)

    def set_add(self, key: str, member: Any, consistency: Optional[Consistency] = None) -> str:
        """Adds ``member`` to a ``g_set`` or ``or_set``."""
        path = _key_path("sets", key) + _query(consistency=consistency)
        return str(self._call("POST", path, {"add": member}, write=True)["version"])

    def set_remove(
        self, key: str, member: Any, consistency: Optional[Consistency] = None
    ) -> str:
        """Removes ``member`` from an ``or_set`` (a concurrent add wins)."""
        path = _key_path("sets", key) + _query(consistency=consistency)
        return str(self._call("POST", path, {"remove": member}, write=True)["version"])

    def set_members(self, key: str, consistency: Optional[Consistency] = None) -> List[Any]:
        """A set's members."""
        return list(self.get(key, consistency) or [])

    # Documents (ot_text) -----------------------------------------------------------------------

    def document(self, key: str, consistency: Optional[Consistency] = None) -> Document:
        """An ``ot_text`` document (revision 0 and no text when it was never edited)."""
        reading = self._read_key(key, consistency, False) or {}
        return Document(int(reading.get("revision", 0)), str(reading.get("value") or ""))

    def edits_since(self, key: str, since: int) -> DocumentEdits:
        """The edits applied to an ``ot_text`` document since revision ``since``: applied in
        order to the text at that revision, they give the current text. Raises
        :class:`StaleRevision` when ``since`` is ahead or older than the edits kept (read the
        whole document then)."""
        path = _key_path("documents", key) + _query(since=since)
        answer = self._call("GET", path, None, write=False)
        return DocumentEdits(int(answer["revision"]), [list(e) for e in answer["edits"]])

    def edit(
        self, key: str, revision: int, op: EditOp, consistency: Optional[Consistency] = None
    ) -> Edited:
        """Applies ``op``, an edit of the document as it was at ``revision``; the node
        transforms it past the edits applied since. Raises :class:`StaleRevision` when
        ``revision`` is ahead of the document or older than the edits it keeps (read it
        again and redo the edit), :class:`InvalidRequest` when ``op`` does not span it."""
        path = _key_path("documents", key) + _query(consistency=consistency)
        answer = self._call("POST", path, {"revision": revision, "op": op}, write=True)
        return Edited(int(answer["revision"]), list(answer["applied"]), str(answer["version"]))

    # Scans and status --------------------------------------------------------------------------

    def scan(self, prefix: str, after: Optional[str] = None, limit: int = 100) -> Page:
        """A page of live keys under ``prefix`` (a collection name, or a prefix with ``:``),
        in key order, after ``after``."""
        path = "/v1/scan/" + urllib.parse.quote(prefix, safe="") + _query(after=after, limit=limit)
        answer = self._call("GET", path, None, write=False)
        entries = [Entry(e["key"], e.get("value")) for e in answer.get("entries", [])]
        return Page(entries, answer.get("next"))

    def scan_all(self, prefix: str, page_size: int = 100) -> Iterator[Entry]:
        """Every live key under ``prefix``, page by page."""
        after: Optional[str] = None
        while True:
            page = self.scan(prefix, after, page_size)
            yield from page.entries
            if page.next is None:
                return
            after = page.next

    # Watching --------------------------------------------------------------------------------

    def changes(
        self, prefix: str, after: Optional[str] = None, limit: int = 100, wait: float = 0.0
    ) -> ChangePage:
        """The changes under ``prefix`` after the position ``after`` (from now when ``None``),
        in the order the node applied them, waiting up to ``wait`` seconds for one. Positions
        belong to the node that handed them out (:class:`PositionUnavailable` elsewhere)."""
        wait_ms = int(max(0.0, min(wait, self._timeout / 2)) * 1000)
        path = "/v1/changes/" + urllib.parse.quote(prefix, safe="") + _query(
            after=after, limit=limit, wait_ms=wait_ms
        )
        answer = self._call("GET", path, None, write=False)
        changes = [
            Change(
                str(c["position"]),
                str(c["key"]),
                c.get("value"),
                bool(c.get("deleted")),
                str(c.get("version", "")),
            )
            for c in answer.get("changes", [])
        ]
        return ChangePage(changes, str(answer["position"]))

    def watch(self, prefix: str, after: Optional[str] = None) -> Iterator[Change]:
        """Every change under ``prefix`` after ``after`` (from now when ``None``), as it comes;
        resume with the last change's ``position``. Each read waits for changes holding the
        client's lock: watch with a client of its own."""
        position = after
        while True:
            page = self.changes(prefix, position, limit=256, wait=self._timeout / 2)
            yield from page.changes
            position = page.position

    def status(self) -> Dict[str, Any]:
        """What the node knows of the cluster: members, liveness, N/W/R, each collection's
        level and the guarantee it really gets."""
        return dict(self._call("GET", "/v1/status", None, write=False))

    def close(self) -> None:
        """Closes the connections."""
        for node in self._nodes:
            node.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # The transport ------------------------------------------------------------------------

    def _read_key(
        self, key: str, consistency: Optional[Consistency], stale: bool
    ) -> Optional[Dict[str, Any]]:
        query = _query(consistency=consistency, stale="true" if stale else None)
        try:
            return self._call("GET", _key_path("keys", key) + query, None, write=False)
        except AgentstoreError as err:
            if err.code == "not_found":
                return None
            raise

    def _headers(self, body: Optional[bytes]) -> Dict[str, str]:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        if self._session:
            headers[SESSION_HEADER] = self._session
        return headers

    def _exchange(
        self, node: _Node, method: str, path: str, body: Optional[bytes]
    ) -> Tuple[http.client.HTTPResponse, bytes]:
        """One request to ``node``; a kept-alive connection the node closed is replaced once."""
        headers = self._headers(body)
        try:
            return _exchange_once(node, method, path, body, headers)
        except _StaleConnection:
            return _exchange_once(node, method, path, body, headers)

    def _call(self, method: str, path: str, value: Any, write: bool) -> Dict[str, Any]:
        body = None if value is None and method != "PUT" else json.dumps(value).encode()
        with self._lock:
            last: Optional[BaseException] = None
            for attempt in range(len(self._nodes)):
                node = self._nodes[(self._current + attempt) % len(self._nodes)]
                try:
                    response, data = self._exchange(node, method, path, body)
                except _NotSent as err:
                    last = err.__cause__
                    continue
                except (OSError, http.client.HTTPException) as err:
                    if write:
                        raise Indeterminate(
                            "indeterminate",
                            f"{node.address} did not answer a write that was sent ({err}); "
                            "it may have applied: read to find out",
                        ) from err
                    last = err
                    continue
                self._current = (self._current + attempt) % len(self._nodes)
                token = response.getheader(SESSION_HEADER)
                if token is not None and self._session is not None:
                    self._session = token
                try:
                    answer = json.loads(data) if data else {}
                except ValueError:
                    answer = {}
                if response.status >= 400:
                    raise from_answer(response.status, answer)
                return answer
            raise Unavailable(
                "unavailable",
                f"no node answered ({', '.join(n.address for n in self._nodes)}): {last}",
            )


class _NotSent(Exception):
    """The request never reached the node (it could not be reached): ask another."""


class _StaleConnection(Exception):
    """A kept-alive connection the node had closed: the request was not read."""


def _exchange_once(
    node: _Node, method: str, path: str, body: Optional[bytes], headers: Dict[str, str]
) -> Tuple[http.client.HTTPResponse, bytes]:
    reused = node.connection is not None
    try:
        connection = node.connect()
    except OSError as err:
        raise _NotSent() from err
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response, response.read()
    except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as err:
        node.close()
        # A node closes a keep-alive connection only between requests (idle for 30 s): on a
        # reused connection, a close before any answer means the request was not read.
        if reused:
            raise _StaleConnection() from err
        raise
    except (OSError, http.client.HTTPException):
        node.close()
        raise


class Session(Client):
    """A session: every call carries the session's token (the ``agentstore-session``
    header) and keeps the grown one, so the session reads its own writes and never goes back
    in time on any node. :attr:`token` carries it to another client or process."""

    def __init__(self, client: Client, token: str = "") -> None:
        # The client's nodes, connections and lock, shared: calls on both stay serialized.
        self.__dict__.update(client.__dict__)
        self._session = token

    @property
    def token(self) -> str:
        """The session's token (empty until the session wrote or read something that needs
        one)."""
        return self._session or ""


def _key_path(kind: str, key: str) -> str:
    return f"/v1/{kind}/" + urllib.parse.quote(key, safe="")


def _query(**params: Optional[Union[str, int]]) -> str:
    given: List[Tuple[str, str]] = [(k, str(v)) for k, v in params.items() if v is not None]
    return "?" + urllib.parse.urlencode(given) if given else ""


