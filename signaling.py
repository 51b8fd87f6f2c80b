"""The sleap-rtc signaling server: rooms, peers, discovery and routing (the v2 API).

It never interprets job payloads: it registers peers into rooms, answers discovery,
merges metadata and forwards peer messages and WebRTC offers/answers/candidates between
peers of one room. Frames are JSON text over WebSocket (`websockets.sync.server`, a
thread per connection); an HTTP API on its own port (stdlib `ThreadingHTTPServer`) signs
users in, creates and deletes rooms and reports health and metrics.

A peer enters a room with the room's token. Unmodified sleap-rtc 0.0.7 programs enter
without it: a client with the JWT this server's sign-in issued, when its user created the
room or joined it once with the token (POST /join-room), and a worker with a key the
room issued (POST /create-api-key). Error frames carry `reason` for them besides `code`
and `message`, and POST /delete-peer answers their exit.

    python signaling.py [--host 127.0.0.1] [--port 8080] [--http-port 8001]
                        [--ice-server URL ...] [--state-file rooms.json] [--room-ttl S]
                        [--max-rooms-per-user N] [--max-rooms-per-address N]
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import logging
import os
import secrets
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Optional

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
# A peer's metadata is copied into every discovery answer and join notice: keep it small.
MAX_METADATA_BYTES = 64 * 1024


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


@dataclass
class Peer:
    peer_id: str
    room_id: str
    role: str
    metadata: dict
    connected_at: str
    conn: Any  # websockets.sync.server.ServerConnection
    user: str = ""  # the signed-in user, when it registered with a jwt

    def public(self) -> dict:
        return {"peer_id": self.peer_id, "role": self.role, "metadata": self.metadata,
                "connected_at": self.connected_at}


@dataclass
class Room:
    room_id: str
    token: str
    created_at: str
    owner: str = ""  # the user who created it
    address: str = ""  # the address it was created from
    empty_since: Optional[float] = field(default_factory=time.time)  # None while peers are in it
    # Users who presented the room's token once (POST /join-room): with the owner, the
    # users whose jwt alone lets them register (sleap-rtc 0.0.7 clients).
    members: set[str] = field(default_factory=set)
    # SHA-256 of each worker key issued for the room (POST /create-api-key); never the keys.
    api_keys: set[str] = field(default_factory=set)
    peers: dict[str, Peer] = field(default_factory=dict)

    def saved(self) -> dict:
        return {"token": self.token, "created_at": self.created_at, "owner": self.owner, "address": self.address,
                "empty_since": self.empty_since if self.empty_since is not None else time.time(),
                "members": sorted(self.members), "api_keys": sorted(self.api_keys)}

    def admits(self, user: str) -> bool:
        return bool(user) and (user == self.owner or user in self.members)


class _RateLimiter:
    """A token bucket; used only by its connection's own thread."""

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, burst
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def allow(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
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


def matches(peer: Peer, filters: dict) -> bool:
    """Whether a peer passes role, all-tags and property filters (a missing property never does)."""
    if "role" in filters and peer.role != filters["role"]:
        return False
    tags = set(peer.metadata.get("tags", []))
    if not set(filters.get("tags", [])) <= tags:
        return False
    properties = peer.metadata.get("properties", {})
    for key, condition in filters.get("properties", {}).items():
        if key not in properties:
            return False
        value = properties[key]
        conditions = condition.items() if isinstance(condition, dict) else [("$eq", condition)]
        for op, operand in conditions:
            try:
                if not _COMPARISONS[op](value, operand):
                    return False
            except TypeError:  # e.g. "A100" >= 8000
                return False
    return True


# ---------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------


class SignalingServer:
    """Rooms and peers in memory (rooms also in `state_file` when given), served on two ports.

    Threads, all stopped by `stop()`: "signaling-ws" (websockets' accept loop, which starts
    one thread per connection), "signaling-http" and "signaling-pinger".
    """

    def __init__(self, host: str = "127.0.0.1", port: int = P.DEFAULT_WS_PORT,
                 http_port: int = P.DEFAULT_HTTP_PORT, ice_servers: Optional[list[dict]] = None,
                 state_file: Optional[Path] = None, limits: Optional[Limits] = None,
                 ping_interval: float = P.SERVER_PING_INTERVAL_S):
        self.host = host
        self.port = port
        self.http_port = http_port
        self.ice_servers = ice_servers or []
        self.state_file = Path(state_file) if state_file else None
        self.limits = limits or Limits()
        self.ping_interval = ping_interval
        self.started = time.time()
        # Guards rooms, peers, the counters below and writes of the state file.
        self._lock = threading.Lock()
        self.rooms: dict[str, Room] = {}
        self.peers: dict[str, Peer] = {}
        self.total_connections = 0
        self.active_connections = 0
        self.total_messages = 0
        self.rooms_created = 0
        self._secret = secrets.token_bytes(32)
        self._load_state()
        self._stopping = threading.Event()
        self._ws_server = None
        self._http_server: Optional[ThreadingHTTPServer] = None
        self._threads: list[threading.Thread] = []

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> "SignalingServer":
        from websockets.sync.server import serve

        self._ws_server = serve(self._serve_connection, self.host, self.port, max_size=HARD_FRAME_LIMIT,
                                compression=None, close_timeout=CLOSE_TIMEOUT_S)
        self.port = self._ws_server.socket.getsockname()[1]
        self._http_server = _HTTPServer((self.host, self.http_port), _make_http_handler(self))
        self._http_server.daemon_threads = True
        self.http_port = self._http_server.server_address[1]
        for name, target in (("signaling-ws", self._ws_server.serve_forever),
                             ("signaling-http", self._http_server.serve_forever),
                             ("signaling-pinger", self._ping_forever)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._http_server:
            self._http_server.shutdown()
            self._http_server.server_close()
        if self._ws_server:
            self._ws_server.shutdown()  # closes every connection too
        for thread in self._threads:
            thread.join(timeout=5)

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def _ping_forever(self) -> None:
        """Ping every peer, and delete rooms that stayed empty past their time."""
        while not self._stopping.wait(self.ping_interval):
            with self._lock:
                peers = list(self.peers.values())
                if self._expire_rooms():
                    self._save_state()
            self._broadcast(peers, {"type": P.PING})

    def _expire_rooms(self) -> list[str]:
        """Delete rooms empty for longer than the TTL (caller holds _lock or owns the server)."""
        cutoff = time.time() - self.limits.room_ttl_s
        expired = [r.room_id for r in self.rooms.values()
                   if not r.peers and r.empty_since is not None and r.empty_since < cutoff]
        for room_id in expired:
            del self.rooms[room_id]
            log.info("room %s expired: nobody was in it for %.0f s", room_id, self.limits.room_ttl_s)
        return expired

    # -- rooms and state ----------------------------------------------------------------

    def _load_state(self) -> None:
        if not self.state_file or not self.state_file.exists():
            return
        state = json.loads(self.state_file.read_text())
        self._secret = bytes.fromhex(state["secret"])
        for room_id, room in state.get("rooms", {}).items():
            self.rooms[room_id] = Room(room_id, room["token"], room["created_at"], room.get("owner", ""),
                                       room.get("address", ""), room.get("empty_since", time.time()),
                                       set(room.get("members", [])), set(room.get("api_keys", [])))
        self._expire_rooms()

    def _save_state(self) -> None:
        """Write rooms and the signing secret atomically (caller holds _lock)."""
        if not self.state_file:
            return
        state = {"secret": self._secret.hex(), "rooms": {r.room_id: r.saved() for r in self.rooms.values()}}
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_name(self.state_file.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(state, f)
        os.replace(tmp, self.state_file)

    def create_room(self, owner: str = "", address: str = "") -> Room:
        """A new room; raises OverflowError when the server is full, PermissionError when
        this user or address holds its share of rooms already."""
        with self._lock:
            if len(self.rooms) >= self.limits.max_rooms:
                raise OverflowError(f"the server holds its maximum of {self.limits.max_rooms} rooms")
            if owner and sum(r.owner == owner for r in self.rooms.values()) >= self.limits.max_rooms_per_user:
                raise PermissionError(f"user {owner} has created {self.limits.max_rooms_per_user} rooms already; "
                                      "reuse one (rooms nobody joins expire)")
            if address and sum(r.address == address for r in self.rooms.values()) >= self.limits.max_rooms_per_address:
                raise PermissionError(f"{self.limits.max_rooms_per_address} rooms were created from {address} "
                                      "already; reuse one (rooms nobody joins expire)")
            room = Room(secrets.token_hex(8), secrets.token_urlsafe(24), _now_iso(), owner, address)
            self.rooms[room.room_id] = room
            self.rooms_created += 1
            self._save_state()
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
        with self._lock:
            room = self._room_for(room_id, token)
            room.members.add(user)
            self._save_state()

    def create_api_key(self, room_id: str, token: str) -> str:
        """A new worker key for the room (sleap-rtc 0.0.7 workers register with it); only
        its SHA-256 is kept."""
        key = "slp_" + secrets.token_hex(24)
        with self._lock:
            self._room_for(room_id, token).api_keys.add(_key_digest(key))
            self._save_state()
        return key

    def _room_for(self, room_id: str, token: str) -> Room:
        """The room, when `token` is its token (caller holds _lock)."""
        room = self.rooms.get(room_id)
        if room is None:
            raise LookupError(f"no room {P.echo(room_id)} on this server")
        if not _same(room.token, token):
            raise PermissionError(f"wrong token for room {room_id}")
        return room

    def delete(self, room_id: Optional[str], peer_id: Optional[str], token: str) -> dict:
        """Disconnect one peer or a whole room; raises PermissionError / LookupError."""
        with self._lock:
            if peer_id:
                peer = self.peers.get(peer_id)
                if peer is None:
                    raise LookupError(f"no peer {peer_id}")
                room = self.rooms[peer.room_id]
            else:
                room = self.rooms.get(room_id or "")
                if room is None:
                    raise LookupError(f"no room {room_id}")
            if not _same(room.token, token):
                raise PermissionError("wrong room token")
            if peer_id:
                victims = [room.peers[peer_id]]
            else:
                victims = list(room.peers.values())
                del self.rooms[room.room_id]
                self._save_state()
        for victim in victims:
            self._evict(victim)
        return {"deleted_peers": [v.peer_id for v in victims], "room_deleted": not peer_id}

    def delete_peer(self, peer_id: str, user: Optional[str], token: str) -> dict:
        """sleap-rtc 0.0.7's POST /delete-peer: disconnect a peer when the caller is the
        user it registered as, or holds its room's token. Every client calls it on exit,
        usually after its connection closed, so an absent peer is an answer, not an error."""
        with self._lock:
            peer = self.peers.get(peer_id)
            if peer is None:
                return {"deleted": False, "reason": f"no peer {P.echo(peer_id)} is connected"}
            allowed = (user is not None and user == peer.user) or \
                (bool(token) and _same(self.rooms[peer.room_id].token, token))
        if not allowed:
            raise PermissionError(f"only the user {peer_id} signed in as, or a holder of its room's token, "
                                  "may delete it")
        self._evict(peer)
        return {"deleted": True, "peer_id": peer_id}

    def _evict(self, peer: Peer) -> None:
        """Take a peer out of its room and close its connection. The close handshake waits
        up to CLOSE_TIMEOUT_S for the peer; the HTTP answer must not, so the close runs in
        a short-lived thread of its own ("signaling-evict-PEER", ended by the close)."""
        self._remove_peer(peer)
        threading.Thread(target=peer.conn.close, name=f"signaling-evict-{peer.peer_id}", daemon=True).start()

    def metrics(self) -> dict:
        with self._lock:
            by_role: dict[str, int] = {}
            for peer in self.peers.values():
                by_role[peer.role] = by_role.get(peer.role, 0) + 1
            return {"active_rooms": len(self.rooms), "active_connections": self.active_connections,
                    "peers_by_role": by_role, "total_connections": self.total_connections,
                    "total_messages": self.total_messages, "rooms_created": self.rooms_created,
                    "uptime_s": round(time.time() - self.started, 1)}

    # -- WebSocket connections ----------------------------------------------------------

    def _send(self, conn, frame: dict) -> bool:
        return self._send_text(conn, json.dumps(frame))

    def _send_text(self, conn, text: str) -> bool:
        from websockets.exceptions import ConnectionClosed

        try:
            conn.send(text)
            return True
        except (ConnectionClosed, OSError):  # closed or closing: the peer's own thread cleans up
            return False

    def _broadcast(self, peers: list[Peer], frame: dict) -> None:
        text = json.dumps(frame)
        for peer in peers:
            self._send_text(peer.conn, text)

    def _serve_connection(self, conn) -> None:
        from websockets.exceptions import ConnectionClosed

        with self._lock:
            self.total_connections += 1
            self.active_connections += 1
        peer: Optional[Peer] = None
        limiter = _RateLimiter(self.limits.rate_per_s, self.limits.rate_burst)
        try:
            for text in conn:
                with self._lock:
                    self.total_messages += 1
                _, reply = self._handle_frame(text, conn, peer, limiter)
                if isinstance(reply, Peer):
                    peer = reply  # from here on, however the connection ends, the peer is removed
                    self._send(conn, self._registered_auth(peer))
                    self._broadcast(self._others(peer), {"type": P.PEER_JOINED, **peer.public()})
                elif reply is not None:
                    self._send(conn, reply)
        except ConnectionClosed as exc:  # a dropped connection ends here
            log.debug("connection ended: %s", exc)
        except Exception:  # a bug must end only this connection, and say where it is
            log.exception("connection of %s ended by an error", peer.peer_id if peer else "an unregistered peer")
        finally:
            with self._lock:
                self.active_connections -= 1
            if peer is not None:
                self._remove_peer(peer)

    def _handle_frame(self, text, conn, peer: Optional[Peer], limiter: _RateLimiter) -> tuple[Optional[str], Any]:
        """Answer one frame: returns (frame type, reply frame | newly registered Peer | None)."""
        if not limiter.allow():
            return None, P.error_frame(P.RATE_LIMITED, f"more than {self.limits.rate_per_s:g} frames/s; slow down")
        if isinstance(text, bytes):
            return None, P.error_frame(P.INVALID_MESSAGE, "binary frames are not part of the API; send JSON text")
        size = len(text) if len(text) * 4 <= self.limits.max_frame_bytes else len(text.encode("utf-8", "replace"))
        if size > self.limits.max_frame_bytes:
            return None, P.error_frame(P.MESSAGE_TOO_LARGE,
                                       f"frame of {size} bytes exceeds the {self.limits.max_frame_bytes} byte limit")
        try:
            frame = json.loads(text)
        except RecursionError:
            return None, P.error_frame(P.INVALID_JSON, f"frame nests deeper than {P.MAX_FRAME_DEPTH} levels")
        except ValueError as exc:
            return None, P.error_frame(P.INVALID_JSON, f"frame is not valid JSON: {str(exc)[:200]}")
        if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
            return None, P.error_frame(P.INVALID_MESSAGE, "a frame is a JSON object with a string 'type'")
        if P.too_deep(frame):
            return None, P.error_frame(P.INVALID_MESSAGE, f"frame nests deeper than {P.MAX_FRAME_DEPTH} levels")
        kind = frame["type"]
        if kind not in P.FRAME_FIELDS:
            return kind, P.error_frame(P.UNKNOWN_MESSAGE_TYPE, f"unknown message type {P.echo(kind)}", kind)
        problem = P.check_frame(frame)
        if problem:
            return kind, P.error_frame(P.INVALID_MESSAGE, problem, kind)
        if kind == P.PING:
            return kind, {"type": P.PONG, "timestamp": time.time()}
        if kind == P.PONG:
            return kind, None
        if kind == P.REGISTER:
            if peer is not None:
                return kind, P.error_frame(P.ALREADY_REGISTERED, f"this connection is already {peer.peer_id}", kind)
            return kind, self._register(frame, conn)
        if peer is None:
            return kind, P.error_frame(P.NOT_IN_ROOM, f"register before sending {kind}", kind)
        sender = frame[P.SENDER_FIELD[kind]]
        if sender != peer.peer_id:
            field = P.SENDER_FIELD[kind]
            return kind, P.error_frame(P.SPOOFED_SENDER, f"{field} {P.echo(sender)} is not this connection's peer id",
                                       kind)
        if kind == P.DISCOVER_PEERS:
            return kind, self._discover(peer, frame.get("filters", {}))
        if kind == P.UPDATE_METADATA:
            return kind, self._update_metadata(peer, frame["metadata"])
        return kind, self._forward(peer, frame)

    def _register(self, frame: dict, conn) -> Any:
        """A new Peer, or the error frame saying why not. The room's token admits anyone;
        without it (sleap-rtc 0.0.7) a jwt this server signed admits the room's owner and
        members, and an api_key admits a worker the room issued it to."""
        kind = P.REGISTER
        if "id_token" in frame and self.check_id_token(frame["id_token"]) is None:
            return P.error_frame(P.INVALID_TOKEN, "id_token is invalid or expired; sign in again", kind)
        user = ""
        if not frame.get("token") and frame.get("jwt"):
            user = self.check_id_token(frame["jwt"]) or ""
            if not user:
                return P.error_frame(P.INVALID_TOKEN, "the jwt was not signed by this server or has expired; run "
                                     "`python client.py login --sleap-rtc-credentials` again", kind)
        with self._lock:
            room = self.rooms.get(frame["room_id"])
            if room is None:
                return P.error_frame(P.ROOM_NOT_FOUND, f"no room {P.echo(frame['room_id'])} on this server", kind)
            if frame.get("token"):
                if not _same(room.token, frame["token"]):
                    return P.error_frame(P.INVALID_TOKEN, f"wrong token for room {room.room_id}", kind)
            elif user:
                if not room.admits(user):
                    return P.error_frame(P.NOT_A_MEMBER, f"user {user} has not joined room {room.room_id}: "
                                         "join it once with the room's token (`python client.py login "
                                         "--sleap-rtc-credentials --room ROOM --token TOKEN`)", kind)
            elif frame.get("api_key"):
                if _key_digest(frame["api_key"]) not in room.api_keys:
                    return P.error_frame(P.INVALID_TOKEN, f"the api_key is not a worker key of room {room.room_id} "
                                         "(`python client.py login --sleap-rtc-credentials` issues one)", kind)
            else:
                return P.error_frame(P.INVALID_TOKEN, "register with the room's token, a jwt from this server's "
                                     "sign-in, or a worker api_key", kind)
            if frame["peer_id"] in self.peers:
                return P.error_frame(P.PEER_ID_TAKEN, f"peer id {frame['peer_id']!r} is connected already", kind)
            if len(room.peers) >= self.limits.max_peers_per_room:
                return P.error_frame(P.ROOM_FULL, f"room {room.room_id} holds its maximum of "
                                     f"{self.limits.max_peers_per_room} peers", kind)
            metadata = P.merge_metadata({"tags": [], "properties": {}}, frame.get("metadata") or {})
            if len(json.dumps(metadata)) > MAX_METADATA_BYTES:
                return P.error_frame(P.MESSAGE_TOO_LARGE, f"metadata may hold at most {MAX_METADATA_BYTES} bytes", kind)
            peer = Peer(frame["peer_id"], room.room_id, frame.get("role", "peer"), metadata, _now_iso(), conn, user)
            room.peers[peer.peer_id] = peer
            room.empty_since = None
            self.peers[peer.peer_id] = peer
        return peer

    def _others(self, peer: Peer) -> list[Peer]:
        with self._lock:
            room = self.rooms.get(peer.room_id)
            return [p for p in room.peers.values() if p is not peer] if room else []

    def _registered_auth(self, peer: Peer) -> dict:
        # No room token here: a peer that entered with a jwt or worker key does not learn it.
        return {"type": P.REGISTERED_AUTH, "room_id": peer.room_id, "peer_id": peer.peer_id,
                "peer_list": [p.public() for p in self._others(peer)], "ice_servers": self.ice_servers}

    def _remove_peer(self, peer: Peer) -> None:
        with self._lock:
            if self.peers.get(peer.peer_id) is not peer:
                return
            del self.peers[peer.peer_id]
            room = self.rooms.get(peer.room_id)
            others = []
            if room is not None:
                room.peers.pop(peer.peer_id, None)
                others = list(room.peers.values())
                if not others:
                    room.empty_since = time.time()
        self._broadcast(others, {"type": P.PEER_LEFT, "peer_id": peer.peer_id})

    def _discover(self, peer: Peer, filters: Any) -> dict:
        problem = check_filters(filters)
        if problem:
            return P.error_frame(P.INVALID_MESSAGE, problem, P.DISCOVER_PEERS)
        with self._lock:
            found = [p.public() for p in self.rooms[peer.room_id].peers.values()
                     if p is not peer and matches(p, filters)]
        return {"type": P.PEER_LIST, "to_peer_id": peer.peer_id, "count": len(found), "peers": found}

    def _update_metadata(self, peer: Peer, update: dict) -> dict:
        with self._lock:
            merged = P.merge_metadata(peer.metadata, update)
            if len(json.dumps(merged)) > MAX_METADATA_BYTES:
                return P.error_frame(P.MESSAGE_TOO_LARGE, f"metadata may hold at most {MAX_METADATA_BYTES} bytes",
                                     P.UPDATE_METADATA)
            peer.metadata = merged
        return {"type": P.METADATA_UPDATED, "peer_id": peer.peer_id, "metadata": merged}

    def _forward(self, peer: Peer, frame: dict) -> Optional[dict]:
        kind = frame["type"]
        target_id = frame[P.TARGET_FIELD[kind]]
        with self._lock:
            target = self.peers.get(target_id)
        if target is None:
            return P.error_frame(P.PEER_NOT_FOUND, f"no peer {P.echo(target_id)} is connected", kind)
        if target.room_id != peer.room_id:
            return P.error_frame(P.PEER_NOT_IN_ROOM, f"peer {P.echo(target_id)} is not in room {peer.room_id}", kind)
        if not self._send(target.conn, frame):
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
            return server.check_id_token(auth[7:].strip()) if auth.startswith("Bearer ") else None

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
                id_token, username = server.issue_id_token()
                self._reply(200, {"id_token": id_token, "username": username})
            elif self.path == "/create-room":
                auth = self.headers.get("Authorization", "")
                if not auth.startswith("Bearer "):
                    self._reply(401, {"error": "send 'Authorization: Bearer <id_token>' (POST /anonymous-signin)"})
                elif (user := server.check_id_token(auth[7:].strip())) is None:
                    self._reply(401, {"error": "id_token is invalid or expired; sign in again"})
                else:
                    try:
                        room = server.create_room(user, self.client_address[0])
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
                            server.join_room(user, room_id, token)
                            self._reply(200, {"room_id": room_id, "user": user})
                        else:
                            self._reply(200, {"room_id": room_id, "api_key": server.create_api_key(room_id, token)})
                    except PermissionError as exc:
                        self._reply(403, {"error": str(exc)})
                    except LookupError as exc:
                        self._reply(404, {"error": str(exc)})
            elif self.path == "/delete-peer":
                peer_id, token = body.get("peer_id"), body.get("token", "")
                if not isinstance(peer_id, str) or not isinstance(token, str):
                    self._reply(400, {"error": "send {peer_id} with 'Authorization: Bearer <id_token>', "
                                               "or {peer_id, token}"})
                    return
                try:
                    self._reply(200, server.delete_peer(peer_id, self._user(), token))
                except PermissionError as exc:
                    self._reply(403, {"error": str(exc)})
            elif self.path == "/delete-peers-and-room":
                room_id, peer_id, token = body.get("room_id"), body.get("peer_id"), body.get("token")
                if not isinstance(token, str) or not (isinstance(room_id, str) or isinstance(peer_id, str)):
                    self._reply(400, {"error": "send {room_id, token} or {peer_id, token}"})
                    return
                try:
                    self._reply(200, server.delete(room_id, peer_id, token))
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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=P.DEFAULT_WS_PORT, help="WebSocket port (default 8080; 0 picks one)")
    parser.add_argument("--http-port", type=int, default=P.DEFAULT_HTTP_PORT, help="HTTP API port (default 8001)")
    parser.add_argument("--ice-server", action="append", type=parse_ice_server, default=[],
                        help="STUN/TURN server handed to peers, e.g. stun:HOST:3478 (repeatable)")
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
    parser.add_argument("--ping-interval", type=float, default=P.SERVER_PING_INTERVAL_S, help=argparse.SUPPRESS)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(message)s")
    limits = Limits(max_peers_per_room=args.max_peers_per_room, max_rooms=args.max_rooms,
                    max_rooms_per_user=args.max_rooms_per_user, max_rooms_per_address=args.max_rooms_per_address,
                    room_ttl_s=args.room_ttl, http_timeout_s=args.http_timeout,
                    rate_per_s=args.rate, rate_burst=max(1, int(args.rate * 2)))
    server = SignalingServer(args.host, args.port, args.http_port, args.ice_server, args.state_file, limits,
                             args.ping_interval)
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
