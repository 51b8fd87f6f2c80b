"""The sleap-rtc signaling server: rooms, peers, discovery and routing (the v2 API).

It never interprets job payloads: it registers peers into rooms, answers discovery,
merges metadata and forwards peer messages and WebRTC offers/answers/candidates between
peers of one room. Frames are JSON text over WebSocket (websockets' sans-I/O protocol,
with one thread that reads every socket and one that writes to them); an HTTP API on its
own port (stdlib `ThreadingHTTPServer`) signs users in, creates and deletes rooms and
reports health and metrics.

A peer enters a room with the room's token. Unmodified sleap-rtc 0.0.7 programs enter
without it: a client with the JWT this server's sign-in issued, when its user created the
room or joined it once with the token (POST /join-room), and a worker with a key the
room issued (POST /create-api-key). Error frames carry `reason` for them besides `code`
and `message`, and POST /delete-peer answers their exit.

Reading order:
1. constants and the data model (Limits, Peer, Room);
2. discovery filters;
3. connections: `_Writer`, the one thread that writes to (and closes) every socket,
   `Connection`, and `_Reader`, the one thread that accepts and reads them;
4. `Directory`: rooms, who may enter them, id_tokens and the state file;
5. the server: lifecycle, removing peers, connections and frames;
6. the HTTP API;
7. the command line.

    python signaling.py [--host 127.0.0.1] [--port 8080] [--http-port 8001]
                        [--ice-server URL ...] [--state-file rooms.json] [--room-ttl S]
                        [--turn-secret SECRET --turn-url URL ... [--turn-ttl S]]
                        [--max-rooms-per-user N] [--max-rooms-per-address N] [--outbox-mb MB]
"""

from __future__ import annotations

import argparse
import base64
import collections
import hashlib
import hmac
import itertools
import json
import logging
import os
import resource
import secrets
import selectors
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Optional

from websockets.frames import CloseCode, Opcode
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol

import protocol as P

log = logging.getLogger("sleap_rtc.signaling")

# ---------------------------------------------------------------------------------------
# Constants and data model
# ---------------------------------------------------------------------------------------

ID_TOKEN_LIFETIME_S = 30 * 24 * 3600
# Frames beyond this close the connection (websockets' own limit); frames between
# MAX_FRAME_BYTES and this get a MESSAGE_TOO_LARGE error and the connection stays up.
HARD_FRAME_LIMIT = 16 * P.MAX_FRAME_BYTES
CLOSE_TIMEOUT_S = 2.0
# A peer's metadata is copied into every discovery answer: keep it small.
MAX_METADATA_BYTES = 64 * 1024
# A peer with more than this waiting to be sent to it (four of the largest frames) has
# stopped reading, or reads far slower than its room talks to it: it is closed as too
# slow, and nobody else waits for it.
OUTBOX_LIMIT_BYTES = 4 * P.MAX_FRAME_BYTES
# A connection that has not registered this long after it opened is closed.
REGISTER_WITHIN_S = 30.0
# Peer ids claimed with a peer_key, per room (workers claim theirs); a room past it claims no more.
MAX_CLAIMS_PER_ROOM = 100
# Targets of a peer's recent offers remembered for linking its answers (and quit) to them.
MAX_OFFERS_REMEMBERED = 256
# While stopping, how long the close frames get to reach peers that still read.
STOP_FLUSH_S = 0.5
READ_BYTES = 64 * 1024  # taken from one socket at a time
ACCEPT_PAUSE_S = 1.0  # out of file descriptors: accept nothing for this long
_PING_TEXT = json.dumps(P.ping_frame())
_WS_LOG = logging.getLogger("websockets.server")


@dataclass
class Limits:
    max_frame_bytes: int = P.MAX_FRAME_BYTES
    max_peers_per_room: int = 256
    max_rooms: int = 1000
    max_rooms_per_user: int = 20
    max_rooms_per_address: int = 100
    # A room nobody has been in for this long is deleted (its token stops working).
    room_ttl_s: float = 7 * 24 * 3600.0
    # An HTTP request that sends nothing for this long is dropped.
    http_timeout_s: float = 10.0
    # Token bucket per connection: sustained frames per second and burst size.
    rate_per_s: float = 200.0
    rate_burst: int = 400
    outbox_bytes: int = OUTBOX_LIMIT_BYTES
    # A connection that leaves a protocol ping unanswered this long is closed as gone (a
    # laptop that went to sleep with its connection open).
    silence_s: float = P.SERVER_SILENCE_S


# A peer's TURN credentials are renewed (before an offer reaches it) once they are this old.
TURN_REFRESH_S = 3600.0


@dataclass(frozen=True)
class TurnRest:
    """TURN credentials minted per peer from a secret shared with the TURN server (the
    TURN REST scheme coturn implements with --use-auth-secret --static-auth-secret):
    username "EXPIRY:PEER_ID", password base64(HMAC-SHA1(secret, username)). A leaked
    password stops working at EXPIRY, and the secret never leaves this server."""

    secret: str
    urls: tuple[str, ...]
    ttl_s: float = 24 * 3600.0

    def mint(self, peer_id: str, now: Optional[float] = None) -> dict:
        username = f"{int((now or time.time()) + self.ttl_s)}:{peer_id}"
        digest = hmac.new(self.secret.encode(), username.encode(), hashlib.sha1).digest()
        return {"urls": list(self.urls), "username": username, "credential": base64.b64encode(digest).decode()}


class Peer:
    """A registered connection. Its public JSON (what discovery and registered_auth
    show) is built once per metadata change; every answer joins these strings."""

    def __init__(self, peer_id: str, room_id: str, role: str, metadata: dict, conn: Any, user: str = ""):
        self.peer_id = peer_id
        self.room_id = room_id
        self.role = role
        self.connected_at = _now_iso()
        self.conn = conn  # its Connection
        self.user = user  # the signed-in user, when it registered with an id_token or jwt
        self.offered_to: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.linked: set[str] = set()  # peers it has a link with: an offer one way, its answer back
        self.ice_issued_at = time.monotonic()  # when it was last handed TURN credentials
        self.metadata = metadata

    @property
    def metadata(self) -> dict:
        return self._metadata

    @metadata.setter
    def metadata(self, metadata: dict) -> None:
        text = json.dumps(metadata)
        self._metadata = metadata
        self.metadata_bytes = len(text)
        self.tags = frozenset(metadata.get("tags", []))
        self.properties = metadata.get("properties", {})
        self.public_json = P.peer_json(self.peer_id, self.role, text, self.connected_at)


@dataclass
class Room:
    room_id: str
    token: str
    created_at: str
    owner: str = ""  # the user who created it: the only one who may delete it
    address: str = ""  # the address it was created from
    empty_since: Optional[float] = field(default_factory=time.time)  # None while peers are in it
    # Users who presented the room's token once (POST /join-room): with the owner, the
    # users whose jwt alone lets them register (sleap-rtc 0.0.7 clients).
    members: set[str] = field(default_factory=set)
    # SHA-256 of each worker key issued for the room (POST /create-api-key); never the keys.
    api_keys: set[str] = field(default_factory=set)
    # Peer ids claimed with a peer_key: id -> SHA-256 of the key.
    claims: dict[str, str] = field(default_factory=dict)
    peers: dict[str, Peer] = field(default_factory=dict)
    # The same peers by role, so that discovery of workers looks at workers only.
    by_role: dict[str, dict[str, Peer]] = field(default_factory=dict)
    # Every peer's public JSON joined, for registered_auth; None when it must be built anew.
    _listing: Optional[str] = None
    listing_bytes: int = 0  # the size of that listing, kept as peers come, go and change

    def saved(self) -> dict:
        return {"token": self.token, "created_at": self.created_at, "owner": self.owner, "address": self.address,
                "empty_since": self.empty_since if self.empty_since is not None else time.time(),
                "members": sorted(self.members), "api_keys": sorted(self.api_keys), "claims": self.claims}

    def admits(self, user: str) -> bool:
        return bool(user) and (user == self.owner or user in self.members)

    def listing(self) -> str:
        """The public JSON of every peer, joined into the inside of a JSON list."""
        if self._listing is None:
            self._listing = ", ".join(p.public_json for p in self.peers.values())
        return self._listing

    def update(self, peer: Peer, metadata: dict) -> None:
        """Give a peer of the room new metadata; the listing is built anew when next needed."""
        self.listing_bytes -= len(peer.public_json)
        peer.metadata = metadata
        self.listing_bytes += len(peer.public_json)
        self._listing = None

    def add(self, peer: Peer) -> None:
        self.peers[peer.peer_id] = peer
        self.by_role.setdefault(peer.role, {})[peer.peer_id] = peer
        self.listing_bytes += len(peer.public_json) + 2
        self.empty_since = None
        if self._listing is not None:  # a join extends the listing, never rebuilds it
            self._listing = f"{self._listing}, {peer.public_json}" if self._listing else peer.public_json

    def discard(self, peer: Peer) -> bool:
        """Take `peer` out (not a newer peer of the same id); whether it was in."""
        if self.peers.get(peer.peer_id) is not peer:
            return False
        del self.peers[peer.peer_id]
        del self.by_role[peer.role][peer.peer_id]
        self.listing_bytes -= len(peer.public_json) + 2
        if not self.by_role[peer.role]:
            del self.by_role[peer.role]
        for other in peer.linked:
            if other in self.peers:
                self.peers[other].linked.discard(peer.peer_id)
        self._listing = None
        if not self.peers:
            self.empty_since = time.time()
        return True


def _same(secret: str, offered: str) -> bool:
    """Constant-time comparison that takes any text (compare_digest refuses non-ASCII str)."""
    return hmac.compare_digest(secret.encode("utf-8"), offered.encode("utf-8", "replace"))


def _key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "replace")).hexdigest()


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------
# Discovery filters
# ---------------------------------------------------------------------------------------

_COMPARISONS = {"$eq": lambda a, b: a == b, "$gte": lambda a, b: a >= b, "$lte": lambda a, b: a <= b}


def check_filters(filters: Any) -> Optional[str]:
    """Return what is wrong with a discover_peers filter object, or None."""
    if not isinstance(filters, dict):
        return "filters must be an object"
    if "role" in filters and not isinstance(filters["role"], str):
        return "filters.role must be a string"
    tags = filters.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        return "filters.tags must be a list of strings"
    properties = filters.get("properties", {})
    if not isinstance(properties, dict):
        return "filters.properties must be an object"
    for key, condition in properties.items():
        if isinstance(condition, dict):
            unknown = set(condition) - set(_COMPARISONS)
            if unknown or not condition:
                return f"filters.properties.{key}: use $eq, $gte or $lte (got {sorted(unknown) or 'nothing'})"
    return None


def matcher(filters: dict) -> Callable[[Peer], bool]:
    """Whether a peer passes role, all-tags and property filters (a missing property never
    does), as a function: the filters are read once, not once per peer."""
    role = filters.get("role")
    tags = frozenset(filters.get("tags", ()))
    conditions = [(key, _COMPARISONS[op], operand)
                  for key, condition in filters.get("properties", {}).items()
                  for op, operand in (condition.items() if isinstance(condition, dict) else [("$eq", condition)])]

    def matches(peer: Peer) -> bool:
        if role is not None and peer.role != role:
            return False
        if tags and not tags <= peer.tags:
            return False
        properties = peer.properties
        for key, compare, operand in conditions:
            if key not in properties:
                return False
            try:
                if not compare(properties[key], operand):
                    return False
            except TypeError:  # e.g. "A100" >= 8000
                return False
        return True

    return matches


# ---------------------------------------------------------------------------------------
# Connections: one reader and one writer thread for every socket
# ---------------------------------------------------------------------------------------
# The WebSocket protocol is websockets' sans-I/O ServerProtocol; the I/O is ours, in two
# threads for the whole server. "signaling-reader" accepts connections, reads whatever
# each socket has, feeds it to the connection's protocol and hands every whole message to
# the server, which answers by queueing. "signaling-writer" is the only thread that writes
# to a socket: every byte a protocol produces (frames, pongs, the close handshake) goes
# into its connection's outbox, and the writer sends what each socket takes without
# blocking. A peer that stops reading holds up only its own outbox; one whose outbox
# passes its limit is closed as too slow. No thread is started per connection.


class _Waker:
    """A socket pair that wakes a thread waiting in select() from any other thread."""

    def __init__(self):
        self.reader, self._writer = socket.socketpair()
        self.reader.setblocking(False)
        self._writer.setblocking(False)

    def wake(self) -> None:
        try:
            self._writer.send(b"x")
        except OSError:  # full: a wake-up is pending anyway; closed: stopping
            pass

    def drain(self) -> None:
        try:
            while self.reader.recv(4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        self.reader.close()
        self._writer.close()


class _Outbox:
    """The bytes waiting for one connection's socket (guarded by the writer's lock)."""

    def __init__(self, conn: "Connection"):
        self.conn = conn
        self.chunks: collections.deque[bytes] = collections.deque()
        self.offset = 0  # bytes of chunks[0] already sent
        self.size = 0  # bytes waiting
        self.close_by: Optional[float] = None  # close the socket once empty, or at this time (monotonic)
        self.gone = False  # the reader let go: close the socket now, whatever waits
        self.too_slow = False  # cut: the reader sees the socket closed and lets go
        self.watched = False  # registered for writability (writer thread only)


class _Writer:
    """Thread "signaling-writer", owned and stopped by the server: the only thread that
    writes to any peer's socket, and the one that closes it. `put` (any thread) queues
    bytes and never blocks."""

    BATCH_BYTES = 256 * 1024  # queued frames joined into one send

    def __init__(self, limit: int):
        self.limit = limit
        # Guards _boxes, _waiting, _dirty, every _Outbox and _stopping; the selector
        # belongs to the writer thread alone.
        self._lock = threading.Lock()
        self._boxes: dict[Connection, _Outbox] = {}
        self._waiting = 0  # bytes in all boxes
        self._dirty: set[Connection] = set()  # connections whose box the writer must look at
        self._closing: dict[Connection, float] = {}  # connections to close by then (monotonic)
        self._stopping = False
        self._idle = threading.Condition(self._lock)  # notified when nothing waits
        self._waker = _Waker()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._waker.reader, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._run, name="signaling-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Close every socket and end the thread."""
        with self._lock:
            self._stopping = True
        self._waker.wake()
        self._thread.join(timeout=5)

    def open(self, conn: "Connection") -> None:
        with self._lock:
            self._boxes[conn] = _Outbox(conn)

    def put(self, conn: "Connection", data: bytes) -> bool:
        """Queue bytes for `conn`; False when it is closing or has just been found too slow."""
        with self._lock:
            box = self._boxes.get(conn)
            if box is None or box.gone or box.too_slow:
                return False
            if data:  # websockets' b"" (end the stream) is left to close(): the socket closes then
                box.chunks.append(data)
                box.size += len(data)
                self._waiting += len(data)
                box.too_slow = box.size > self.limit
            self._mark(conn)
        return not box.too_slow

    def accepting(self, conn: "Connection") -> bool:
        with self._lock:
            box = self._boxes.get(conn)
            return box is not None and not box.gone and not box.too_slow

    def close(self, conn: "Connection", now: bool) -> None:
        """The reader is done with `conn`: close its socket once what waits is sent (for at
        most CLOSE_TIMEOUT_S), or `now`. Only the writer closes sockets, after the reader
        let go of them, so a descriptor is never reused under either."""
        with self._lock:
            box = self._boxes.get(conn)
            if box is None:
                return
            if now:
                box.gone = True
            elif box.close_by is None:
                box.close_by = self._closing[conn] = time.monotonic() + CLOSE_TIMEOUT_S
            self._mark(conn)

    def flush(self, timeout: float) -> None:
        """Wait until nothing waits to be sent, or `timeout`."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._waiting and time.monotonic() < deadline:
                self._idle.wait(max(0.0, deadline - time.monotonic()))

    def _mark(self, conn: "Connection") -> None:  # the caller holds _lock
        if not self._dirty:
            self._waker.wake()
        self._dirty.add(conn)

    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    first = min(self._closing.values(), default=None)
                timeout = None if first is None else max(0.0, first - time.monotonic())
                ready = []
                for key, _ in self._selector.select(timeout):
                    if key.fileobj is self._waker.reader:
                        self._waker.drain()
                    else:
                        ready.append(key.data)
                with self._lock:
                    dirty, self._dirty = self._dirty, set()
                    stopping = self._stopping
                    overdue = [conn for conn, by in self._closing.items() if by <= time.monotonic()]
                for conn in dirty.union(ready, overdue):
                    self._service(conn)
                with self._lock:
                    if not self._waiting:
                        self._idle.notify_all()
                if stopping:
                    break
        except Exception:  # a bug here would silence every peer: say so loudly
            log.exception("signaling: the writer failed")
        finally:
            with self._lock:
                boxes = list(self._boxes.values())
                self._boxes.clear()
            for box in boxes:
                box.conn.sock.close()
            self._selector.close()
            self._waker.close()

    def _service(self, conn: "Connection") -> None:
        """Send what `conn`'s socket takes now; close it once the reader let go of it and
        it is sent (or overdue); cut it when it is too slow."""
        with self._lock:
            box = self._boxes.get(conn)
            if box is None:
                return
            overdue = box.close_by is not None and (not box.chunks or box.close_by <= time.monotonic())
            if box.gone or overdue:
                del self._boxes[conn]
                self._closing.pop(conn, None)
            if box.gone or overdue or box.too_slow:
                self._waiting -= box.size
                box.chunks.clear()
                box.size = box.offset = 0
        if box.watched and (box.gone or overdue or box.too_slow):
            self._selector.unregister(conn.sock)
            box.watched = False
        if box.gone or overdue:
            conn.sock.close()
            return
        if box.too_slow:  # the reader sees the socket shut down, lets go, and it is closed above
            log.warning("closed %s: too slow (more than %d bytes waiting for it)", conn, self.limit)
            _shutdown(conn.sock)
            return
        while True:
            with self._lock:
                if not box.chunks:
                    break
                pieces = [memoryview(box.chunks[0])[box.offset:]]
                taken = len(pieces[0])
                for chunk in itertools.islice(box.chunks, 1, None):
                    if taken + len(chunk) > self.BATCH_BYTES:
                        break
                    pieces.append(chunk)
                    taken += len(chunk)
            data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
            try:
                sent = conn.sock.send(data, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
            except BlockingIOError:
                sent = 0
            except OSError:  # reset or shut down: the reader sees it too and lets go
                with self._lock:
                    self._waiting -= box.size
                    box.chunks.clear()
                    box.size = box.offset = 0
                break
            with self._lock:
                box.size -= sent
                self._waiting -= sent
                left = sent
                while left:
                    rest = len(box.chunks[0]) - box.offset
                    if left < rest:
                        box.offset += left
                        break
                    box.chunks.popleft()
                    box.offset, left = 0, left - rest
            if sent < taken:  # the socket is full: wait until it takes more
                break
        with self._lock:
            waiting, closing = bool(box.chunks), box.close_by is not None
        if waiting != box.watched:
            if waiting:
                self._selector.register(conn.sock, selectors.EVENT_WRITE, conn)
            else:
                self._selector.unregister(conn.sock)
            box.watched = waiting
        if closing and not waiting:
            self._service(conn)  # all sent: close it


def _shutdown(sock: socket.socket) -> None:
    """End a connection from any thread; its descriptor stays until the writer closes it."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # not connected any more, or closed
        pass


class Connection:
    """One client connection: its socket, websockets' protocol for it, and its peer once
    registered. The reader feeds the protocol; any thread may queue frames through it."""

    def __init__(self, sock: socket.socket, address: str, writer: _Writer):
        self.sock = sock
        self.address = address
        self.opened = time.monotonic()
        self.peer: Optional[Peer] = None  # set by the reader at registration
        self.fragments: list[bytes] = []  # of a fragmented message (reader only)
        self.first_opcode: Optional[Opcode] = None  # of a fragmented message (reader only)
        self.limiter: Optional[P.TokenBucket] = None  # frames per second it may send
        self._writer = writer
        # Guards protocol (websockets' state machine, not thread-safe) and _probe.
        self.lock = threading.Lock()
        self.protocol = ServerProtocol(max_size=HARD_FRAME_LIMIT, logger=_WS_LOG)
        self._probe: Optional[tuple[float, bool]] = None  # the protocol ping in flight: (sent, answered)

    def __str__(self) -> str:
        peer = self.peer
        return f"{peer.peer_id} (room {peer.room_id})" if peer is not None else self.address

    def flush(self) -> None:  # the caller holds lock
        for data in self.protocol.data_to_send():
            self._writer.put(self, data)

    def enqueue(self, text: str) -> bool:
        """Queue one text frame; False when the connection is closing or too slow."""
        with self.lock:
            if self.protocol.state is not State.OPEN:
                return False
            self.protocol.send_text(text.encode())
            self.flush()
        return self._writer.accepting(self)

    def probe(self) -> float:
        """Queue a protocol ping unless one is in flight; how long the one in flight has
        waited for its pong (0 when none was)."""
        now = time.monotonic()
        with self.lock:
            if self.protocol.state is not State.OPEN:
                return 0.0
            if self._probe is not None and not self._probe[1]:
                return now - self._probe[0]
            self._probe = (now, False)
            self.protocol.send_ping(b"probe")
            self.flush()
        return 0.0

    def answered(self) -> None:
        with self.lock:
            if self._probe is not None:
                self._probe = (self._probe[0], True)

    def abort(self, why: str) -> None:
        """Cut the connection from any thread; the reader sees it closed and lets go."""
        log.info("closed %s: %s", self, why)
        _shutdown(self.sock)


class _Reader:
    """Thread "signaling-reader", owned and stopped by the server: accepts connections,
    reads every socket, and calls `on_open(conn)`, `on_message(conn, text | bytes)` for
    each whole message and `on_close(conn)` once a connection is done. Never blocks on a
    peer."""

    def __init__(self, listener: socket.socket, writer: _Writer, on_open: Callable, on_message: Callable,
                 on_close: Callable):
        self.listener = listener
        self._writer = writer
        self._on_open, self._on_message, self._on_close = on_open, on_message, on_close
        self._waker = _Waker()
        self._stopping = threading.Event()
        self._selector = selectors.DefaultSelector()  # the reader thread's alone
        self._resume_accepting: Optional[float] = None  # while out of descriptors (reader thread only)
        self._thread = threading.Thread(target=self._run, name="signaling-reader", daemon=True)

    def start(self) -> None:
        self.listener.setblocking(False)
        self._selector.register(self.listener, selectors.EVENT_READ, "accept")
        self._selector.register(self._waker.reader, selectors.EVENT_READ, "wake")
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._waker.wake()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                if self._resume_accepting is not None and time.monotonic() >= self._resume_accepting:
                    self._selector.register(self.listener, selectors.EVENT_READ, "accept")
                    self._resume_accepting = None
                timeout = None if self._resume_accepting is None else \
                    max(0.0, self._resume_accepting - time.monotonic())
                for key, _ in self._selector.select(timeout):
                    if key.data == "accept":
                        self._accept()
                    elif key.data == "wake":
                        self._waker.drain()
                    else:
                        self._read(key.data)
        except Exception:  # a bug here would deafen the server: say so loudly
            log.exception("signaling: the reader failed")
        finally:
            self._selector.close()
            self.listener.close()
            self._waker.close()

    def _accept(self) -> None:
        while True:
            try:
                sock, address = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors: pause, or the listener would wake us forever
                log.warning("cannot accept connections for %.0f s: %s (raise `ulimit -n`)", ACCEPT_PAUSE_S, exc)
                self._selector.unregister(self.listener)
                self._resume_accepting = time.monotonic() + ACCEPT_PAUSE_S
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Connection(sock, "%s:%s" % address[:2], self._writer)
            self._writer.open(conn)
            self._selector.register(sock, selectors.EVENT_READ, conn)
            self._on_open(conn)

    def _read(self, conn: Connection) -> None:
        try:
            data = conn.sock.recv(READ_BYTES)
        except BlockingIOError:
            return
        except OSError:  # reset, or cut by another thread (abort, too slow)
            data = b""
        with conn.lock:
            if data:
                conn.protocol.receive_data(data)
            else:
                conn.protocol.receive_eof()
            events = conn.protocol.events_received()
            conn.flush()
        for event in events:
            if isinstance(event, Request):
                with conn.lock:
                    conn.protocol.send_response(conn.protocol.accept(event))
                    conn.flush()
            elif event.opcode is Opcode.PONG:
                conn.answered()
            elif event.opcode in (Opcode.TEXT, Opcode.BINARY, Opcode.CONT):
                if not self._writer.accepting(conn):
                    break  # being cut (too slow): the rest of what it sent is not worth answering
                if not conn.fragments:
                    conn.first_opcode = event.opcode
                conn.fragments.append(event.data)
                if event.fin:
                    whole, conn.fragments = b"".join(conn.fragments), []
                    self._deliver(conn, whole, conn.first_opcode is Opcode.BINARY)
        if not data or conn.protocol.state is State.CLOSED or conn.protocol.close_expected():
            self._selector.unregister(conn.sock)
            self._on_close(conn)
            self._writer.close(conn, now=not data)

    def _deliver(self, conn: Connection, whole: bytes, binary: bool) -> None:
        """A text message as str; binary ones, and text that is not UTF-8, as the bytes
        (which the server answers: not part of the API)."""
        if not binary:
            try:
                whole = whole.decode("utf-8")
            except UnicodeDecodeError:
                pass
        self._on_message(conn, whole)


# ---------------------------------------------------------------------------------------
# The directory: rooms, who may enter them, and the state file
# ---------------------------------------------------------------------------------------


class Directory:
    """Every room with its peers, tokens, members, worker keys and claimed ids; the secret
    that signs this server's id_tokens; and the state file that keeps them across restarts.

    It knows nothing of sockets: the server's threads (the reader, the pinger, the HTTP
    threads) call it, each for a moment. Refusals of the HTTP API are LookupError,
    PermissionError and OverflowError with the words to answer; those of frames are error
    frames.
    """

    def __init__(self, state_file: Optional[Path], limits: Limits):
        self.state_file = Path(state_file) if state_file else None
        self.limits = limits
        # Guards rooms (and their peers), `changed`, `created` and writes of the state
        # file. Never held while waiting for anything.
        self.lock = threading.Lock()
        self.rooms: dict[str, Room] = {}
        self.changed = False  # a claim the state file does not hold yet
        self.created = 0  # rooms created since the server started
        self._secret = secrets.token_bytes(32)
        self._load()

    # -- the state file -----------------------------------------------------------------

    def _load(self) -> None:
        if not self.state_file or not self.state_file.exists():
            return
        state = json.loads(self.state_file.read_text())
        self._secret = bytes.fromhex(state["secret"])
        for room_id, room in state.get("rooms", {}).items():
            self.rooms[room_id] = Room(room_id, room["token"], room["created_at"], room.get("owner", ""),
                                       room.get("address", ""), room.get("empty_since", time.time()),
                                       set(room.get("members", [])), set(room.get("api_keys", [])),
                                       dict(room.get("claims", {})))
        self._expire()

    def _save(self) -> None:
        """Write rooms and the signing secret atomically (caller holds lock)."""
        self.changed = False
        if not self.state_file:
            return
        state = {"secret": self._secret.hex(), "rooms": {r.room_id: r.saved() for r in self.rooms.values()}}
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_name(self.state_file.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(state, f)
        os.replace(tmp, self.state_file)

    def tidy(self, expire: bool = True) -> None:
        """Delete rooms empty past their time, and write what changed (the pinger's chore,
        and the last thing a stopping server does)."""
        with self.lock:
            if (expire and self._expire()) or self.changed:
                self._save()

    def _expire(self) -> list[str]:
        """Delete rooms empty for longer than the TTL (caller holds lock or owns the directory)."""
        cutoff = time.time() - self.limits.room_ttl_s
        expired = [r.room_id for r in self.rooms.values()
                   if not r.peers and r.empty_since is not None and r.empty_since < cutoff]
        for room_id in expired:
            del self.rooms[room_id]
            log.info("room %s expired: nobody was in it for %.0f s", room_id, self.limits.room_ttl_s)
        return expired

    # -- users and rooms (the HTTP API) -------------------------------------------------

    def create_room(self, owner: str = "", address: str = "") -> Room:
        """A new room; raises OverflowError when the server is full, PermissionError when
        this user or address holds its share of rooms already."""
        with self.lock:
            if len(self.rooms) >= self.limits.max_rooms:
                raise OverflowError(f"the server holds its maximum of {self.limits.max_rooms} rooms")
            if owner and sum(r.owner == owner for r in self.rooms.values()) >= self.limits.max_rooms_per_user:
                raise PermissionError(f"user {owner} has created {self.limits.max_rooms_per_user} rooms already; "
                                      "reuse one (rooms nobody joins expire)")
            if address and sum(r.address == address for r in self.rooms.values()) >= self.limits.max_rooms_per_address:
                raise PermissionError(f"{self.limits.max_rooms_per_address} rooms were created from {address} "
                                      "already; reuse one (rooms nobody joins expire)")
            room = Room(secrets.token_hex(8), P.new_secret(24), _now_iso(), owner, address)
            self.rooms[room.room_id] = room
            self.created += 1
            self._save()
        return room

    def issue_id_token(self) -> tuple[str, str]:
        """A new anonymous user and its id_token: a standard JWT (HS256, signed with this
        server's secret) with `sub`, `username` and `exp`, which sleap-rtc 0.0.7 reads too."""
        username = "anon-" + secrets.token_hex(4)
        now = int(time.time())
        header = P.b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        claims = P.b64url(json.dumps({"sub": username, "username": username, "iat": now,
                                      "exp": now + ID_TOKEN_LIFETIME_S}).encode())
        return f"{header}.{claims}.{self._sign(f'{header}.{claims}')}", username

    def check_id_token(self, id_token: str) -> Optional[str]:
        """The username in an id_token this server signed and that has not expired, or None."""
        parts = id_token.split(".")
        if len(parts) != 3 or not _same(self._sign(f"{parts[0]}.{parts[1]}"), parts[2]):
            return None
        try:
            header, claims = json.loads(P.unb64url(parts[0])), json.loads(P.unb64url(parts[1]))
        except ValueError:
            return None
        if not isinstance(header, dict) or header.get("alg") != "HS256" or not isinstance(claims, dict):
            return None
        exp, user = claims.get("exp"), claims.get("sub")
        if not isinstance(exp, (int, float)) or exp <= time.time() or not isinstance(user, str):
            return None
        return user

    def _sign(self, body: str) -> str:
        return P.b64url(hmac.new(self._secret, body.encode(), hashlib.sha256).digest())

    def join_room(self, user: str, room_id: str, token: str) -> None:
        """Let `user` register in the room with its jwt alone from now on; raises
        LookupError / PermissionError."""
        with self.lock:
            room = self._room_for(room_id, token)
            room.members.add(user)
            self._save()

    def rooms_of(self, user: str) -> list[dict]:
        """The rooms `user` created or joined, with the workers in each now; never a token."""
        with self.lock:
            return [{"room_id": room.room_id, "created_at": room.created_at, "created": room.owner == user,
                     "peers": len(room.peers),
                     "workers": [{"peer_id": peer.peer_id, "name": peer.properties.get("worker_name")}
                                 for peer in room.by_role.get("worker", {}).values()]}
                    for room in self.rooms.values() if room.admits(user)]

    def create_api_key(self, room_id: str, token: str) -> str:
        """A new worker key for the room (sleap-rtc 0.0.7 workers register with it); only
        its SHA-256 is kept."""
        key = "slp_" + secrets.token_hex(24)
        with self.lock:
            self._room_for(room_id, token).api_keys.add(_key_digest(key))
            self._save()
        return key

    def _room_for(self, room_id: str, token: str) -> Room:
        """The room, when `token` is its token (caller holds lock)."""
        room = self.rooms.get(room_id)
        if room is None:
            raise LookupError(f"no room {P.echo(room_id)} on this server")
        if not _same(room.token, token):
            raise PermissionError(f"wrong token for room {room_id}")
        return room

    def take_out(self, room_id: str, peer_id: Optional[str], user: Optional[str]) -> list[Peer]:
        """The peers the room's creator removes: one, or everyone with the room itself
        deleted. Only the creator may (its id_token): the token makes members, not owners.
        Raises PermissionError / LookupError."""
        with self.lock:
            room = self.rooms.get(room_id)
            if room is None:
                raise LookupError(f"no room {P.echo(room_id)} on this server")
            if user is None or not room.owner or user != room.owner:
                raise PermissionError(f"only the creator of room {room_id} may delete it or remove its peers "
                                      "(send 'Authorization: Bearer <id_token>' of the user who created it)")
            if peer_id is not None:
                if peer_id not in room.peers:
                    raise LookupError(f"no peer {P.echo(peer_id)} in room {room_id}")
                return [room.peers[peer_id]]
            del self.rooms[room.room_id]
            self._save()
            return list(room.peers.values())

    def peers_named(self, peer_id: str, user: str) -> tuple[bool, list[Peer]]:
        """Whether a peer `peer_id` is connected anywhere, and those of them `user` may
        delete: the ones it registered as, or any in a room it created."""
        with self.lock:
            present = [room.peers[peer_id] for room in self.rooms.values() if peer_id in room.peers]
            return bool(present), [p for p in present if p.user == user or self.rooms[p.room_id].owner == user]

    # -- peers in rooms (frames) --------------------------------------------------------

    def admission_problem(self, room: Room, frame: dict, user: str) -> Optional[dict]:
        """The error frame refusing a register frame's credentials and peer id, or None
        (caller holds lock). The room's token admits anyone; without it (sleap-rtc 0.0.7)
        a jwt this server signed admits the room's owner and members, and an api_key a
        worker the room issued it to. A peer id claimed with a peer_key takes that key."""
        kind = P.REGISTER
        if frame.get("token"):
            if not _same(room.token, frame["token"]):
                return P.error_frame(P.INVALID_TOKEN, f"wrong token for room {room.room_id}", kind)
        elif frame.get("jwt"):
            if not room.admits(user):
                return P.error_frame(P.NOT_A_MEMBER, f"user {user} has not joined room {room.room_id}: "
                                     "join it once with the room's token (`python client.py login "
                                     "--sleap-rtc-credentials --room ROOM --token TOKEN`)", kind)
        elif _key_digest(frame["api_key"]) not in room.api_keys:
            return P.error_frame(P.INVALID_TOKEN, f"the api_key is not a worker key of room {room.room_id} "
                                 "(`python client.py login --sleap-rtc-credentials` issues one)", kind)
        peer_id, key = frame["peer_id"], frame.get("peer_key")
        claim = room.claims.get(peer_id)
        if claim is not None and (key is None or not _same(claim, _key_digest(key))):
            return P.error_frame(P.PEER_ID_TAKEN, f"peer id {peer_id!r} is claimed in room {room.room_id} by "
                                 "another peer (it registered with a key); choose another id", kind)
        stale = room.peers.get(peer_id)
        if stale is not None and claim is None:
            return P.error_frame(P.PEER_ID_TAKEN, f"peer id {peer_id!r} is connected already", kind)
        if stale is None and len(room.peers) >= self.limits.max_peers_per_room:
            return P.error_frame(P.ROOM_FULL, f"room {room.room_id} holds its maximum of "
                                 f"{self.limits.max_peers_per_room} peers", kind)
        if key is not None and claim is None and len(room.claims) >= MAX_CLAIMS_PER_ROOM:
            return P.error_frame(P.ROOM_FULL, f"room {room.room_id} holds {MAX_CLAIMS_PER_ROOM} claimed "
                                 "peer ids; register without a peer_key", kind)
        return None

    def claim(self, room: Room, peer_id: str, key: Optional[str]) -> None:
        """Claim `peer_id` in the room with `key`, if it is not claimed yet (caller holds
        lock). The pinger saves it: writing files is not the reader's job."""
        if key is not None and peer_id not in room.claims:
            room.claims[peer_id] = _key_digest(key)
            self.changed = True

    def listing_problem(self, room: Room, growth: int) -> Optional[str]:
        """Why the room's peer list may not grow by `growth` bytes (caller holds lock): a
        full listing must fit half an outbox, so every member can still be sent one."""
        limit = self.limits.outbox_bytes // 2
        if room.listing_bytes + growth <= limit:
            return None
        return f"room {room.room_id}'s peer list would pass {limit} bytes; make metadata smaller"

    def discover(self, peer: Peer, filters: Any) -> Any:
        """The peer_list answer, as text: it joins the peers' prepared JSON."""
        problem = check_filters(filters)
        if problem:
            return P.error_frame(P.INVALID_MESSAGE, problem, P.DISCOVER_PEERS)
        with self.lock:
            room = self.rooms.get(peer.room_id)
            if room is None:
                candidates = []
            elif "role" in filters:
                candidates = room.by_role.get(filters["role"], {}).values()
            else:
                candidates = room.peers.values()
            matches = matcher(filters)
            found = [p.public_json for p in candidates if p is not peer and matches(p)]
        return P.peer_list_json(peer.peer_id, found)

    def update_metadata(self, peer: Peer, update: dict) -> dict:
        with self.lock:
            merged = P.merge_metadata(peer.metadata, update)
            size = len(json.dumps(merged))
            room = self.rooms.get(peer.room_id)
            if size > MAX_METADATA_BYTES:
                return P.error_frame(P.MESSAGE_TOO_LARGE, f"metadata may hold at most {MAX_METADATA_BYTES} bytes",
                                     P.UPDATE_METADATA)
            problem = self.listing_problem(room, size - peer.metadata_bytes) if room is not None else None
            if problem is not None:
                return P.error_frame(P.MESSAGE_TOO_LARGE, problem, P.UPDATE_METADATA)
            if room is not None:
                room.update(peer, merged)
            else:
                peer.metadata = merged
        return P.metadata_updated_frame(peer.peer_id, merged)

    def remove(self, peer: Peer) -> None:
        with self.lock:
            room = self.rooms.get(peer.room_id)
            if room is not None:
                room.discard(peer)


# ---------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------


class SignalingServer:
    """Rooms and peers (its Directory), served on two ports.

    Threads, all stopped by `stop()`: "signaling-reader" and "signaling-writer" (every
    socket; see above), "signaling-http" and "signaling-pinger". The reader only queues:
    answers, forwarded frames and pings all go through the writer, so no thread ever
    waits on a peer.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = P.DEFAULT_WS_PORT,
                 http_port: int = P.DEFAULT_HTTP_PORT, ice_servers: Optional[list[dict]] = None,
                 state_file: Optional[Path] = None, limits: Optional[Limits] = None,
                 ping_interval: float = P.SERVER_PING_INTERVAL_S, turn: Optional[TurnRest] = None):
        self.host = host
        self.port = port
        self.http_port = http_port
        self.ice_servers = ice_servers or []  # static: the same for every peer
        self.turn = turn  # minted per peer, when a TURN secret is configured
        self.limits = limits or Limits()
        self.ping_interval = ping_interval
        self.started = time.time()
        self.directory = Directory(state_file, self.limits)
        # Guards _connections and the counters below. Never held while waiting for
        # anything, nor together with the directory's lock.
        self._lock = threading.Lock()
        self._connections: set[Connection] = set()
        self.total_connections = 0
        self.total_messages = 0
        self._stopping = threading.Event()
        self._writer = _Writer(self.limits.outbox_bytes)
        self._reader: Optional[_Reader] = None
        self._http_server: Optional[ThreadingHTTPServer] = None
        self._pinger = threading.Thread(target=self._ping_forever, name="signaling-pinger", daemon=True)
        self._http_thread: Optional[threading.Thread] = None

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> "SignalingServer":
        # A peer is a file descriptor: take as many as the process may have.
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        listener = socket.create_server((self.host, self.port), backlog=1024)
        self.port = listener.getsockname()[1]
        try:
            self._http_server = _HTTPServer((self.host, self.http_port), _make_http_handler(self))
        except OSError:
            listener.close()
            raise
        self._http_server.daemon_threads = True
        self.http_port = self._http_server.server_address[1]
        self._writer.start()
        self._reader = _Reader(listener, self._writer, self._opened, self._on_message, self._closed)
        self._reader.start()
        self._http_thread = threading.Thread(target=self._http_server.serve_forever, name="signaling-http",
                                             daemon=True)
        self._http_thread.start()
        self._pinger.start()
        return self

    def stop(self) -> None:
        """Say goodbye (close frame 1001) to every peer, give the writer STOP_FLUSH_S to
        deliver it to those that read, then cut every connection: a stalled peer delays
        the stop by no more than that."""
        self._stopping.set()
        if self._http_server:
            self._http_server.shutdown()
            self._http_server.server_close()
        if self._reader is not None:
            self._reader.stop()  # no more reading or accepting; the sockets stay for the writer
            with self._lock:
                connections = list(self._connections)
            for conn in connections:
                with conn.lock:
                    if conn.protocol.state is State.OPEN:
                        conn.protocol.send_close(CloseCode.GOING_AWAY, "server stopping")
                        conn.flush()
            self._writer.flush(STOP_FLUSH_S)
        self._writer.stop()  # closes every socket
        for thread in (self._pinger, self._http_thread):
            if thread is not None and thread.is_alive():
                thread.join(timeout=5)
        self.directory.tidy(expire=False)

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def _ping_forever(self) -> None:
        """Every ping_interval: ping each peer (a `ping` frame our clients answer, and a
        protocol ping every WebSocket library answers), close connections that left a
        protocol ping unanswered for silence_s or never registered, and delete rooms that
        stayed empty past their time. Only queues: never waits on a peer."""
        while not self._stopping.wait(self.ping_interval):
            self.directory.tidy()
            with self._lock:
                connections = list(self._connections)
            now = time.monotonic()
            for conn in connections:
                registered = conn.peer is not None
                if not registered and now - conn.opened > REGISTER_WITHIN_S:
                    conn.abort(f"did not register within {REGISTER_WITHIN_S:.0f} s")
                elif (waited := conn.probe()) > self.limits.silence_s:
                    conn.abort(f"no answer to a ping for {waited:.0f} s")
                elif registered:
                    conn.enqueue(_PING_TEXT)

    # -- removing peers (the HTTP API) and metrics --------------------------------------

    def delete(self, room_id: str, peer_id: Optional[str], user: Optional[str]) -> dict:
        """Disconnect one peer of a room, or delete the room with everyone in it (its
        creator's request; see Directory.take_out). Raises PermissionError / LookupError."""
        victims = self.directory.take_out(room_id, peer_id, user)
        for victim in victims:
            self._evict(victim, "removed by the room's creator")
        return {"deleted_peers": [v.peer_id for v in victims], "room_deleted": peer_id is None}

    def delete_peer(self, peer_id: str, user: Optional[str]) -> dict:
        """sleap-rtc 0.0.7's POST /delete-peer: disconnect the peer `peer_id` that `user`
        registered as (or, for a room's creator, any peer of that id in their room).
        Every client calls it on exit, usually after its connection closed, so an absent
        peer is an answer, not an error."""
        if user is None:
            raise PermissionError("send 'Authorization: Bearer <id_token>' of the user the peer registered as")
        present, mine = self.directory.peers_named(peer_id, user)
        if not present:
            return {"deleted": False, "reason": f"no peer {P.echo(peer_id)} is connected"}
        if not mine:
            raise PermissionError(f"only the user {peer_id} signed in as, or its room's creator, may delete it")
        for peer in mine:
            self._evict(peer, "deleted by its user")
        return {"deleted": True, "peer_id": peer_id}

    def _evict(self, peer: Peer, why: str) -> None:
        """Take a peer out of its room and cut its connection (without the close handshake,
        which would wait for the peer)."""
        self.directory.remove(peer)
        peer.conn.abort(why)

    def metrics(self) -> dict:
        with self.directory.lock:
            by_role: dict[str, int] = {}
            for room in self.directory.rooms.values():
                for role, peers in room.by_role.items():
                    by_role[role] = by_role.get(role, 0) + len(peers)
            rooms, created = len(self.directory.rooms), self.directory.created
        with self._lock:
            return {"active_rooms": rooms, "active_connections": len(self._connections),
                    "peers_by_role": by_role, "total_connections": self.total_connections,
                    "total_messages": self.total_messages, "rooms_created": created,
                    "uptime_s": round(time.time() - self.started, 1)}

    # -- connections and frames ---------------------------------------------------------

    def _opened(self, conn: Connection) -> None:
        conn.limiter = P.TokenBucket(self.limits.rate_per_s, self.limits.rate_burst)
        with self._lock:
            self.total_connections += 1
            self._connections.add(conn)

    def _on_message(self, conn: Connection, text) -> None:
        """Answer or forward one whole message, by queueing (the reader's thread)."""
        with self._lock:
            self.total_messages += 1
        try:
            reply = self._handle_frame(text, conn)
        except Exception:  # a bug must cost this frame only, and say where it is
            log.exception("a frame from %s failed", conn)
            reply = P.error_frame(P.INTERNAL_ERROR, "the server failed on this frame; see its log")
        if isinstance(reply, tuple):
            conn.peer, welcome = reply  # from here on, however the connection ends, the peer is removed
            conn.enqueue(welcome)
        elif reply is not None:
            conn.enqueue(reply if isinstance(reply, str) else json.dumps(reply))

    def _closed(self, conn: Connection) -> None:
        with self._lock:
            self._connections.discard(conn)
        if conn.peer is not None:
            self.directory.remove(conn.peer)

    def _handle_frame(self, text, conn: Connection) -> Any:
        """Answer one frame: a reply frame (a dict, or its text), (a newly registered Peer,
        its registered_auth text), or None."""
        peer = conn.peer
        if not conn.limiter.allow():
            return P.error_frame(P.RATE_LIMITED, f"more than {self.limits.rate_per_s:g} frames/s; slow down")
        if isinstance(text, bytes):
            return P.error_frame(P.INVALID_MESSAGE, "binary frames are not part of the API; send JSON text")
        size = len(text) if len(text) * 4 <= self.limits.max_frame_bytes else len(text.encode("utf-8", "replace"))
        if size > self.limits.max_frame_bytes:
            return P.error_frame(P.MESSAGE_TOO_LARGE,
                                 f"frame of {size} bytes exceeds the {self.limits.max_frame_bytes} byte limit")
        try:
            frame = json.loads(text)
        except RecursionError:
            return P.error_frame(P.INVALID_JSON, f"frame nests deeper than {P.MAX_FRAME_DEPTH} levels")
        except ValueError as exc:
            return P.error_frame(P.INVALID_JSON, f"frame is not valid JSON: {str(exc)[:200]}")
        if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
            return P.error_frame(P.INVALID_MESSAGE, "a frame is a JSON object with a string 'type'")
        if P.too_deep(frame):
            return P.error_frame(P.INVALID_MESSAGE, f"frame nests deeper than {P.MAX_FRAME_DEPTH} levels")
        kind = frame["type"]
        if kind not in P.FRAME_FIELDS:
            return P.error_frame(P.UNKNOWN_MESSAGE_TYPE, f"unknown message type {P.echo(kind)}", kind)
        problem = P.check_frame(frame)
        if problem:
            return P.error_frame(P.INVALID_MESSAGE, problem, kind)
        if kind == P.PING:
            return P.pong_frame()
        if kind == P.PONG:
            return None
        if kind == P.REGISTER:
            if peer is not None:
                return P.error_frame(P.ALREADY_REGISTERED, f"this connection is already {peer.peer_id}", kind)
            return self._register(frame, conn)
        if peer is None:
            return P.error_frame(P.NOT_IN_ROOM, f"register before sending {kind}", kind)
        sender = frame[P.SENDER_FIELD[kind]]
        if sender != peer.peer_id:
            field = P.SENDER_FIELD[kind]
            return P.error_frame(P.SPOOFED_SENDER, f"{field} {P.echo(sender)} is not this connection's peer id", kind)
        if kind == P.DISCOVER_PEERS:
            return self.directory.discover(peer, frame.get("filters", {}))
        if kind == P.UPDATE_METADATA:
            return self.directory.update_metadata(peer, frame["metadata"])
        return self._forward(peer, frame)

    def _register(self, frame: dict, conn: Connection) -> Any:
        """(a new Peer, its registered_auth text), or the error frame saying why not (see
        Directory.admission_problem for who may enter). A peer id claimed with a peer_key
        replaces, with that key, a connection that still holds the id."""
        kind = P.REGISTER
        user = ""
        if "id_token" in frame:
            user = self.directory.check_id_token(frame["id_token"]) or ""
            if not user:
                return P.error_frame(P.INVALID_TOKEN, "id_token is invalid or expired; sign in again", kind)
        if not frame.get("token") and frame.get("jwt"):
            user = self.directory.check_id_token(frame["jwt"]) or ""
            if not user:
                return P.error_frame(P.INVALID_TOKEN, "the jwt was not signed by this server or has expired; run "
                                     "`python client.py login --sleap-rtc-credentials` again", kind)
        peer_id = frame["peer_id"]
        with self.directory.lock:
            room = self.directory.rooms.get(frame["room_id"])
            if room is None:
                return P.error_frame(P.ROOM_NOT_FOUND, f"no room {P.echo(frame['room_id'])} on this server", kind)
            if (refusal := self.directory.admission_problem(room, frame, user)) is not None:
                return refusal
            metadata = P.merge_metadata({"tags": [], "properties": {}}, frame.get("metadata") or {})
            peer = Peer(peer_id, room.room_id, frame.get("role", "peer"), metadata, conn, user)
            if peer.metadata_bytes > MAX_METADATA_BYTES:
                return P.error_frame(P.MESSAGE_TOO_LARGE, f"metadata may hold at most {MAX_METADATA_BYTES} bytes", kind)
            stale = room.peers.get(peer_id)  # admitted: the holder of its claimed id, back again
            replaced = stale.public_json if stale is not None else ""  # the returning peer's old entry goes
            if (problem := self.directory.listing_problem(room, len(peer.public_json) - len(replaced))) is not None:
                return P.error_frame(P.ROOM_FULL, problem, kind)
            self.directory.claim(room, peer_id, frame.get("peer_key"))  # only a registration that succeeds claims
            if stale is not None:
                room.discard(stale)
            # No room token here: a peer that entered with a jwt or worker key does not learn it.
            welcome = P.registered_auth_json(room.room_id, peer_id, room.listing(), self._ice_servers_for(peer_id))
            room.add(peer)
        if stale is not None:  # the key's holder is back (a restarted worker): its old connection goes
            stale.conn.abort(f"{peer_id} registered again from a new connection")
        return peer, welcome

    def _ice_servers_for(self, peer_id: str) -> list[dict]:
        """The STUN/TURN servers a peer gets: the static ones, and TURN credentials of its own."""
        return self.ice_servers + ([self.turn.mint(peer_id)] if self.turn is not None else [])

    def _forward(self, peer: Peer, frame: dict) -> Optional[dict]:
        """Queue a frame for its target in the sender's room. Offers and answers link the
        two peers; quit passes only over such a link. Offers and peer messages carry the
        sender's signed-in user, as this server knows it."""
        kind = frame["type"]
        target_id = frame[P.TARGET_FIELD[kind]]
        with self.directory.lock:
            room = self.directory.rooms.get(peer.room_id)
            target = room.peers.get(target_id) if room is not None else None
            if target is not None:
                if kind == P.OFFER:
                    peer.offered_to[target_id] = None
                    peer.offered_to.move_to_end(target_id)
                    if len(peer.offered_to) > MAX_OFFERS_REMEMBERED:
                        peer.offered_to.popitem(last=False)
                elif kind == P.ANSWER and peer.peer_id in target.offered_to:
                    peer.linked.add(target_id)
                    target.linked.add(peer.peer_id)
            linked = target_id in peer.linked
            # A worker registered days ago answers offers with TURN credentials that expire,
            # and its relayed link lives only as long as they do: an hour (or half the TTL)
            # after they were handed out, it gets fresh ones, just before the offer.
            refresh = (kind == P.OFFER and target is not None and self.turn is not None
                       and time.monotonic() - target.ice_issued_at > min(self.turn.ttl_s / 2, TURN_REFRESH_S))
        if target is None:
            return P.error_frame(P.PEER_NOT_FOUND, f"no peer {P.echo(target_id)} in room {peer.room_id}", kind)
        if kind == P.QUIT and not linked:
            return P.error_frame(P.NOT_LINKED, f"{P.echo(target_id)} has no link with {peer.peer_id}: quit goes "
                                 "only to the other end of a link", kind)
        if kind in (P.OFFER, P.PEER_MESSAGE):
            frame.pop(P.FROM_USER, None)  # only this server says who a user is
            if peer.user:
                frame[P.FROM_USER] = peer.user
        if refresh and target.conn.enqueue(P.ice_servers_json(self._ice_servers_for(target_id))):
            with self.directory.lock:
                target.ice_issued_at = time.monotonic()
        if not target.conn.enqueue(json.dumps(frame)):
            return P.error_frame(P.DELIVERY_FAILED, f"peer {P.echo(target_id)} could not be reached", kind)
        return None


# ---------------------------------------------------------------------------------------
# HTTP API
# ---------------------------------------------------------------------------------------


class _HTTPServer(ThreadingHTTPServer):
    # The stdlib's backlog of 5 makes a burst of connections wait for SYN retries (1 s, 3 s).
    request_queue_size = 128


def _make_http_handler(server: SignalingServer):
    class Handler(BaseHTTPRequestHandler):
        server_version = f"sleap-rtc-signaling/{P.VERSION}"
        timeout = server.limits.http_timeout_s  # a request that stalls mid-way frees its thread

        def log_message(self, fmt, *args):
            log.debug("http: " + fmt, *args)

        def _reply(self, status: int, body: Any, content_type: str = "application/json") -> None:
            data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> tuple[Optional[dict], str]:
            """The JSON object sent, or (None, what is wrong with it)."""
            text = self.headers.get("Content-Length") or "0"
            if not text.isdigit():
                return None, f"Content-Length must be a number of bytes, not {P.echo(text)}"
            length = int(text)
            if length > server.limits.max_frame_bytes:
                return None, f"the body may have at most {server.limits.max_frame_bytes} bytes"
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except RecursionError:
                return None, f"the body nests deeper than {P.MAX_FRAME_DEPTH} levels"
            except ValueError:
                return None, "the request body must be a JSON object"
            if not isinstance(body, dict):
                return None, "the request body must be a JSON object"
            if P.too_deep(body):
                return None, f"the body nests deeper than {P.MAX_FRAME_DEPTH} levels"
            return body, ""

        def _user(self) -> Optional[str]:
            """The user of a valid `Authorization: Bearer <id_token>` header, or None."""
            auth = self.headers.get("Authorization", "")
            return server.directory.check_id_token(auth[7:].strip()) if auth.startswith("Bearer ") else None

        def do_GET(self):
            if self.path == "/health":
                self._reply(200, {"status": "healthy", "timestamp": _now_iso(), "version": P.VERSION})
            elif self.path == "/metrics":
                metrics = server.metrics()
                if "text/plain" in self.headers.get("Accept", ""):
                    self._reply(200, _prometheus(metrics), "text/plain; version=0.0.4")
                else:
                    self._reply(200, metrics)
            else:
                self._reply(404, {"error": f"no such endpoint: GET {self.path}"})

        def do_POST(self):
            body, problem = self._body()
            if body is None:
                self._reply(413 if "at most" in problem else 400, {"error": problem})
            elif self.path == "/anonymous-signin":
                id_token, username = server.directory.issue_id_token()
                self._reply(200, {"id_token": id_token, "username": username})
            elif self.path == "/create-room":
                auth = self.headers.get("Authorization", "")
                if not auth.startswith("Bearer "):
                    self._reply(401, {"error": "send 'Authorization: Bearer <id_token>' (POST /anonymous-signin)"})
                elif (user := server.directory.check_id_token(auth[7:].strip())) is None:
                    self._reply(401, {"error": "id_token is invalid or expired; sign in again"})
                else:
                    try:
                        room = server.directory.create_room(user, self.client_address[0])
                    except OverflowError as exc:
                        self._reply(503, {"error": str(exc)})
                        return
                    except PermissionError as exc:
                        self._reply(429, {"error": str(exc)})
                        return
                    self._reply(200, {"room_id": room.room_id, "token": room.token})
            elif self.path in ("/join-room", "/create-api-key"):
                room_id, token = body.get("room_id"), body.get("token")
                user = self._user()
                if not isinstance(room_id, str) or not isinstance(token, str):
                    self._reply(400, {"error": "send {room_id, token}: the room and its token"})
                elif self.path == "/join-room" and user is None:
                    self._reply(401, {"error": "send 'Authorization: Bearer <id_token>' (POST /anonymous-signin)"})
                else:
                    try:
                        if self.path == "/join-room":
                            server.directory.join_room(user, room_id, token)
                            self._reply(200, {"room_id": room_id, "user": user})
                        else:
                            self._reply(200, {"room_id": room_id, "api_key": server.directory.create_api_key(room_id, token)})
                    except PermissionError as exc:
                        self._reply(403, {"error": str(exc)})
                    except LookupError as exc:
                        self._reply(404, {"error": str(exc)})
            elif self.path == "/my-rooms":
                user = self._user()
                if user is None:
                    self._reply(401, {"error": "send 'Authorization: Bearer <id_token>' (POST /anonymous-signin)"})
                else:
                    self._reply(200, {"rooms": server.directory.rooms_of(user)})
            elif self.path == "/delete-peer":
                peer_id = body.get("peer_id")
                if not isinstance(peer_id, str):
                    self._reply(400, {"error": "send {peer_id} with 'Authorization: Bearer <id_token>'"})
                    return
                try:
                    self._reply(200, server.delete_peer(peer_id, self._user()))
                except PermissionError as exc:
                    self._reply(403, {"error": str(exc)})
            elif self.path == "/delete-peers-and-room":
                room_id, peer_id = body.get("room_id"), body.get("peer_id")
                if not isinstance(room_id, str) or not isinstance(peer_id, (str, type(None))):
                    self._reply(400, {"error": "send {room_id} (and peer_id to remove one peer) with "
                                               "'Authorization: Bearer <id_token>' of the room's creator"})
                    return
                try:
                    self._reply(200, server.delete(room_id, peer_id, self._user()))
                except PermissionError as exc:
                    self._reply(403, {"error": str(exc)})
                except LookupError as exc:
                    self._reply(404, {"error": str(exc)})
            else:
                self._reply(404, {"error": f"no such endpoint: POST {self.path}"})

    return Handler


def _prometheus(metrics: dict) -> str:
    lines = []
    for key, value in metrics.items():
        if isinstance(value, dict):
            lines.append(f"# TYPE sleap_rtc_{key} gauge")
            lines += [f'sleap_rtc_{key}{{role="{role}"}} {n}' for role, n in sorted(value.items())]
        else:
            lines.append(f"# TYPE sleap_rtc_{key} {'counter' if key.startswith('total') else 'gauge'}")
            lines.append(f"sleap_rtc_{key} {value}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------


def parse_ice_server(text: str) -> dict:
    """`stun:host:port` or `turn:user:password@host:port` -> an RTCIceServer-shaped dict."""
    scheme, _, rest = text.partition(":")
    if scheme not in ("stun", "stuns", "turn", "turns") or not rest:
        raise argparse.ArgumentTypeError(f"{text!r}: expected stun:HOST:PORT or turn:USER:PASSWORD@HOST:PORT")
    if "@" in rest:
        credentials, _, address = rest.rpartition("@")
        username, _, credential = credentials.partition(":")
        return {"urls": f"{scheme}:{address}", "username": username, "credential": credential}
    return {"urls": text}


def main(argv: Optional[list[str]] = None) -> int:
    parser = P.CommandLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=P.DEFAULT_WS_PORT, help="WebSocket port (default 8080; 0 picks one)")
    parser.add_argument("--http-port", type=int, default=P.DEFAULT_HTTP_PORT, help="HTTP API port (default 8001)")
    parser.add_argument("--ice-server", action="append", type=parse_ice_server, default=[],
                        help="STUN/TURN server handed to peers, e.g. stun:HOST:3478 (repeatable)")
    parser.add_argument("--turn-secret", default=os.environ.get("SLEAP_RTC_TURN_SECRET"), metavar="SECRET",
                        help="mint each peer its own TURN credentials from this secret, shared with the TURN "
                             "server (coturn: --use-auth-secret --static-auth-secret SECRET); default: "
                             "$SLEAP_RTC_TURN_SECRET, which keeps it out of the process list")
    parser.add_argument("--turn-url", action="append", default=[], metavar="URL",
                        help="a TURN URL the minted credentials are for, e.g. turn:HOST:3478 and "
                             "'turn:HOST:3478?transport=tcp' (repeatable; list UDP first)")
    parser.add_argument("--turn-ttl", type=float, default=TurnRest.ttl_s, metavar="S",
                        help="how long minted TURN credentials are valid (default 86400, a day); a peer gets "
                             "new ones when it registers again")
    parser.add_argument("--state-file", type=Path,
                        help="keep rooms and the sign-in key in this file, so they survive a restart")
    parser.add_argument("--max-peers-per-room", type=int, default=Limits.max_peers_per_room)
    parser.add_argument("--max-rooms", type=int, default=Limits.max_rooms)
    parser.add_argument("--max-rooms-per-user", type=int, default=Limits.max_rooms_per_user)
    parser.add_argument("--max-rooms-per-address", type=int, default=Limits.max_rooms_per_address)
    parser.add_argument("--room-ttl", type=float, default=Limits.room_ttl_s, metavar="S",
                        help="delete a room nobody has been in for S seconds (default 7 days)")
    parser.add_argument("--http-timeout", type=float, default=Limits.http_timeout_s, metavar="S",
                        help="drop an HTTP request that sends nothing for S seconds (default 10)")
    parser.add_argument("--rate", type=float, default=Limits.rate_per_s, help="frames per second per connection")
    parser.add_argument("--outbox-mb", type=float, default=OUTBOX_LIMIT_BYTES / 2**20, metavar="MB",
                        help="a peer with more than this waiting to be sent to it is closed as too slow "
                             f"(default {OUTBOX_LIMIT_BYTES / 2**20:g})")
    parser.add_argument("--ping-interval", type=float, default=P.SERVER_PING_INTERVAL_S, help=argparse.SUPPRESS)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(message)s")
    if not args.verbose:  # a line per connection opened and closed: too many for a busy server's log
        logging.getLogger("websockets").setLevel(logging.WARNING)
    limits = Limits(max_peers_per_room=args.max_peers_per_room, max_rooms=args.max_rooms,
                    max_rooms_per_user=args.max_rooms_per_user, max_rooms_per_address=args.max_rooms_per_address,
                    room_ttl_s=args.room_ttl, http_timeout_s=args.http_timeout,
                    rate_per_s=args.rate, rate_burst=max(1, int(args.rate * 2)),
                    outbox_bytes=int(args.outbox_mb * 2**20))
    if bool(args.turn_secret) != bool(args.turn_url):
        parser.error("--turn-secret and --turn-url go together: the secret mints credentials for those URLs")
    if args.turn_ttl <= 0:
        parser.error("--turn-ttl must be positive")
    for url in args.turn_url:
        if not url.startswith(("turn:", "turns:")):
            parser.error(f"--turn-url {url!r}: expected turn:HOST:PORT[?transport=tcp] or turns:HOST:PORT")
    turn = TurnRest(args.turn_secret, tuple(args.turn_url), args.turn_ttl) if args.turn_secret else None
    server = SignalingServer(args.host, args.port, args.http_port, args.ice_server, args.state_file, limits,
                             args.ping_interval, turn)
    try:
        server.start()
    except OSError as exc:
        print(f"error: cannot listen on {args.host}: {exc}", flush=True)
        return 1
    print(f"signaling: websocket {server.ws_url}  http {server.http_url}", flush=True)
    if not args.state_file:
        print("signaling: rooms are kept in memory only; pass --state-file to keep them across restarts", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop()
    print("signaling: stopped", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
