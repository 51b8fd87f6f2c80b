"""The shared wire of sleap-rtc: what the signaling server, the worker and the client agree on.

Read top to bottom:

1. constants and environment variables;
2. errors;
3. signaling frames (v2 API): type names, error codes, field checks, metadata merging;
4. data-channel messages: `NAME` or `NAME::{json}` text frames, a builder for each
   application message (and readers), and job specs;
5. links of unmodified sleap-rtc 0.0.7 clients: their channel labels (the dialect itself
   is upstream.py);
6. the HTTP API beside the signaling server;
7. `SignalingClient`: one websocket-client connection, one reader thread, reconnects;
8. the asyncio loop thread that owns every aiortc object of this process;
9. ICE servers: which of those handed out this network can use, and why a link found
   no path;
10. direct transfers: file bytes over an AES-256-GCM TCP connection beside the link,
    when the two machines can reach each other;
11. `Transfers`, the receiving end of a link's file transfers (no I/O of its own),
    `FileSender`, the sending end, and `Link`: a WebRTC data channel driven from plain
    threads, with heartbeats, backpressure, acknowledged close and checked file
    transfers (direct when it can).

Only the standard library, websocket-client and (lazily) aiortc and cryptography, which
comes with it, are imported, so the client never needs torch or sleap-nn.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import queue
import random
import re
import secrets
import selectors
import shutil
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

log = logging.getLogger("sleap_rtc")

# ---------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------

VERSION = "0.2.0"

DEFAULT_WS_PORT = 8080
DEFAULT_HTTP_PORT = 8001
DEFAULT_SERVER_URL = f"ws://127.0.0.1:{DEFAULT_WS_PORT}"

ENV_SERVER = "SLEAP_RTC_SERVER"
ENV_ROOM = "SLEAP_RTC_ROOM"
ENV_TOKEN = "SLEAP_RTC_TOKEN"
ENV_HTTP = "SLEAP_RTC_HTTP"
# The worker to use when the server cannot discover peers (servers before the v2 API).
ENV_WORKER_PEER_ID = "SLEAP_RTC_WORKER_PEER_ID"
# Comma-separated addresses: the only host candidates this process offers. Tests set it
# to 127.0.0.1 so that no test traffic leaves loopback.
ENV_ICE_HOSTS = "SLEAP_RTC_ICE_HOSTS"
# Set (to anything but 0/false/no): file bytes always take the data channel, never a
# direct TCP connection. `--no-direct` on the command lines sets it.
ENV_NO_DIRECT = "SLEAP_RTC_NO_DIRECT"

# Largest signaling frame the server accepts (a bigger one gets MESSAGE_TOO_LARGE).
MAX_FRAME_BYTES = 1024 * 1024

# aiortc's largest data-channel message; one byte more raises ValueError.
CHUNK_BYTES = 256 * 1024
# A sender blocks while more than SEND_HIGH_WATER bytes wait in the SCTP queue and resumes
# when they fall to SEND_LOW_WATER (aiortc's bufferedamountlow event).
SEND_HIGH_WATER = 4 * 1024 * 1024
SEND_LOW_WATER = 1024 * 1024

HEARTBEAT_INTERVAL_S = 1.0
# A peer silent for this long is gone; ICE consent alone would take ~30 s.
PEER_TIMEOUT_S = 5.0
LINK_OPEN_TIMEOUT_S = 20.0
CLOSE_ACK_TIMEOUT_S = 2.0
# After the last byte of a file, how long the sender waits for the receiver's verdict (its
# receive thread may still be writing what arrived).
FILE_ACK_TIMEOUT_S = 3 * PEER_TIMEOUT_S
# A sender tries direct connections this long before it sends over the link instead.
DIRECT_CONNECT_TIMEOUT_S = 1.0
# A receiver keeps its listener open this long for a sender that has not chosen yet.
DIRECT_LISTEN_S = 10.0
# A direct connection that moves nothing for this long is broken.
DIRECT_IO_TIMEOUT_S = 30.0

# The server pings every connection this often; a client that hears nothing for
# SERVER_SILENCE_S assumes the connection is dead and reconnects.
SERVER_PING_INTERVAL_S = 30.0
SERVER_SILENCE_S = 45.0

RECONNECT_FIRST_DELAY_S = 0.5
RECONNECT_MAX_DELAY_S = 8.0
REQUEST_TIMEOUT_S = 10.0
# Unclaimed signaling events kept per connection before the oldest are dropped.
MAILBOX_LIMIT = 1000


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------


class SleapRTCError(Exception):
    """Base of every error this project raises on purpose; its text is for the user."""


class ProtocolError(SleapRTCError):
    """A frame or message that does not follow the wire format."""


class SignalingError(SleapRTCError):
    """The signaling server answered with an error frame, or could not be reached."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class LinkClosed(SleapRTCError):
    """The WebRTC link is closed; the text says why (closed, vanished peer, ...)."""


class PeerGone(LinkClosed):
    """No link could be opened because the peer is not in the room (any more)."""


class LinkTimeout(SleapRTCError):
    """Nothing that was waited for arrived in time, though the link is still up."""


class PeerError(SleapRTCError):
    """The peer answered with an ERROR message; the text is its message."""


class TransferError(SleapRTCError):
    """A file transfer failed; no file was left under its final name."""


class NoWorkersAvailableError(SleapRTCError):
    """No worker in the room fits the job; the text says what is there instead."""


class NoWorkersAcceptedError(SleapRTCError):
    """Workers fit the job but none accepted it; the text gives each one's reason."""


class JobFailedError(SleapRTCError):
    """The job ended failed or cancelled, so what was asked of it cannot be done."""


# ---------------------------------------------------------------------------------------
# Signaling frames (v2 API)
# ---------------------------------------------------------------------------------------

REGISTER = "register"
REGISTERED_AUTH = "registered_auth"
DISCOVER_PEERS = "discover_peers"
PEER_LIST = "peer_list"
UPDATE_METADATA = "update_metadata"
METADATA_UPDATED = "metadata_updated"
PEER_MESSAGE = "peer_message"
OFFER = "offer"
ANSWER = "answer"
CANDIDATE = "candidate"
PING = "ping"
PONG = "pong"
ERROR = "error"
# Server -> peer: fresh ICE servers (TURN credentials about to expire), sent just before an
# offer reaches a peer registered long ago. A frame type no member can send.
ICE_SERVERS = "ice_servers"
# Tells a peer its counterpart is done with it: sleap-rtc 0.0.7 clients exit on it. The
# server forwards it only between the two ends of a link (an offer one way, its answer back).
QUIT = "quit"
# Stamped by the server on the offers and peer messages it forwards from a peer that
# registered as a signed-in user (id_token or jwt): who sent it, as the server vouches.
# A value the sender put there itself is removed.
FROM_USER = "from_user"

# Requests a peer makes of the server, and the reply type of each.
REQUEST_REPLIES = {DISCOVER_PEERS: PEER_LIST, UPDATE_METADATA: METADATA_UPDATED, PING: PONG}

# Error codes of error frames.
INVALID_JSON = "INVALID_JSON"
INVALID_MESSAGE = "INVALID_MESSAGE"
UNKNOWN_MESSAGE_TYPE = "UNKNOWN_MESSAGE_TYPE"
NOT_IN_ROOM = "NOT_IN_ROOM"
ROOM_NOT_FOUND = "ROOM_NOT_FOUND"
PEER_NOT_FOUND = "PEER_NOT_FOUND"  # no peer of that id in the sender's room (ids are unique per room)
DELIVERY_FAILED = "DELIVERY_FAILED"
INVALID_TOKEN = "INVALID_TOKEN"
PEER_ID_TAKEN = "PEER_ID_TAKEN"
SPOOFED_SENDER = "SPOOFED_SENDER"
MESSAGE_TOO_LARGE = "MESSAGE_TOO_LARGE"
RATE_LIMITED = "RATE_LIMITED"
ROOM_FULL = "ROOM_FULL"
ALREADY_REGISTERED = "ALREADY_REGISTERED"
NOT_A_MEMBER = "NOT_A_MEMBER"
NOT_LINKED = "NOT_LINKED"  # a quit to a peer the sender has no link with
INTERNAL_ERROR = "INTERNAL_ERROR"  # the server failed on the frame (a bug; its log says where)
# Client-side only: the connection is down and being re-established.
DISCONNECTED = "DISCONNECTED"

# Required fields of each client->server frame and their types. Optional fields are
# checked where they are used.
FRAME_FIELDS: dict[str, dict[str, type]] = {
    # Plus one credential: the room's `token`, or (sleap-rtc 0.0.7) a `jwt` from this
    # server's sign-in or a worker `api_key` the room issued; see check_frame.
    REGISTER: {"peer_id": str, "room_id": str},
    DISCOVER_PEERS: {"from_peer_id": str},
    UPDATE_METADATA: {"peer_id": str, "metadata": dict},
    PEER_MESSAGE: {"from_peer_id": str, "to_peer_id": str, "payload": object},
    OFFER: {"sender": str, "target": str, "sdp": str},
    ANSWER: {"sender": str, "target": str, "sdp": str},
    CANDIDATE: {"sender": str, "target": str, "candidate": object},
    QUIT: {"sender": str, "target": str},
    PING: {},
    PONG: {},
}

# The frame field naming the speaker, and the one naming the addressee.
SENDER_FIELD = {
    DISCOVER_PEERS: "from_peer_id",
    UPDATE_METADATA: "peer_id",
    PEER_MESSAGE: "from_peer_id",
    OFFER: "sender",
    ANSWER: "sender",
    CANDIDATE: "sender",
    QUIT: "sender",
}
TARGET_FIELD = {PEER_MESSAGE: "to_peer_id", OFFER: "target", ANSWER: "target", CANDIDATE: "target",
                QUIT: "target"}
# The credentials a register frame may carry; an empty or null one counts as absent.
REGISTER_CREDENTIALS = ("token", "jwt", "api_key")
# A register frame may carry `peer_key` (a secret of up to this many characters): the
# first registration of a peer id with a key claims that id in its room, and from then
# on only the same key registers it, replacing a connection that still holds it (a
# worker that restarted). A peer that never sends a key claims nothing.
MAX_PEER_KEY_CHARS = 256

# Patterns of names a peer sends are used with fullmatch: `$` lets a trailing newline through.
_PEER_ID_RE = re.compile(r"[A-Za-z0-9._:@-]{1,128}")


def check_frame(frame: dict) -> Optional[str]:
    """Return what is wrong with a client->server frame of a known type, or None."""
    for field, kind in FRAME_FIELDS[frame["type"]].items():
        if field not in frame:
            return f"'{frame['type']}' needs the field '{field}'"
        if kind is not object and not isinstance(frame[field], kind):
            return f"field '{field}' must be a {kind.__name__}"
    if frame["type"] == REGISTER:
        if not _PEER_ID_RE.fullmatch(frame["peer_id"]):
            return "peer_id must be 1-128 characters of letters, digits and . _ : @ -"
        if not isinstance(frame.get("role", "peer"), str):
            return "field 'role' must be a str"
        if "id_token" in frame and not isinstance(frame["id_token"], str):
            return "field 'id_token' must be a str"
        for name in REGISTER_CREDENTIALS:
            if frame.get(name) not in (None, "") and not isinstance(frame[name], str):
                return f"field '{name}' must be a str"
        if not any(frame.get(name) for name in REGISTER_CREDENTIALS):
            return "'register' needs the room's 'token' (or, from sleap-rtc 0.0.7, a 'jwt' or 'api_key')"
        key = frame.get("peer_key")
        if key is not None and not (isinstance(key, str) and 0 < len(key) <= MAX_PEER_KEY_CHARS):
            return f"field 'peer_key' must be a str of 1-{MAX_PEER_KEY_CHARS} characters"
    if "metadata" in frame:
        return check_metadata(frame["metadata"])
    return None


def check_metadata(metadata: Any) -> Optional[str]:
    """Return what is wrong with a metadata object ({tags: [str], properties: {}}), or None."""
    if not isinstance(metadata, dict):
        return "metadata must be an object"
    tags = metadata.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        return "metadata.tags must be a list of strings"
    if not isinstance(metadata.get("properties", {}), dict):
        return "metadata.properties must be an object"
    return None


def merge_metadata(current: dict, update: dict) -> dict:
    """Merge `update` into `current` the way the server does: properties merged, tags unioned."""
    merged = dict(current)
    merged_tags = list(current.get("tags", []))
    merged_tags += [t for t in update.get("tags", []) if t not in merged_tags]
    merged["tags"] = merged_tags
    merged["properties"] = {**current.get("properties", {}), **update.get("properties", {})}
    for key, value in update.items():
        if key not in ("tags", "properties"):
            merged[key] = value
    return merged


# Deepest nesting of objects and lists a frame may have; json and the server's replies
# recurse, so a deeper frame could exhaust the stack.
MAX_FRAME_DEPTH = 32
# An error frame never echoes more of the input than this.
ECHO_CHARS = 64


def error_frame(code: str, message: str, in_reply_to: Optional[str] = None) -> dict:
    # sleap-rtc 0.0.7 prints `reason`; ours read `code` and `message`.
    frame = {"type": ERROR, "code": code, "message": message[:1000], "reason": message[:1000]}
    if in_reply_to:
        frame["in_reply_to"] = in_reply_to[:ECHO_CHARS]
    return frame


def ping_frame() -> dict:
    return {"type": PING}


def pong_frame() -> dict:
    return {"type": PONG, "timestamp": time.time()}


def metadata_updated_frame(peer_id: str, metadata: dict) -> dict:
    """The server's answer to update_metadata: the peer's metadata, merged."""
    return {"type": METADATA_UPDATED, "peer_id": peer_id, "metadata": metadata}


def sdp_frame(kind: str, sender: str, target: str, sdp: str) -> dict:
    """An OFFER or ANSWER between two peers of a room."""
    return {"type": kind, "sender": sender, "target": target, "sdp": sdp}


def quit_frame(sender: str, target: str) -> dict:
    return {"type": QUIT, "sender": sender, "target": target}


# The server's answers that list peers, built from each peer's JSON prepared once (so
# that an answer among thousands of peers is a string join, not an encoding).


def peer_json(peer_id: str, role: str, metadata_json: str, connected_at: str) -> str:
    """One entry of a peer list: {peer_id, role, metadata, connected_at}."""
    return (f'{{"peer_id": {json.dumps(peer_id)}, "role": {json.dumps(role)}, "metadata": {metadata_json}, '
            f'"connected_at": {json.dumps(connected_at)}}}')


def ice_servers_json(ice_servers: list[dict]) -> str:
    """ice_servers {ice_servers}: a peer's fresh STUN/TURN servers and credentials."""
    return json.dumps({"type": ICE_SERVERS, "ice_servers": ice_servers})


def registered_auth_json(room_id: str, peer_id: str, peers: str, ice_servers: list[dict]) -> str:
    """registered_auth {room_id, peer_id, peer_list, ice_servers}; `peers` joins peer_json entries."""
    return (f'{{"type": "{REGISTERED_AUTH}", "room_id": {json.dumps(room_id)}, "peer_id": {json.dumps(peer_id)}, '
            f'"peer_list": [{peers}], "ice_servers": {json.dumps(ice_servers)}}}')


def peer_list_json(to_peer_id: str, peers: list[str]) -> str:
    """peer_list {to_peer_id, count, peers}, from peer_json entries."""
    return (f'{{"type": "{PEER_LIST}", "to_peer_id": {json.dumps(to_peer_id)}, "count": {len(peers)}, '
            f'"peers": [{", ".join(peers)}]}}')


def too_deep(value: Any, limit: int = MAX_FRAME_DEPTH) -> bool:
    """Whether objects and lists nest deeper than `limit` (checked without recursion)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            if depth > limit:
                return True
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children)
    return False


def echo(value: Any) -> str:
    """A short, printable rendering of input for an error message."""
    text = repr(value)
    return text if len(text) <= ECHO_CHARS else text[:ECHO_CHARS] + "..."


# ---------------------------------------------------------------------------------------
# Data-channel messages
# ---------------------------------------------------------------------------------------
# Text frames are `NAME` or `NAME::{json object}`; file bytes travel as binary frames
# between FILE_BEGIN and FILE_END and never share framing with text.

# Link housekeeping, handled inside Link and never seen by applications.
HEARTBEAT = "HB"
BYE = "BYE"
BYE_ACK = "BYE_ACK"
FILE_BEGIN = "FILE_BEGIN"  # {transfer_id, name, size, sha256, store?, offset?}: bytes follow from offset
FILE_END = "FILE_END"  # {transfer_id}
FILE_ACK = "FILE_ACK"  # {transfer_id, ok, error?, saved_as?}
FILE_ABORT = "FILE_ABORT"  # {transfer_id, reason}
# A FILE_BEGIN with `direct: {key, token, hints}` offers a direct TCP connection for the bytes:
FILE_DIRECT = "FILE_DIRECT"  # receiver -> sender {transfer_id, hints} | {transfer_id, off: why}
FILE_CHANNEL = "FILE_CHANNEL"  # sender -> receiver {transfer_id}: the rest comes over the link
FILE_OFFSET = "FILE_OFFSET"  # receiver -> sender {transfer_id, offset}: the first byte still wanted

# Application messages.
LINK_PING = "PING"  # {seq}
LINK_PONG = "PONG"  # {seq}
FILE_REQUEST = "FILE_REQUEST"  # {path}: ask the worker to send a file
# Uploads are content-addressed: the client asks first, and sends only what the worker lacks.
UPLOAD_QUERY = "UPLOAD_QUERY"  # {sha256, size, name}
UPLOAD_STATUS = "UPLOAD_STATUS"  # {sha256, have, path (when have), offset (bytes held of a cut-off upload), error?}
# Looking at the worker's files, always inside its mounts.
FS_LIST = "FS_LIST"  # {request_id, path? (none: the mounts), offset?, nearest? (the deepest existing directory)}
FS_LISTING = "FS_LISTING"  # {request_id, path, entries: [{name, kind, size, mtime}], total, offset, mounts?, error?}
FS_SEARCH = "FS_SEARCH"  # {request_id, name (a file name or glob), size?}
FS_FOUND = "FS_FOUND"  # {request_id, candidates: [{path, size, mtime, score}], complete, scanned, error?}
# A worker replicating a job's results to another, over a link of its own (the receiver
# stages files named "INDEX-NAME", checks each SHA-256 against the manifest at the end,
# and records a job of type replica).
REPLICA_BEGIN = "REPLICA_BEGIN"  # {request_id, source: {worker, job_id}, outputs: [{kind, name, files: [{name, size, sha256}]}]}
REPLICA_READY = "REPLICA_READY"  # {request_id, replica_id, error?}
REPLICA_END = "REPLICA_END"  # {replica_id}
REPLICA_DONE = "REPLICA_DONE"  # {replica_id, outputs: [{kind, name, path, files}], error?}
# The upload store, as `client.py files ls` shows it.
STORE_LIST = "STORE_LIST"  # {request_id}
# {request_id, files: [{sha256, size, names, uploaders, last_use, jobs, needed, partial? (a cut-off upload)}]}
STORE_LISTING = "STORE_LISTING"
LINK_ERROR = "ERROR"  # {message, ...}

# Jobs. Every payload carries "job_id".
JOB_SUBMIT = "JOB_SUBMIT"  # {job_id, spec}
JOB_ACCEPTED = "JOB_ACCEPTED"  # {job_id, job_dir, queue_position (0: starts now)}
JOB_REJECTED = "JOB_REJECTED"  # {job_id, errors: [{field, message, code}]}
JOB_LOG = "JOB_LOG"  # {job_id, lines: [[stream, text]], progress: latest \r line or null}
# {job_id, event, epoch, loss, val_loss} | {job_id, event: inference, n_processed, n_total, ...}
# | {job_id, event: queued, queue_position}
JOB_PROGRESS = "JOB_PROGRESS"
PROGRESS_REPORT = "PROGRESS_REPORT"  # {job_id, report: sleap-nn's raw ZMQ JSON text}
ZMQ_CTRL = "ZMQ_CTRL"  # {job_id}: stop early, keep the model
JOB_CANCEL = "JOB_CANCEL"  # {job_id}: terminate the run
JOB_CONTROL = "JOB_CONTROL"  # {job_id, action, ok, message}: the worker's answer to ZMQ_CTRL / JOB_CANCEL
JOB_COMPLETE = "JOB_COMPLETE"  # {job_id, state, exit_code, duration_s, stopped_early, outputs, warning, ...}: Outcome
JOB_FAILED = "JOB_FAILED"  # the same fields (Outcome), state failed|cancelled, with error and stderr_tail
JOB_ATTACH = "JOB_ATTACH"  # {job_id, follow}: send the job's log from its first line, then (follow) live
JOB_ATTACHED = "JOB_ATTACHED"  # {job_id, state, following, error?}: the log so far has been sent
# {job_id, reason}: the worker stopped sending this job's output to this client (it fell behind)
JOB_DETACHED = "JOB_DETACHED"
JOB_FETCH = "JOB_FETCH"  # {job_id}: send the job's result files
JOB_FETCHED = "JOB_FETCHED"  # {job_id, files: [path on the worker], error?}: every file has been sent
# Names the seeds fixed. A job runs one or more steps (a package trains each model in order, then predicts).
TRAIN_JOB_START = "TRAIN_JOB_START"  # {job_id, name: the model, command}
TRAIN_JOB_END = "TRAIN_JOB_END"  # {job_id, name, stopped_early, model_dir}
TRAIN_JOB_ERROR = "TRAIN_JOB_ERROR"  # {job_id, name, exit_code}: the steps after it do not run
INFERENCE_START = "INFERENCE_START"  # {job_id}: a package's training is done; inference follows
INFERENCE_JOB_START = "INFERENCE_JOB_START"  # {job_id, name: "inference", command}
COMMAND_START = "COMMAND_START"  # {job_id, name: the allowed command's name, command}
STEP_MESSAGES = (TRAIN_JOB_START, TRAIN_JOB_END, TRAIN_JOB_ERROR, INFERENCE_START, INFERENCE_JOB_START, COMMAND_START)

_NAME_RE = re.compile(r"[A-Z][A-Z0-9_]*")

# ---------------------------------------------------------------------------------------
# Jobs and workers over signaling: `peer_message` payloads told apart by app_message_type
# ---------------------------------------------------------------------------------------

APP_MESSAGE_TYPE = "app_message_type"
# client -> worker {job_id, job_type, capability (see `capability`), requirements: {min_gpu_memory_mb},
#                   config: {a summary of the spec}}
APP_JOB_REQUEST = "job_request"
# worker -> client {job_id, accepted, reason, estimated_start_time_sec, estimated_duration_minutes,
#                   queue_position (0: starts now), worker_info: {gpu_utilization, available_memory_mb}}
APP_JOB_RESPONSE = "job_response"
APP_JOB_ASSIGNMENT = "job_assignment"  # client -> worker {job_id}
APP_JOB_ASSIGNED = "job_assigned"  # worker -> client {job_id, reserved, queue_position}
APP_JOBS_QUERY = "jobs_query"  # client -> worker {request_id, job_id?, state?} | {request_id, sql}
# worker -> client {request_id, jobs: [record]} | {request_id, columns, rows, truncated, error?}
APP_JOBS_LIST = "jobs_list"

# Worker status in its metadata.
AVAILABLE, RESERVED, BUSY, MAINTENANCE = "available", "reserved", "busy", "maintenance"
LOW_DISK = "low_disk"  # too little free disk: no new jobs; metadata "refusing" says why
# Job states: pending -> running -> completed | failed | cancelled.
PENDING, RUNNING, COMPLETED, FAILED, CANCELLED = "pending", "running", "completed", "failed", "cancelled"
JOB_STATES = (PENDING, RUNNING, COMPLETED, FAILED, CANCELLED)


@dataclass(frozen=True)
class Message:
    """One decoded text frame of the data channel."""

    name: str
    payload: dict


def encode(name: str, payload: Optional[dict] = None) -> str:
    if not _NAME_RE.fullmatch(name):
        raise ValueError(f"bad message name {name!r}")
    if payload is None:
        return name
    return name + "::" + json.dumps(payload, separators=(",", ":"))


def decode(text: str) -> Message:
    """Parse `NAME` or `NAME::{json}`; raise ProtocolError saying what is wrong."""
    name, sep, body = text.partition("::")
    if not _NAME_RE.fullmatch(name):
        raise ProtocolError(f"message name {name[:40]!r} is not an upper-case identifier")
    if not sep:
        return Message(name, {})
    try:
        payload = json.loads(body)
    except ValueError as exc:
        raise ProtocolError(f"{name}: payload is not JSON ({exc})") from None
    if not isinstance(payload, dict):
        raise ProtocolError(f"{name}: payload must be a JSON object")
    return Message(name, payload)


# ---------------------------------------------------------------------------------------
# Message builders: the fields of each application message, in one place
# ---------------------------------------------------------------------------------------
# Each data-channel builder gives (NAME, payload), for `link.send(*...)`; each signaling
# builder gives the `peer_message` payload. Readers take what a peer sent apart, with the
# checks every receiver would otherwise repeat. The comments above each name say when it
# is sent; these say what it holds.

Outgoing = tuple[str, dict]


def job_submit(job_id: str, spec: dict) -> Outgoing:
    return JOB_SUBMIT, {"job_id": job_id, "spec": spec}


def job_accepted(job_id: str, job_dir: str, queue_position: int) -> Outgoing:
    return JOB_ACCEPTED, {"job_id": job_id, "job_dir": job_dir, "queue_position": queue_position}


def job_rejected(job_id: str, errors: list[dict]) -> Outgoing:
    return JOB_REJECTED, {"job_id": job_id, "errors": errors}


def job_request_control(action: str, job_id: str) -> Outgoing:
    """Stop early (ZMQ_CTRL) or cancel (JOB_CANCEL) a job."""
    return action, {"job_id": job_id}


def job_control(job_id: str, action: str, ok: bool, message: str) -> Outgoing:
    """The answer to a stop or cancel: whether it was done, and what happened."""
    return JOB_CONTROL, {"job_id": job_id, "action": action, "ok": ok, "message": message}


def job_attach(job_id: str, follow: bool, since: int = 0) -> Outgoing:
    """The job's log from byte `since` (a client that lost its link goes on from the
    `offset` of the last JOB_LOG it had); with `follow`, then everything live."""
    return JOB_ATTACH, {"job_id": job_id, "follow": follow, **({"since": since} if since else {})}


def job_attached(job_id: str, state: Optional[str] = None, following: bool = False,
                 error: Optional[str] = None) -> Outgoing:
    """After the replayed log: the job's state and whether live output follows, or why not."""
    return JOB_ATTACHED, ({"job_id": job_id, "error": error} if error is not None else
                          {"job_id": job_id, "state": state, "following": following})


def job_fetch(job_id: str) -> Outgoing:
    return JOB_FETCH, {"job_id": job_id}


def job_log(job_id: str, lines: list, progress: Optional[str], offset: Optional[int] = None) -> Outgoing:
    """A batch of a job's output: [stream, line] pairs ("o", "e", "w", "m"), the latest
    carriage-return update, if any, and `offset`: the size of the job's log file once
    these lines are in it (where a reattaching client goes on from)."""
    payload = {"job_id": job_id, "lines": lines, "progress": progress}
    return JOB_LOG, payload if offset is None else {**payload, "offset": offset}


@dataclass(frozen=True)
class LogBatch:
    """A JOB_LOG as its receivers read it (see job_log); a line that is not a [stream,
    text] pair of strings is left out."""

    lines: list  # [(stream, text)]
    progress: Optional[str]
    offset: Optional[int]

    @classmethod
    def read(cls, payload: dict) -> "LogBatch":
        lines, progress = payload.get("lines"), payload.get("progress")
        pairs = [tuple(pair) for pair in lines if isinstance(pair, (list, tuple)) and len(pair) == 2
                 and all(isinstance(part, str) for part in pair)] if isinstance(lines, list) else []
        return cls(pairs, progress if isinstance(progress, str) else None, whole_number(payload.get("offset")))


def link_error(message: str, **more) -> Outgoing:
    return LINK_ERROR, {"message": message, **more}


def job_detached(job_id: str, reason: str) -> Outgoing:
    return JOB_DETACHED, {"job_id": job_id, "reason": reason}


def job_fetched(job_id: str, files: list[str], error: Optional[str] = None) -> Outgoing:
    """After a fetch: the paths on the worker of every file sent, or why not all were."""
    return JOB_FETCHED, {"job_id": job_id, "files": files, **({"error": error} if error is not None else {})}


@dataclass(frozen=True)
class Outcome:
    """How a job ended, as JOB_COMPLETE (state completed) or JOB_FAILED (failed or
    cancelled) carry it; its ledger row keeps the same fields."""

    state: str
    exit_code: Optional[int] = None
    duration_s: float = 0.0
    stopped_early: bool = False
    # Each model directory (files with SHA-256), predictions file, command output or replica made.
    outputs: list = dataclasses.field(default_factory=list)
    warning: Optional[str] = None
    error: Optional[str] = None
    stderr_tail: list = dataclasses.field(default_factory=list)  # the last lines of stderr, unless it completed
    log_path: Optional[str] = None
    steps: list = dataclasses.field(default_factory=list)  # per step: {name, kind, state, exit_code, stopped_early}

    def message(self) -> Outgoing:
        """JOB_COMPLETE or JOB_FAILED (the job's log adds its job_id on the way out)."""
        return (JOB_COMPLETE if self.state == COMPLETED else JOB_FAILED), dataclasses.asdict(self)

    @classmethod
    def read(cls, payload: dict) -> "Outcome":
        """A worker's JOB_COMPLETE or JOB_FAILED; a field of the wrong type reads as absent."""
        def text(name: str) -> Optional[str]:
            return payload[name] if isinstance(payload.get(name), str) else None

        def listed(name: str, kind: type) -> list:
            value = payload.get(name)
            return [v for v in value if isinstance(v, kind)] if isinstance(value, list) else []

        duration = payload.get("duration_s")
        return cls(str(payload.get("state")), whole_number(payload.get("exit_code")),
                   duration if _is_a(duration, float) else 0.0,
                   payload.get("stopped_early") is True, listed("outputs", dict), text("warning"), text("error"),
                   listed("stderr_tail", str), text("log_path"), listed("steps", dict))


def job_queued(job_id: str, queue_position: int) -> Outgoing:
    return JOB_PROGRESS, {"job_id": job_id, "event": "queued", "queue_position": queue_position}


def job_epoch(job_id: str, event: str, epoch: Any, model: Optional[str], max_epochs: Optional[int],
              loss: Any, val_loss: Any) -> Outgoing:
    """A training event (train_begin, epoch_begin, epoch_end, train_end) of model `model`."""
    return JOB_PROGRESS, {"job_id": job_id, "event": event, "epoch": epoch, "model": model,
                          "max_epochs": max_epochs, "loss": loss, "val_loss": val_loss}


def job_inference_progress(job_id: str, report: dict) -> Outgoing:
    """sleap-nn's own progress line of an inference: n_processed, n_total and what else it says."""
    return JOB_PROGRESS, {**report, "job_id": job_id, "event": "inference"}


def progress_report(job_id: str, report: str) -> Outgoing:
    """sleap-nn's raw ZMQ progress event, as the text it sent."""
    return PROGRESS_REPORT, {"job_id": job_id, "report": report}


def train_job_end(job_id: str, name: str, stopped_early: bool, model_dir: Optional[str]) -> Outgoing:
    return TRAIN_JOB_END, {"job_id": job_id, "name": name, "stopped_early": stopped_early, "model_dir": model_dir}


def train_job_error(job_id: str, name: str, exit_code: Optional[int]) -> Outgoing:
    return TRAIN_JOB_ERROR, {"job_id": job_id, "name": name, "exit_code": exit_code}


def inference_start(job_id: str) -> Outgoing:
    return INFERENCE_START, {"job_id": job_id}


def link_ping(seq: int) -> Outgoing:
    return LINK_PING, {"seq": seq}


def link_pong(ping: dict) -> Outgoing:
    """The answer to a LINK_PING: its `seq` (a whole number), and nothing else a peer put in it."""
    seq = ping.get("seq")
    return LINK_PONG, {"seq": seq if _is_a(seq, int) else None}


def upload_status(sha256: Any, have: bool = False, path: Optional[str] = None, offset: int = 0,
                  error: Optional[str] = None) -> Outgoing:
    """The answer to UPLOAD_QUERY: the content's path when the store holds it, else the
    bytes of a cut-off upload it holds (where to go on from), or why the query was refused."""
    payload: dict = {"sha256": str(sha256)[:64]}
    if error is not None:
        payload["error"] = error
    elif have:
        payload.update(have=True, path=path)
    else:
        payload.update(have=False, offset=offset)
    return UPLOAD_STATUS, payload


def fs_list(path: Optional[str], offset: int = 0, nearest: bool = False) -> Outgoing:
    return FS_LIST, {"path": path, "offset": offset, "nearest": nearest}


def fs_search(name: str, size: Optional[int] = None) -> Outgoing:
    return FS_SEARCH, {"name": name, "size": size}


def fs_answer(asked: str, request_id: Any, answer: dict) -> Outgoing:
    """FS_LISTING (to FS_LIST) or FS_FOUND (to FS_SEARCH), with the listing's or the
    search's fields (see their names above), or `error` and `code`."""
    return (FS_LISTING if asked == FS_LIST else FS_FOUND), {"request_id": str(request_id)[:64], **answer}


def upload_query(sha256: str, size: int, name: str) -> Outgoing:
    return UPLOAD_QUERY, {"sha256": sha256, "size": size, "name": name}


def file_request(path: str) -> Outgoing:
    return FILE_REQUEST, {"path": path}


def store_list() -> Outgoing:
    return STORE_LIST, {}


def store_listing(request_id: Any, files: list[dict]) -> Outgoing:
    return STORE_LISTING, {"request_id": str(request_id)[:64], "files": files}


def replica_begin(request_id: str, source: dict, outputs: list[dict]) -> Outgoing:
    return REPLICA_BEGIN, {"request_id": request_id, "source": source, "outputs": outputs}


def replica_ready(request_id: Any, replica_id: Optional[str] = None, error: Optional[str] = None) -> Outgoing:
    """The receiving worker's answer: the replica job's id, or why it takes none."""
    answer = {"request_id": str(request_id)[:64]}
    return REPLICA_READY, {**answer, "error": error} if error is not None else {**answer, "replica_id": replica_id}


def replica_end(replica_id: str) -> Outgoing:
    return REPLICA_END, {"replica_id": replica_id}


def replica_done(replica_id: Any, outputs: list[dict], error: Optional[str] = None) -> Outgoing:
    return REPLICA_DONE, {"replica_id": str(replica_id)[:64], "outputs": outputs,
                          **({"error": error} if error is not None else {})}


def app_job_request(job_id: str, spec: dict, capability: str, min_gpu_memory_mb: int, summary: dict) -> dict:
    """Would the worker take this job? (`summary`: the spec's fields worth showing.)"""
    return {APP_MESSAGE_TYPE: APP_JOB_REQUEST, "job_id": job_id, "job_type": spec["type"],
            "capability": capability, "requirements": {"min_gpu_memory_mb": min_gpu_memory_mb}, "config": summary}


def app_job_response(job_id: Any, accepted: bool, worker_info: dict, **more) -> dict:
    """A worker's answer to APP_JOB_REQUEST; `more`: reason and message when it will not
    take the job, its estimates when it will."""
    return {APP_MESSAGE_TYPE: APP_JOB_RESPONSE, "job_id": str(job_id), "accepted": accepted,
            "worker_info": worker_info, **more}


def app_job_assignment(job_id: str) -> dict:
    return {APP_MESSAGE_TYPE: APP_JOB_ASSIGNMENT, "job_id": job_id}


def app_job_assigned(job_id: str, queue_position: int) -> dict:
    return {APP_MESSAGE_TYPE: APP_JOB_ASSIGNED, "job_id": job_id, "reserved": queue_position == 0,
            "queue_position": queue_position}


def app_jobs_query(request_id: str, job_id: Optional[str] = None, state: Optional[str] = None,
                   sql: Optional[str] = None) -> dict:
    """One job's record (`job_id`), the records in a state, or a read-only SQL query."""
    query = {APP_MESSAGE_TYPE: APP_JOBS_QUERY, "request_id": request_id}
    if job_id is not None:
        query["job_id"] = job_id
    if sql is not None:
        query["sql"] = sql
    elif job_id is None:
        query["state"] = state
    return query


def app_jobs_list(request_id: Any, **answer) -> dict:
    """The answer to APP_JOBS_QUERY: `jobs`, or `columns` and `rows`, or `error`."""
    return {APP_MESSAGE_TYPE: APP_JOBS_LIST, "request_id": request_id, **answer}


def job_id_in(payload: dict) -> str:
    """The job id a message names, as text of at most 64 characters ("" if none)."""
    return str(payload.get("job_id", ""))[:64]


@dataclass(frozen=True)
class Submitted:
    """A JOB_SUBMIT as the worker reads it: the job id (checked) and the spec (unchecked)."""

    job_id: str
    spec: Any
    problem: Optional[str]  # why the job id is unusable, or None

    @classmethod
    def read(cls, payload: dict) -> "Submitted":
        job_id = payload.get("job_id")
        problem = None if valid_job_id(job_id) else "job_id must be 1-64 letters, digits, '-' or '_'"
        return cls(str(job_id)[:64], payload.get("spec"), problem)


# What the worker takes from a member's other requests. A member may send anything: each
# reader keeps the fields' types and bounds the text echoed back, and `problem` (where a
# request can be refused) says why in words the member reads.

SHA256_RE = re.compile(r"[0-9a-f]{64}")  # a SHA-256 hex digest, with fullmatch


def whole_number(value: Any) -> Optional[int]:
    """`value` when it is an int (not a bool), else None."""
    return value if _is_a(value, int) else None


def request_id_in(payload: dict) -> str:
    """The request id a question carries, for its answer: text of at most 64 characters."""
    return str(payload.get("request_id", ""))[:64]


def replica_id_in(payload: dict) -> str:
    """REPLICA_END's replica id (a job id on the receiving worker)."""
    return str(payload.get("replica_id", ""))[:64]


def peer_error_text(payload: dict) -> str:
    """What a LINK_ERROR says, at most 500 characters of it."""
    return str(payload.get("message"))[:500]


def requested_path(payload: dict) -> str:
    """FILE_REQUEST's path on the worker (checked against the mounts by the worker)."""
    return str(payload.get("path", ""))


@dataclass(frozen=True)
class Attach:
    """A JOB_ATTACH: replay the job's log from byte `since` and, with `follow`, go on live."""

    job_id: str
    follow: bool
    since: int

    @classmethod
    def read(cls, payload: dict) -> "Attach":
        since = whole_number(payload.get("since"))
        return cls(job_id_in(payload), bool(payload.get("follow")), since if since and since > 0 else 0)


@dataclass(frozen=True)
class FilesQuery:
    """An FS_LIST (`path`: None for the mounts; `offset`; `nearest`) or an FS_SEARCH
    (`name`, a file name or glob; `size`, when known)."""

    request_id: str
    path: Optional[str] = None
    offset: int = 0
    nearest: bool = False
    name: str = ""
    size: Optional[int] = None
    problem: Optional[str] = None

    @classmethod
    def read(cls, asked: str, payload: dict) -> "FilesQuery":
        request_id = request_id_in(payload)
        if asked == FS_SEARCH:
            return cls(request_id, name=str(payload.get("name", "")), size=whole_number(payload.get("size")))
        offset, path = payload.get("offset") or 0, payload.get("path")
        if whole_number(offset) is None:
            return cls(request_id, problem=f"offset must be a whole number, not {echo(offset)}")
        if path is not None and not isinstance(path, str):
            return cls(request_id, problem=f"expected a path, not {echo(path)}")
        return cls(request_id, path, offset, bool(payload.get("nearest")))


@dataclass(frozen=True)
class UploadQuery:
    """An UPLOAD_QUERY: does the worker hold these bytes? `sha256` as echoed back (at most 64 characters)."""

    sha256: str
    size: int = 0
    name: str = ""
    problem: Optional[str] = None

    @classmethod
    def read(cls, payload: dict) -> "UploadQuery":
        sha256, size = payload.get("sha256"), whole_number(payload.get("size"))
        try:
            if not isinstance(sha256, str) or not SHA256_RE.fullmatch(sha256) or size is None or size < 0:
                raise TransferError("UPLOAD_QUERY needs sha256 (64 hex digits), size (bytes) and name")
            return cls(sha256, size, safe_file_name(str(payload.get("name"))))
        except TransferError as exc:
            return cls(str(sha256)[:64], problem=str(exc))


@dataclass(frozen=True)
class ReplicaOffer:
    """A REPLICA_BEGIN: which worker's job the files are of, and the manifest of what comes
    (`outputs`, unchecked: the receiver checks it)."""

    request_id: str
    source: dict
    outputs: Any

    @classmethod
    def read(cls, payload: dict) -> "ReplicaOffer":
        source = payload.get("source") if isinstance(payload.get("source"), dict) else {}
        return cls(request_id_in(payload), {"worker": str(source.get("worker"))[:100],
                                            "job_id": str(source.get("job_id"))[:64]}, payload.get("outputs"))


@dataclass(frozen=True)
class JobRequest:
    """An APP_JOB_REQUEST as a worker reads it: what job, and what it needs."""

    job_id: str
    job_type: Optional[str]  # None when it is not text
    wanted: str  # the capability it needs (a package's), else its job type (bounded text when not text)
    min_gpu_memory_mb: float
    problem: Optional[str]

    @classmethod
    def read(cls, payload: dict) -> "JobRequest":
        job_type, requirements = payload.get("job_type"), payload.get("requirements")
        job_type = job_type if isinstance(job_type, str) else None
        need = (requirements.get("min_gpu_memory_mb") if isinstance(requirements, dict) else None) or 0
        bad = not _is_a(need, float)
        wanted = payload.get("capability") or job_type
        return cls(job_id_in(payload), job_type, wanted if isinstance(wanted, str) else echo(wanted),
                   0 if bad else need, f"min_gpu_memory_mb must be a number, not {echo(need)}" if bad else None)


@dataclass(frozen=True)
class JobsQuery:
    """An APP_JOBS_QUERY: a read-only SQL query (`sql` not None), one job's record
    (`job_id`), or the summaries of every job, or of those in `state`."""

    request_id: str
    sql: Optional[str] = None  # "" when the query's sql is not text: refused as no SELECT
    job_id: Optional[str] = None
    state: Any = None  # checked against JOB_STATES by the worker

    @classmethod
    def read(cls, payload: dict) -> "JobsQuery":
        if "sql" in payload:
            return cls(request_id_in(payload), sql=payload["sql"] if isinstance(payload["sql"], str) else "")
        return cls(request_id_in(payload), job_id=job_id_in(payload) if payload.get("job_id") else None,
                   state=payload.get("state"))


# What a client takes from the room's workers. Any member may register as a worker, so
# these readers keep each field to its type (a string where a number belongs must not
# crash another member's `train`), and text bound for a terminal loses its control
# characters (no escape sequences from a peer).


def shown_text(value: Any, limit: int = 1000) -> Optional[str]:
    """A peer's text fit for a terminal: None when it is not text, at most `limit`
    characters, each one that does not print as '?'."""
    if not isinstance(value, str):
        return None
    return "".join(c if c.isprintable() else "?" for c in value[:limit])


@dataclass(frozen=True)
class WorkerCard:
    """A worker as discovery shows it: the properties of its registration metadata (set
    by the worker's Worker.__init__ and Status.now). `fallback`: the worker named by
    SLEAP_RTC_WORKER_PEER_ID, for a server that cannot discover; only its id is known."""

    peer_id: str
    name: Optional[str] = None
    status: Optional[str] = None
    gpu_model: Optional[str] = None
    gpu_memory_mb: Optional[float] = None  # None when the worker did not say it as a number
    queue_length: int = 0
    executor: str = "local"
    slurm_partition: Optional[str] = None
    max_concurrent_jobs: Optional[int] = None
    job_types: tuple[str, ...] = ()
    refusing: Optional[str] = None  # why it takes no new jobs
    fallback: bool = False

    @classmethod
    def read(cls, peer: dict) -> "WorkerCard":
        metadata = peer.get("metadata") if isinstance(peer.get("metadata"), dict) else {}
        p = metadata.get("properties") if isinstance(metadata.get("properties"), dict) else {}
        memory = p.get("gpu_memory_mb")
        return cls(str(peer.get("peer_id", "")), shown_text(p.get("worker_name")), shown_text(p.get("status")),
                   shown_text(p.get("gpu_model")), memory if _is_a(memory, float) else None,
                   whole_number(p.get("queue_length")) or 0, shown_text(p.get("executor")) or "local",
                   shown_text(p.get("slurm_partition")), whole_number(p.get("max_concurrent_jobs")),
                   tuple(shown_text(t) for t in offered(metadata)), shown_text(p.get("refusing")))


@dataclass(frozen=True)
class JobResponse:
    """A worker's APP_JOB_RESPONSE as the client reads it (see `app_job_response`)."""

    accepted: bool
    queue_position: int = 0  # 0: the job starts at once
    estimated_start_time_sec: Optional[float] = None
    reason: str = "no reason given"  # when refused
    message: str = ""

    @classmethod
    def read(cls, payload: dict) -> "JobResponse":
        start = payload.get("estimated_start_time_sec")
        return cls(payload.get("accepted") is True, whole_number(payload.get("queue_position")) or 0,
                   start if _is_a(start, float) else None, shown_text(payload.get("reason")) or "no reason given",
                   shown_text(payload.get("message")) or "")


@dataclass(frozen=True)
class JobsAnswer:
    """A worker's APP_JOBS_LIST as the client reads it (see `app_jobs_list`): its job
    records, or a ledger query's `columns` and `rows`, or an `error`. A record is kept only
    as an object with a job id, its `submitted_at` and `duration_s` numbers or None; a row
    only as a list as long as the columns."""

    jobs: tuple[dict, ...] = ()
    columns: Optional[tuple[str, ...]] = None  # None: the answer is not a query's
    rows: tuple[list, ...] = ()
    truncated: bool = False
    error: Optional[str] = None

    @classmethod
    def read(cls, payload: dict) -> "JobsAnswer":
        jobs, columns, rows = (payload.get(k) if isinstance(payload.get(k), list) else None
                               for k in ("jobs", "columns", "rows"))
        columns = None if columns is None else tuple(str(c) for c in columns)
        records = tuple({**job, **{k: job.get(k) if _is_a(job.get(k), float) else None
                                   for k in ("submitted_at", "duration_s")}}
                        for job in jobs or [] if isinstance(job, dict) and valid_job_id(job.get("job_id")))
        return cls(records, columns, tuple(r for r in rows or [] if isinstance(r, list) and columns is not None
                                           and len(r) == len(columns)),
                   payload.get("truncated") is True, shown_text(payload.get("error")))


# ---------------------------------------------------------------------------------------
# Job specs
# ---------------------------------------------------------------------------------------
# A spec is what the client asks for; paths in it are paths on the worker. The checks
# here need nothing of the worker; the worker adds its own (paths, mounts, config).

TRAIN, TRACK = "train", "track"
# A command job runs one executable the worker's admin allowed by name (worker --allow-command).
COMMAND = "command"
# A prune job removes the files of old finished jobs and unused uploads; the ledger keeps every record.
PRUNE = "prune"
# A replicate job copies a finished job's model or predictions to another worker, which
# records them as a job of type REPLICA (see REPLICA_BEGIN).
REPLICATE, REPLICA = "replicate", "replica"
# A SLEAP training package (train or track) needs the worker's packages.py: its own job type.
PACKAGE = "package"
JOB_TYPE_TAGS = {TRAIN: "training-worker", TRACK: "inference-worker"}  # the discovery tag for each
SPEC_FIELDS: dict[str, dict[str, type]] = {
    TRAIN: {"config": str, "labels": str, "val_labels": str, "max_epochs": int, "batch_size": int,
            "learning_rate": float, "run_name": str, "resume": str, "gui": bool, "path_map": list},
    TRACK: {"data_path": str, "model_paths": list, "output": str, "batch_size": int, "peak_threshold": float,
            "frames": str, "only_suggested_frames": bool, "frame_filter": str, "video_index": int,
            "exclude_user_labeled": bool, "gui": bool, "path_map": list},
    COMMAND: {"command": str, "args": list},
    PRUNE: {"older_than_s": float, "keep_failed": bool, "dry_run": bool, "uploads": list},
    REPLICATE: {"source_job": str, "to": str},
}
REQUIRED_FIELDS = {TRAIN: ("config",), TRACK: ("data_path", "model_paths"), COMMAND: ("command",), PRUNE: (),
                   REPLICATE: ("source_job", "to")}
_COMMAND_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MAX_COMMAND_ARGS, MAX_ARG_CHARS = 1000, 4096
# A SLEAP training package (a zip on the worker) says everything else itself.
PACKAGE_FIELDS = {"package": str, "gui": bool}
NUMBER_RANGES = {"max_epochs": (1, 10000), "batch_size": (1, 1024), "video_index": (0, 100000)}
# A track job's frame_filter: which frames of a labels file sleap-nn predicts on, and its option.
FRAME_FILTERS = {"suggested": "--only_suggested_frames", "user": "--only_labeled_frames",
                 "predicted": "--only_predicted_frames"}
_FRAMES_RE = re.compile(r"\d+(-\d+)?(,\d+(-\d+)?)*")
_JOB_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


def spec_error(field: str, message: str, code: str) -> dict:
    return {"field": field, "message": message, "code": code}


def check_spec(spec: Any) -> list[dict]:
    """Every problem of a job spec that needs no worker: types, required fields, ranges."""
    if not isinstance(spec, dict) or spec.get("type") not in SPEC_FIELDS:
        return [spec_error("type", f"a job spec is an object with type {' or '.join(SPEC_FIELDS)}", "BAD_TYPE")]
    package = "package" in spec
    fields = PACKAGE_FIELDS if package else SPEC_FIELDS[spec["type"]]
    required = ("package",) if package else REQUIRED_FIELDS[spec["type"]]
    errors = [spec_error(name, f"{name} is required", "MISSING") for name in required if spec.get(name) in (None, "", [])]
    for name, value in spec.items():
        if name == "type" or value is None:
            continue
        kind = fields.get(name)
        if kind is None:
            errors.append(spec_error(name, f"{name} is not a field of a {spec['type']} job"
                                     f"{' from a package (the package says it)' if package else ''}",
                                     "UNKNOWN_FIELD"))
        elif not _is_a(value, kind):
            errors.append(spec_error(name, f"{name} must be a {kind.__name__}, not {value!r}", "BAD_TYPE"))
        elif name in NUMBER_RANGES and not NUMBER_RANGES[name][0] <= value <= NUMBER_RANGES[name][1]:
            low, high = NUMBER_RANGES[name]
            errors.append(spec_error(name, f"{name} must be between {low} and {high}, not {value}", "OUT_OF_RANGE"))
        elif name == "uploads" and not (len(value) <= 1000 and all(
                isinstance(u, str) and re.fullmatch(r"[0-9a-f]{6,64}", u) for u in value)):
            errors.append(spec_error(name, "uploads must be SHA-256 digests (or their first 6+ hex digits)",
                                     "BAD_FORMAT"))
        elif name == "older_than_s" and value < 0:
            errors.append(spec_error(name, f"older_than_s must be >= 0, not {value}", "OUT_OF_RANGE"))
        elif name == "learning_rate" and not 0 < value <= 1:
            errors.append(spec_error(name, f"learning_rate must be > 0 and <= 1, not {value}", "OUT_OF_RANGE"))
        elif name == "peak_threshold" and not 0 <= value <= 1:
            errors.append(spec_error(name, f"peak_threshold must be between 0 and 1, not {value}", "OUT_OF_RANGE"))
        elif name == "frame_filter" and value not in FRAME_FILTERS:
            errors.append(spec_error(name, f"frame_filter is one of {', '.join(FRAME_FILTERS)}, not {echo(value)}"
                                     + (" (sleap-nn has no random filter: name the frames in 'frames')"
                                        if value == "random" else ""), "BAD_VALUE"))
        elif name == "frames" and not _frames_ok(value):
            errors.append(spec_error(name, f"frames must look like 0-100,200-300 (ascending ranges), not {value!r}",
                                     "BAD_FORMAT"))
        elif name == "model_paths" and not all(isinstance(m, str) and m for m in value):
            errors.append(spec_error(name, "model_paths must be a list of paths", "BAD_TYPE"))
        elif name == "command" and not _COMMAND_NAME_RE.fullmatch(value):
            errors.append(spec_error(name, f"a command name is 1-64 letters, digits, '.', '_' or '-', not {echo(value)}",
                                     "BAD_FORMAT"))
        elif name == "args" and not (len(value) <= MAX_COMMAND_ARGS and all(
                isinstance(a, str) and len(a) <= MAX_ARG_CHARS and "\x00" not in a for a in value)):
            errors.append(spec_error(name, f"args must be at most {MAX_COMMAND_ARGS} strings of at most "
                                     f"{MAX_ARG_CHARS} characters", "BAD_TYPE"))
        elif name == "path_map" and not (len(value) <= 100 and all(
                isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) and p for p in pair)
                for pair in value)):
            errors.append(spec_error(name, "path_map must be a list of [old prefix, new prefix] pairs", "BAD_TYPE"))
    return errors


def capability(spec: dict) -> str:
    """What a worker must offer (its `job_types`) to take a spec: "train", "track",
    "package" or "command:NAME"."""
    if spec.get("type") == COMMAND:
        return f"{COMMAND}:{spec.get('command')}"
    return PACKAGE if "package" in spec else str(spec.get("type"))


def offered(metadata: dict) -> list[str]:
    """The job types a worker's registration metadata says it accepts (train and track
    for a worker from before `job_types`). A worker from before `capabilities` serves
    packages wherever it trains or tracks, without saying so."""
    properties = metadata.get("properties") or {}
    types = properties.get("job_types")
    types = [t for t in types if isinstance(t, str)] if isinstance(types, list) else [TRAIN, TRACK]
    if "capabilities" not in properties and PACKAGE not in types and (TRAIN in types or TRACK in types):
        types.append(PACKAGE)
    return types


def _is_a(value: Any, kind: type) -> bool:
    if isinstance(value, bool):
        return kind is bool
    return isinstance(value, (int, float)) if kind is float else isinstance(value, kind)


def _frames_ok(text: str) -> bool:
    if not _FRAMES_RE.fullmatch(text):
        return False
    for part in text.split(","):
        start, _, end = part.partition("-")
        if end and int(end) < int(start):
            return False
    return True


def valid_job_id(job_id: Any) -> bool:
    return isinstance(job_id, str) and bool(_JOB_ID_RE.fullmatch(job_id))


def new_job_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


def new_secret(nbytes: int) -> str:
    """A URL-safe random token (room tokens, keys) that starts with a letter or digit: one
    in 32 of plain token_urlsafe starts with '-', which a command line reads as an option.
    Drawing again loses a fraction of a bit of the first character, nothing more."""
    while True:
        token = secrets.token_urlsafe(nbytes)
        if token[0].isalnum():
            return token


class CommandLineParser(argparse.ArgumentParser):
    """argparse, with the fix in the words when a value that starts with '-' (an old room
    token) was taken for an option."""

    def error(self, message: str):
        if "--token: expected one argument" in message:
            message += (" (a token that starts with '-', as older servers made them, goes after '=': "
                        "--token=-abc...)")
        super().error(message)


def b64url(data: bytes) -> str:
    """URL-safe base64 without padding, as JWTs and sleap-rtc 0.0.7's nonces and HMACs use."""
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def unb64url(text: str) -> bytes:
    """The bytes of b64url text (padding optional); raises ValueError on anything else."""
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def file_digest(path: Path) -> tuple[int, str]:
    """Size and SHA-256 hex digest of a file."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1024 * 1024):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


# ---------------------------------------------------------------------------------------
# Links opened by unmodified sleap-rtc 0.0.7 clients
# ---------------------------------------------------------------------------------------
# Their channel labels make a Link `upstream`: it passes their bare text frames through and
# ignores their binary KEEP_ALIVE. The dialect itself lives in upstream.py.

UPSTREAM_CHANNEL_LABELS = frozenset({"my-data-channel", "training", "inference", "pathcheck", "sleap-app"})
UPSTREAM_KEEP_ALIVE = b"KEEP_ALIVE"


# ---------------------------------------------------------------------------------------
# The HTTP API beside the signaling server
# ---------------------------------------------------------------------------------------


def http_base_url(server_url: str, http: Optional[str] = None) -> str:
    """The HTTP API address for a signaling URL: same host, port from `http` or SLEAP_RTC_HTTP.

    `http` may be a port number or a full http(s) URL.
    """
    http = http or os.environ.get(ENV_HTTP)
    if http and not http.isdigit():
        return http.rstrip("/")
    parts = urllib.parse.urlsplit(server_url)
    scheme = "https" if parts.scheme == "wss" else "http"
    port = int(http) if http else DEFAULT_HTTP_PORT
    host = parts.hostname or "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


def http_call(
    method: str, url: str, body: Optional[dict] = None, bearer: Optional[str] = None,
    timeout: float = REQUEST_TIMEOUT_S,
) -> tuple[int, dict]:
    """One JSON request; returns (status, decoded body). Raises SignalingError when unreachable."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if bearer:
        request.add_header("Authorization", f"Bearer {bearer}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read() or b"{}")
        except ValueError:
            return exc.code, {"error": exc.reason}
    except (urllib.error.URLError, OSError) as exc:
        raise SignalingError(DISCONNECTED, f"cannot reach the signaling HTTP API at {url}: {exc}")


def anonymous_sign_in(http_base: str) -> dict:
    """A new anonymous user at the HTTP API: {id_token, username}."""
    status, body = http_call("POST", http_base + "/anonymous-signin", {})
    if status != 200:
        raise SignalingError(INVALID_TOKEN, f"sign-in at {http_base} failed: {body.get('error', status)}")
    return body


def create_room(http_base: str, id_token: Optional[str] = None) -> dict:
    """Create a room (signing in anonymously when no id_token is given); returns
    {room_id, token, id_token}."""
    id_token = id_token or anonymous_sign_in(http_base)["id_token"]
    status, body = http_call("POST", http_base + "/create-room", {}, bearer=id_token)
    if status != 200:
        raise SignalingError(INVALID_TOKEN, f"could not create a room: {body.get('error', status)}")
    return {"room_id": body["room_id"], "token": body["token"], "id_token": id_token}


def delete_room(http_base: str, room_id: str, id_token: Optional[str]) -> dict:
    """Delete a room and disconnect everyone in it (its creator's id_token only);
    returns {deleted_peers, room_deleted}."""
    status, body = http_call("POST", http_base + "/delete-peers-and-room", {"room_id": room_id}, bearer=id_token)
    if status != 200:
        raise SleapRTCError(f"room {room_id} was not deleted: {body.get('error', status)}")
    return body


# ---------------------------------------------------------------------------------------
# Signaling connection
# ---------------------------------------------------------------------------------------


class SignalingClient:
    """A registered connection to the signaling server, shared by worker and client.

    One reader thread ("signaling-client", a name of its own: a worker may run the server's
    "signaling-reader" in the same process) owns the socket and is stopped by `close`: it
    answers server pings,
    routes every frame into a mailbox that callers take from selectively (`next`), and on
    a lost connection reconnects with capped exponential backoff and registers again with
    the same peer_id and the latest metadata. `send` is safe from any thread.
    """

    def __init__(
        self, url: str, room_id: str, token: str, peer_id: str, role: str = "peer",
        metadata: Optional[dict] = None, id_token: Optional[str] = None, reconnect: bool = True,
        peer_key: Optional[str] = None,
    ):
        self.url = url
        self.room_id = room_id
        self.token = token
        self.peer_id = peer_id
        self.role = role
        self.metadata = metadata or {}
        self.id_token = id_token
        self.peer_key = peer_key  # claims peer_id in the room (see MAX_PEER_KEY_CHARS)
        self.reconnect = reconnect
        self.ice_servers: list[dict] = []
        self._ws = None
        self._closing = threading.Event()
        self._connected = threading.Event()
        # Guards _ws replacement and every write to it (websocket-client sends are not
        # thread-safe).
        self._send_lock = threading.Lock()
        # Guards _mailbox and _replies; notified when a frame arrives or on close. Replies
        # to requests are kept apart so that a consumer of `next` never takes one.
        self._mail = threading.Condition()
        self._mailbox: list[dict] = []
        self._replies: list[dict] = []
        # One request in flight at a time, so that a reply or error maps to its request.
        self._request_lock = threading.Lock()
        self._reader: Optional[threading.Thread] = None
        self.reconnects = 0

    # -- lifecycle ----------------------------------------------------------------------

    def connect(self, timeout: float = REQUEST_TIMEOUT_S) -> dict:
        """Open the socket, register, start the reader; return the registered_auth frame."""
        reply = self._open_and_register(timeout)
        self._reader = threading.Thread(target=guarded(self._read_forever), name="signaling-client", daemon=True)
        self._reader.start()
        return reply

    def close(self) -> None:
        """Deregister (by closing the socket) and stop the reader thread."""
        self._closing.set()
        with self._send_lock:
            ws, self._ws = self._ws, None
        if ws is not None:
            _close_quietly(ws)
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(timeout=5)
        with self._mail:
            self._mail.notify_all()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def _open_and_register(self, timeout: float) -> dict:
        import websocket  # websocket-client

        try:
            # skip_utf8_validation: websocket-client's own check is pure Python (some 8 ms for a
            # 50 KB peer list); decoding the text checks the same, in C.
            ws = websocket.create_connection(self.url, timeout=timeout, enable_multithread=True,
                                             skip_utf8_validation=True)
        except Exception as exc:
            raise SignalingError(DISCONNECTED, f"cannot connect to the signaling server {self.url}: {exc}") from None
        frame = {
            "type": REGISTER, "peer_id": self.peer_id, "room_id": self.room_id, "token": self.token,
            "role": self.role, "metadata": self.metadata,
        }
        if self.id_token:
            frame["id_token"] = self.id_token
        if self.peer_key:
            frame["peer_key"] = self.peer_key
        try:
            ws.send(json.dumps(frame))
            deadline = time.monotonic() + timeout
            while True:
                ws.settimeout(max(0.1, deadline - time.monotonic()))
                reply = json.loads(ws.recv())
                if reply.get("type") == REGISTERED_AUTH:
                    break
                if reply.get("type") == ERROR:
                    raise SignalingError(reply.get("code", "ERROR"), reply.get("message", ""))
                self._deliver(reply)  # a frame from another peer that beat our reply
        except SignalingError:
            _close_quietly(ws)
            raise
        except Exception as exc:  # websocket-client and json raise many types; each means registration failed
            _close_quietly(ws)
            raise SignalingError(DISCONNECTED, f"registration with {self.url} failed: {exc}") from None
        ws.settimeout(SERVER_SILENCE_S)
        self.ice_servers = reply.get("ice_servers") or []
        with self._send_lock:
            old, self._ws = self._ws, ws
        if old is not None:  # the socket a reconnect replaces: close it, or its descriptor leaks
            _close_quietly(old)
        self._connected.set()
        return reply

    def _read_forever(self) -> None:
        import websocket  # websocket-client

        while not self._closing.is_set():
            ws = self._ws
            try:
                if ws is None:
                    raise ConnectionError("not connected")
                text = ws.recv()
                if not text:
                    raise ConnectionError("connection closed by the server")
            except Exception as exc:
                if not isinstance(exc, (OSError, websocket.WebSocketException)):  # a bug, not the network: say where
                    log.exception("signaling: reading from the server failed")
                if self._closing.is_set():
                    break
                self._connected.clear()
                if not self.reconnect:
                    self._deliver({"type": "_disconnected", "reason": str(exc)})
                    break
                log.warning("signaling: connection lost (%s); reconnecting", exc or type(exc).__name__)
                self._reconnect_with_backoff()
                continue
            try:
                frame = json.loads(text)
            except ValueError:  # a bad frame is the server's bug, not a lost connection
                log.warning("signaling: ignored a frame that is not JSON: %.80r", text)
                continue
            if not isinstance(frame, dict):
                log.warning("signaling: ignored a frame that is not a JSON object: %.80r", text)
                continue
            if frame.get("type") == PING:
                self._send_quietly({"type": PONG})
                continue
            if frame.get("type") == ICE_SERVERS and isinstance(frame.get("ice_servers"), list):
                self.ice_servers = frame["ice_servers"]
                continue
            self._deliver(frame)
        with self._mail:
            self._mail.notify_all()

    def _reconnect_with_backoff(self) -> None:
        delay = RECONNECT_FIRST_DELAY_S
        while not self._closing.is_set():
            try:
                self._open_and_register(REQUEST_TIMEOUT_S)
            except SignalingError as exc:
                log.warning("signaling: reconnect failed (%s); next try in %.1f s", exc, delay)
                self._closing.wait(delay * (0.8 + 0.4 * random.random()))
                delay = min(delay * 2, RECONNECT_MAX_DELAY_S)
                continue
            self.reconnects += 1
            log.warning("signaling: reconnected and registered again as %s", self.peer_id)
            self._deliver({"type": "_reconnected"})
            return

    def _deliver(self, frame: dict) -> None:
        kind = frame.get("type")
        is_reply = kind in REQUEST_REPLIES.values() or (kind == ERROR and frame.get("in_reply_to") in REQUEST_REPLIES)
        box = self._replies if is_reply else self._mailbox
        with self._mail:
            box.append(frame)
            if len(box) > MAILBOX_LIMIT:
                dropped = box.pop(0)
                log.warning("signaling: mailbox full, dropped an unclaimed %s frame", dropped.get("type"))
            self._mail.notify_all()

    # -- sending and receiving ----------------------------------------------------------

    def send(self, frame: dict) -> None:
        """Send one frame; raise SignalingError(DISCONNECTED) while the connection is down."""
        text = json.dumps(frame)
        with self._send_lock:
            if self._ws is None or not self._connected.is_set():
                raise SignalingError(DISCONNECTED, "not connected to the signaling server (reconnecting)")
            try:
                self._ws.send(text)
            except Exception as exc:
                raise SignalingError(DISCONNECTED, f"sending to the signaling server failed: {exc}") from None

    def _send_quietly(self, frame: dict) -> None:
        try:
            self.send(frame)
        except SignalingError:
            pass

    def next(self, match: Optional[Callable[[dict], bool]] = None, timeout: Optional[float] = None) -> Optional[dict]:
        """Take the oldest unsolicited frame that `match` accepts (any when None); None on timeout."""
        return self._take(self._mailbox, match, timeout)

    def _take(self, box: list, match: Optional[Callable[[dict], bool]], timeout: Optional[float]) -> Optional[dict]:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._mail:
            while True:
                for i, frame in enumerate(box):
                    if match is None or match(frame):
                        return box.pop(i)
                if self._closing.is_set():
                    return None
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._mail.wait(remaining)

    def request(self, frame: dict, reply_type: str, timeout: float = REQUEST_TIMEOUT_S) -> dict:
        """Send a frame and wait for its reply; an error frame for it raises SignalingError."""
        sent_type = frame["type"]

        def is_reply(f: dict) -> bool:
            return f.get("type") == reply_type or (f.get("type") == ERROR and f.get("in_reply_to") == sent_type)

        with self._request_lock:
            with self._mail:
                self._replies.clear()  # late answers to requests that timed out
            self.send(frame)
            reply = self._take(self._replies, is_reply, timeout)
        if reply is None:
            raise SignalingError("TIMEOUT", f"no {reply_type} from the signaling server within {timeout:.0f} s")
        if reply["type"] == ERROR:
            raise SignalingError(reply.get("code", "ERROR"), reply.get("message", ""))
        return reply

    # -- the v2 API ---------------------------------------------------------------------

    def discover(self, role: Optional[str] = None, tags: Optional[list] = None,
                 properties: Optional[dict] = None, timeout: float = REQUEST_TIMEOUT_S) -> list[dict]:
        filters: dict[str, Any] = {}
        if role:
            filters["role"] = role
        if tags:
            filters["tags"] = tags
        if properties:
            filters["properties"] = properties
        reply = self.request({"type": DISCOVER_PEERS, "from_peer_id": self.peer_id, "filters": filters},
                             PEER_LIST, timeout)
        return reply.get("peers", [])

    def update_metadata(self, update: dict) -> dict:
        """Merge `update` into this peer's metadata on the server; kept for re-registration."""
        self.metadata = merge_metadata(self.metadata, update)
        reply = self.request({"type": UPDATE_METADATA, "peer_id": self.peer_id, "metadata": update},
                             METADATA_UPDATED)
        return reply["metadata"]

    def send_to_peer(self, to_peer_id: str, payload: Any) -> None:
        self.send({"type": PEER_MESSAGE, "from_peer_id": self.peer_id, "to_peer_id": to_peer_id, "payload": payload})


def guarded(target: Callable) -> Callable:
    """A thread target that logs an unexpected exception with its traceback before the
    thread ends (instead of a bare print to stderr that no log keeps)."""

    def run(*args, **kwargs):
        try:
            return target(*args, **kwargs)
        except Exception:  # the thread boundary: nothing above it would see the error
            log.exception("thread %s failed", threading.current_thread().name)

    return run


def _close_quietly(ws) -> None:
    """Close a websocket-client socket that may already be dead, and free its descriptor
    (close() alone skips that when the connection already ended)."""
    try:
        ws.close(timeout=1)
    except Exception as exc:  # websocket-client raises several types here; each means it is closed already
        log.debug("signaling: closing a socket: %s", exc)
    finally:
        ws.shutdown()


# ---------------------------------------------------------------------------------------
# The asyncio loop that owns every aiortc object of this process
# ---------------------------------------------------------------------------------------

_loop: Optional[asyncio.AbstractEventLoop] = None
# Guards creation of the process's single loop and its thread.
_loop_lock = threading.Lock()


def aio_loop() -> asyncio.AbstractEventLoop:
    """The process's one asyncio loop, running in the daemon thread "aiortc-loop"."""
    global _loop
    with _loop_lock:
        if _loop is None:
            _restrict_host_candidates()
            loop = asyncio.new_event_loop()
            loop.set_exception_handler(_log_loop_exception)
            threading.Thread(target=loop.run_forever, name="aiortc-loop", daemon=True).start()
            _loop = loop
        return _loop


def _log_loop_exception(loop, context: dict) -> None:
    """aiortc's callbacks fail on the loop when a peer vanishes mid-handshake (DTLS and
    SCTP errors): the link already reports that in words, so the traceback goes to the log
    at INFO, where a worker keeps it and a client's terminal does not show it."""
    exc = context.get("exception")
    log.info("aiortc: %s", context.get("message"), exc_info=(type(exc), exc, exc.__traceback__) if exc else None)


def on_loop(coro, timeout: float) -> Any:
    """Run a coroutine on the aiortc loop and wait for its result from a plain thread."""
    future = asyncio.run_coroutine_threadsafe(coro, aio_loop())
    try:
        return future.result(timeout)
    except TimeoutError:
        future.cancel()
        raise


def _restrict_host_candidates() -> None:
    """Offer only the addresses in SLEAP_RTC_ICE_HOSTS as host candidates, when it is set.

    aioice gathers host addresses through one module-level function and never offers
    127.0.0.1 itself; replacing that function is the one place to choose them.
    """
    hosts = _ice_hosts()
    if not hosts:
        return
    import aioice.ice

    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: list(hosts)


def _ice_hosts() -> list[str]:
    """The addresses SLEAP_RTC_ICE_HOSTS names, or [] when it is not set."""
    return [h.strip() for h in os.environ.get(ENV_ICE_HOSTS, "").split(",") if h.strip()]


def _rtc_configuration(ice_servers: list[dict]):
    from aiortc import RTCConfiguration, RTCIceServer

    # An RTCConfiguration without iceServers means Google's STUN server: always pass a list.
    servers = [
        RTCIceServer(urls=s["urls"], username=s.get("username"), credential=s.get("credential"))
        for s in usable_ice_servers(ice_servers)
    ]
    return RTCConfiguration(iceServers=servers)


# ---------------------------------------------------------------------------------------
# ICE servers: which of those handed out this network can use, and why a link found no path
# ---------------------------------------------------------------------------------------
# aiortc builds its ICE agent from the first STUN URL and the first TURN URL it is given
# and ignores the rest, and it gathers every candidate before the offer goes out: an
# unreachable STUN server costs 5 s, and TURN over UDP listed first leaves a network
# without UDP no relay at all. So before each link this side asks the first STUN (or
# TURN/UDP) server for its address, once, with a short timeout: if UDP gets through, it
# uses STUN and the first TURN URL over UDP; if not, no STUN and the first TURN URL over
# TCP, which is what reaches a network that lets no UDP out.

# How a link's close_reason reads when ICE tried every pair and none answered.
ICE_FAILED = "WebRTC connection failed"
UDP_PROBE_TIMEOUT_S = 1.0
# A probe's answer holds this long: a worker accepting many links asks once.
UDP_PROBE_CACHE_S = 60.0
# Guards _udp_probes: {(host, port): (monotonic time asked, mapped address or None)}.
_udp_probe_lock = threading.Lock()
_udp_probes: dict[tuple[str, int], tuple[float, Optional[tuple[str, int]]]] = {}


@dataclass(frozen=True)
class IceUrl:
    """One STUN or TURN URL of an ice_servers entry, with that entry's credentials."""

    url: str
    scheme: str  # stun, stuns, turn, turns
    host: str
    port: int
    transport: str  # udp or tcp
    username: Optional[str] = None
    credential: Optional[str] = None

    def server(self) -> dict:
        """The RTCIceServer-shaped entry for this URL alone."""
        entry = {"urls": self.url}
        if self.username is not None:
            entry.update(username=self.username, credential=self.credential)
        return entry


def ice_urls(ice_servers: list[dict]) -> list[IceUrl]:
    """Every URL of `ice_servers`, in order; one that aiortc cannot use is left out."""
    from aiortc.rtcicetransport import parse_stun_turn_uri

    urls = []
    for server in ice_servers:
        listed = server.get("urls")
        for url in listed if isinstance(listed, list) else [listed]:
            try:
                parsed = parse_stun_turn_uri(str(url))
            except ValueError:
                log.warning("ICE server %r: not a STUN or TURN URL; left out", url)
                continue
            transport = parsed.get("transport") or "udp"
            urls.append(IceUrl(str(url), parsed["scheme"], parsed["host"], parsed["port"], transport,
                               server.get("username"), server.get("credential")))
    return urls


def stun_mapped_address(host: str, port: int, timeout: float = UDP_PROBE_TIMEOUT_S,
                        sock: Optional[socket.socket] = None) -> Optional[tuple[str, int]]:
    """Ask a STUN server over UDP which address and port it sees us at; None when no answer
    came within `timeout` (UDP blocked, or the server down). A lost datagram is sent
    again, as STUN does. Pass `sock` to ask from a given local port."""
    from aioice import stun

    request = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
    own = sock is None
    sock = sock or socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        answer = stun_answer(sock, request, (host, port), timeout)
        return mapped_address(answer) if answer is not None else None
    finally:
        if own:
            sock.close()


def _udp_reaches(url: IceUrl) -> bool:
    """Whether a STUN request over UDP to `url`'s server is answered (asked at most once a minute)."""
    key = (url.host, url.port)
    with _udp_probe_lock:
        asked = _udp_probes.get(key)
    if asked is not None and time.monotonic() - asked[0] < UDP_PROBE_CACHE_S:
        return asked[1] is not None
    mapped = stun_mapped_address(url.host, url.port)
    with _udp_probe_lock:
        _udp_probes[key] = (time.monotonic(), mapped)
    if mapped is None:
        log.info("no STUN answer over UDP from %s:%d: using TURN over TCP only", url.host, url.port)
    return mapped is not None


def forget_network() -> None:
    """Forget what the UDP probes learned: after a lost link the network may be another."""
    with _udp_probe_lock:
        _udp_probes.clear()


def usable_ice_servers(ice_servers: list[dict]) -> list[dict]:
    """The one STUN and one TURN URL (at most) that aiortc should get on this network."""
    urls = ice_urls(ice_servers)
    stuns = [u for u in urls if u.scheme == "stun"]
    turn_udp = [u for u in urls if u.scheme == "turn" and u.transport == "udp"]
    turn_tcp = [u for u in urls if u.scheme in ("turn", "turns") and u.transport == "tcp"]
    probe = (stuns or turn_udp or [None])[0]
    if probe is None:  # nothing reached over UDP anyway: TURN over TCP, if any
        return [u.server() for u in turn_tcp[:1]]
    if _udp_reaches(probe):
        return [u.server() for u in stuns[:1] + (turn_udp or turn_tcp)[:1]]
    return [u.server() for u in turn_tcp[:1]]


def stun_answer(sock: socket.socket, request, address: tuple[str, int], timeout: float):
    """The STUN answer to `request` from `address`, asked from `sock`, or None. A lost
    datagram is sent again, as STUN does; anything else that arrives is skipped, and
    never holds the wait past `timeout`."""
    from aioice import stun

    deadline, wait = time.monotonic() + timeout, min(0.25, timeout)
    while time.monotonic() < deadline:
        try:
            sock.sendto(bytes(request), address)
        except OSError:
            return None  # no route at all
        resend = min(deadline, time.monotonic() + wait)
        while (left := resend - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                data, source = sock.recvfrom(2048)
            except socket.timeout:
                break
            except OSError:
                return None
            try:
                answer = stun.parse_message(data)
            except Exception:  # aioice raises ValueError and struct.error on junk: not our answer
                continue
            if source[:2] == address[:2] and answer.transaction_id == request.transaction_id:
                return answer
        wait *= 2
    return None


def mapped_address(answer) -> Optional[tuple[str, int]]:
    """The address and port a STUN answer says it saw the request come from."""
    return answer.attributes.get("XOR-MAPPED-ADDRESS") or answer.attributes.get("MAPPED-ADDRESS")


def candidate_types(sdp: str) -> list[str]:
    """The kinds of ICE candidate an SDP offers, in the order host, srflx, relay."""
    seen = {parts[parts.index("typ") + 1] for line in sdp.splitlines() if line.startswith("a=candidate:")
            for parts in [line.split()] if "typ" in parts[:-1]}
    return [kind for kind in ("host", "srflx", "prflx", "relay") if kind in seen]


def no_route_advice(local: list[str], remote: list[str], peer: str, servers: list[dict]) -> str:
    """Why two sides with these candidate types found no path, and what would fix it."""
    seen = (f"this machine offered {', '.join(local) or 'no candidates'}; "
            f"{peer} offered {', '.join(remote) or 'no candidates'}")
    if _ice_hosts():
        seen += f" ({ENV_ICE_HOSTS}={','.join(_ice_hosts())} limits this machine's own addresses)"
    urls = ice_urls(servers)
    turn_example = ("signaling.py --ice-server turn:USER:PASSWORD@HOST:3478 (or --turn-secret SECRET "
                    "--turn-url turn:HOST:3478)")
    if not urls:
        why = ("the signaling server hands out no STUN or TURN server, so only the machines' own addresses "
               "were tried; across NATs that cannot work: start it with --ice-server stun:HOST:3478 and "
               f"a TURN server: {turn_example}")
    elif "relay" in local and "relay" in remote:
        why = ("both sides reached the TURN server and still no relayed path worked: the TURN server must "
               "be able to relay between its own relay addresses (coturn: its --denied-peer-ip must not "
               "cover them) and its relay ports (49152-65535/udp) must be open")
    elif "relay" in local or "relay" in remote:
        blocked = peer if "relay" in local else "this machine"
        why = (f"{blocked} got no relay from the TURN server: its network blocks the TURN server's port "
               "or transport; hand out TURN over TCP too (--turn-url 'turn:HOST:3478?transport=tcp', "
               "or TCP port 443)")
    elif not any(u.scheme.startswith("turn") for u in urls):
        if "srflx" in local and "srflx" in remote:
            why = ("both sides are behind NATs and hole punching failed: NATs that change ports for every "
                   f"destination (symmetric) or block unsolicited UDP need a TURN server: {turn_example}")
        else:
            without = "this machine" if "srflx" not in local else peer
            why = (f"{without} got no answer from the STUN server (its network blocks UDP, or the server is "
                   f"down); such a network needs a TURN server over TCP: {turn_example}, with "
                   "'?transport=tcp' on the URL")
    else:
        why = ("neither side got a relay from the TURN server it was given: check that the TURN server is "
               "running and reachable, and its credentials (signaling.py --turn-secret must match coturn's "
               "--static-auth-secret)")
    return f"{seen}: {why}"


# ---------------------------------------------------------------------------------------
# Direct transfers: file bytes over an encrypted TCP connection beside the link
# ---------------------------------------------------------------------------------------
# The data channel is pure-Python SCTP and CPU-bound; a TCP connection between the same two
# machines is some 50 times faster when one can reach the other. The link, already
# authenticated and DTLS-encrypted, carries what the connection needs: FILE_BEGIN offers
# {key, token, hints}, the receiver answers FILE_DIRECT with hints of its own, each side
# listens on its hints and dials the other's, and a connection counts only once both ends
# proved they hold the one-time token. The sender writes "G" on the first such connection
# and AES-256-GCM frames after it. With no connection within DIRECT_CONNECT_TIMEOUT_S, or
# when it breaks, the sender says FILE_CHANNEL, the receiver answers FILE_OFFSET, and the
# rest of the bytes take the data channel. SHA-256 of the whole file is checked as always.

_DIRECT_MAGIC = b"SLRTC-D1"
_PROOF_BYTES = 32  # HMAC-SHA256
_GO = b"G"  # sender -> receiver: this connection carries the file
_DONE = b"K"  # receiver -> sender: the end frame arrived and every byte before it is written
_FRAME_DATA = b"D"
_FRAME_END = b"E"  # payload: the byte count the stream ends at, 8 bytes big-endian
_MAX_SEALED_FRAME = CHUNK_BYTES + 64
_MAX_HINTS = 8
# A peer's hints are dialed only at addresses it also offered as ICE candidates on the
# link, and a link starts at most DIRECT_RACES_BURST direct races at once, refilled at
# DIRECT_RACES_PER_S; past that, the bytes take the data channel. A member cannot turn
# the other side into a port scanner.
DIRECT_RACES_BURST = 8
DIRECT_RACES_PER_S = 0.5


class TokenBucket:
    """A rate limit: `allow()` takes a token when one is left; `rate` come back per second."""

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, burst
        self.tokens = float(burst)
        self.stamp = time.monotonic()
        self._lock = threading.Lock()  # guards tokens and stamp

    def allow(self) -> bool:
        with self._lock:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.tokens < 1:
                return False
            self.tokens -= 1
            return True


def sdp_addresses(sdp: str) -> set[str]:
    """The addresses a peer offered as ICE candidates in its SDP (its a=candidate lines)."""
    return {parts[4] for line in sdp.splitlines() if line.startswith("a=candidate:")
            and len(parts := line.split()) > 5}


def direct_enabled() -> bool:
    """Whether this process may move file bytes over direct TCP connections."""
    return os.environ.get(ENV_NO_DIRECT, "").strip().lower() in ("", "0", "false", "no")


def _direct_listen() -> tuple[list[socket.socket], list[list]]:
    """One listener per address this side offers to ICE, on ephemeral ports, and its hints."""
    hosts = _ice_hosts()
    if not hosts:
        import aioice.ice

        hosts = aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=False)
    listeners, hints = [], []
    for host in hosts[:_MAX_HINTS]:
        try:
            listener = socket.create_server((host, 0), backlog=8)
        except OSError as exc:  # an address that is not ours (any more): the others may do
            log.debug("direct transfers: cannot listen on %s: %s", host, exc)
            continue
        listener.setblocking(False)
        listeners.append(listener)
        hints.append([host, listener.getsockname()[1]])
    return listeners, hints


def _check_hints(hints: Any, offered: set[str]) -> list[tuple[str, int]]:
    """A peer's hints as (IPv4 address, port) pairs, less those at an address it did not
    offer as an ICE candidate (`offered`) and, unless this side offers them itself, those
    at loopback, link-local or multicast addresses; names are never resolved for a peer."""
    if not isinstance(hints, list) or len(hints) > _MAX_HINTS:
        raise TransferError(f"hints must be a list of at most {_MAX_HINTS} [address, port] pairs")
    checked = []
    for hint in hints:
        try:
            host, port = hint
            address = ipaddress.IPv4Address(host)
        except (TypeError, ValueError):
            raise TransferError(f"bad hint {echo(hint)}: want [IPv4 address, port]") from None
        if not _is_a(port, int) or not 0 < port < 65536:
            raise TransferError(f"bad hint {echo(hint)}: the port must be 1-65535")
        special = address.is_loopback or address.is_link_local or address.is_multicast or address.is_unspecified
        if str(address) not in offered:
            log.warning("direct transfer: not dialing %s, which the peer did not offer as an ICE candidate", address)
        elif special and str(address) not in _ice_hosts():
            # A peer writes its own SDP: it may offer this machine's own services as
            # "candidates". A real peer offers loopback only where this side does too (tests).
            log.warning("direct transfer: not dialing %s, a loopback, link-local or multicast address", address)
        else:
            checked.append((str(address), port))
    return checked


def _secret(payload: dict, field: str) -> bytes:
    value = payload.get(field)
    if not isinstance(value, str) or not SHA256_RE.fullmatch(value):
        raise TransferError(f"the direct offer's {field} must be 64 hex digits")
    return bytes.fromhex(value)


def _proof(token: bytes, transfer_id: str, role: str, act: str) -> bytes:
    """What a `role` ("sender"/"receiver") that `act`s ("dial"/"listen") shows for `token`."""
    return hmac.new(token, f"{transfer_id}|{role}|{act}".encode(), hashlib.sha256).digest()


class _Candidate:
    """One TCP connection in a race: dialed by this side or accepted from a listener."""

    def __init__(self, sock: socket.socket, address: str, dialed: bool):
        self.sock = sock
        self.address = address
        self.dialed = dialed
        self.state = "connect" if dialed else "hello"
        self.buffer = b""


def _direct_race(listeners: list[socket.socket], hints: list[tuple[str, int]], token: bytes, transfer_id: str,
                 role: str, deadline: float, stop: threading.Event,
                 wait_go: bool) -> Optional[tuple[socket.socket, str]]:
    """Accept on `listeners` and dial every hint at once, in this thread, until a connection
    proves the token (the sender) or proves it and brings "G" (the receiver).

    Returns (a blocking socket, the peer's address), or None at `deadline` or `stop`.
    Every other connection and every listener is closed before it returns: listeners
    serve one transfer's race and nothing else.
    """
    other = "receiver" if role == "sender" else "sender"
    selector = selectors.DefaultSelector()
    for listener in listeners:
        selector.register(listener, selectors.EVENT_READ, None)
    for host, port in hints:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.connect_ex((host, port))
        selector.register(sock, selectors.EVENT_WRITE, _Candidate(sock, host, dialed=True))
    won: Optional[_Candidate] = None
    try:
        while won is None and not stop.is_set() and (left := deadline - time.monotonic()) > 0:
            for key, _ in selector.select(min(left, 0.1)):
                if key.data is None:
                    try:
                        conn, address = key.fileobj.accept()
                    except OSError:
                        continue
                    conn.setblocking(False)
                    selector.register(conn, selectors.EVENT_READ, _Candidate(conn, address[0], dialed=False))
                    continue
                candidate: _Candidate = key.data
                try:
                    ready = _advance(candidate, token, transfer_id, role, other, wait_go)
                except (OSError, TransferError) as exc:
                    log.log(logging.WARNING if isinstance(exc, TransferError) else logging.DEBUG,
                            "direct transfer %s: connection with %s dropped: %s", transfer_id, candidate.address, exc)
                    selector.unregister(candidate.sock)
                    candidate.sock.close()
                    continue
                if ready:
                    won = candidate
                    break
                events = selectors.EVENT_WRITE if candidate.state == "connect" else selectors.EVENT_READ
                selector.modify(candidate.sock, events, candidate)
    finally:
        for key in list(selector.get_map().values()):
            if won is None or key.fileobj is not won.sock:
                key.fileobj.close()
        selector.close()
    if won is None:
        return None
    won.sock.setblocking(True)
    won.sock.settimeout(DIRECT_IO_TIMEOUT_S)
    return won.sock, won.address


def _advance(c: _Candidate, token: bytes, transfer_id: str, role: str, other: str, wait_go: bool) -> bool:
    """Take one step of a connection's handshake; True once it is the one to use.

    The dialer shows MAGIC + its proof; the listener checks it and shows its own; so each
    end knows the other holds the token before a byte of the file moves. Raises
    TransferError for a connection that proves nothing, OSError for a broken one.
    """
    if c.state == "connect":
        error = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            raise OSError(error, os.strerror(error))
        c.sock.sendall(_DIRECT_MAGIC + _proof(token, transfer_id, role, "dial"))
        c.state = "reply"
        return False
    want = {"hello": len(_DIRECT_MAGIC) + _PROOF_BYTES, "reply": _PROOF_BYTES, "go": 1}[c.state]
    data = c.sock.recv(want - len(c.buffer))
    if not data:
        raise OSError("closed by the other end")
    c.buffer += data
    if len(c.buffer) < want:
        return False
    received, c.buffer = c.buffer, b""
    if c.state == "hello":
        if not (received.startswith(_DIRECT_MAGIC) and
                hmac.compare_digest(received[len(_DIRECT_MAGIC):], _proof(token, transfer_id, other, "dial"))):
            raise TransferError("refused: it did not prove the transfer's token")
        c.sock.sendall(_proof(token, transfer_id, role, "listen"))
    elif c.state == "reply":
        if not hmac.compare_digest(received, _proof(token, transfer_id, other, "listen")):
            raise TransferError("refused: the listener did not prove the transfer's token")
    elif received != _GO:
        raise TransferError("refused: an unexpected byte instead of the go-ahead")
    else:
        return True
    if not wait_go:
        return True
    c.state = "go"
    return False


class _Sealer:
    """AES-256-GCM frames of one transfer: a counter nonce, the transfer id as associated
    data. A key serves one transfer in one direction, so no nonce repeats under it."""

    def __init__(self, key: bytes, transfer_id: str):
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._aead = AESGCM(key)
        self._aad = transfer_id.encode()
        self._counter = 0

    def _nonce(self) -> bytes:
        self._counter += 1
        return self._counter.to_bytes(12, "big")

    def seal(self, kind: bytes, data: bytes) -> bytes:
        sealed = self._aead.encrypt(self._nonce(), kind + data, self._aad)
        return len(sealed).to_bytes(4, "big") + sealed

    def read(self, sock: socket.socket) -> tuple[bytes, bytes]:
        """The next frame's (kind, data); TransferError when it fails authentication."""
        from cryptography.exceptions import InvalidTag

        size = int.from_bytes(_recv_exact(sock, 4), "big")
        if size > _MAX_SEALED_FRAME:
            raise TransferError(f"a direct frame of {size} bytes announced (corrupted or tampered with in transit)")
        try:
            plain = self._aead.decrypt(self._nonce(), _recv_exact(sock, size), self._aad)
        except InvalidTag:
            raise TransferError("a frame on the direct connection failed authentication "
                                "(corrupted or tampered with in transit)") from None
        return plain[:1], plain[1:]


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    buffer = bytearray(size)
    view, got = memoryview(buffer), 0
    while got < size:
        n = sock.recv_into(view[got:])
        if not n:
            raise ConnectionError(f"the direct connection closed {size - got} bytes before the frame's end")
        got += n
    return bytes(buffer)


class _DirectSender:
    """The sending end of one transfer's direct path: its listeners, key and token."""

    def __init__(self, transfer_id: str):
        self.transfer_id = transfer_id
        self.key = os.urandom(32)
        self.token = os.urandom(32)
        self.listeners, self.hints = _direct_listen()

    def offer(self) -> dict:
        return {"key": self.key.hex(), "token": self.token.hex(), "hints": self.hints}

    def connect(self, reply: dict, stop: threading.Event, offered: set[str]) -> Optional[tuple[socket.socket, str]]:
        """Race for a connection with the receiver, whose FILE_DIRECT is `reply` and whose
        ICE candidates were at `offered`."""
        try:
            hints = _check_hints(reply.get("hints", []), offered)
        except TransferError as exc:
            log.warning("direct transfer %s: %s", self.transfer_id, exc)
            hints = []
        return _direct_race(self.listeners, hints, self.token, self.transfer_id, "sender",
                            time.monotonic() + DIRECT_CONNECT_TIMEOUT_S, stop, wait_go=False)

    def close(self) -> None:
        for listener in self.listeners:
            listener.close()


class _DirectReceiver:
    """The receiving end of one transfer's direct path: thread "link-direct-PEER" races for
    the sender's connection, then writes what arrives on it into `incoming`.

    The link's Transfers owns it (and its receive thread calls it): `stop` ends the thread
    (FILE_CHANNEL, FILE_END, a new transfer or the end of the link) before that thread
    touches `incoming` again. The thread calls `on_data` after each chunk it writes, and
    `on_failed(error)` when the stream fails its checks; a connection that merely breaks
    calls nothing, since the sender goes on over the link (FILE_CHANNEL) or ends the transfer.
    `offered` are the addresses the peer offered to ICE (see _check_hints).
    """

    def __init__(self, peer_id: str, incoming: "Incoming", offer: dict, offered: set[str],
                 on_data: Callable[[], None], on_failed: Callable[[str], None]):
        self.peer_id = peer_id
        self.incoming = incoming
        self.key = _secret(offer, "key")
        self.token = _secret(offer, "token")
        self.peer_hints = _check_hints(offer.get("hints", []), offered)
        self.listeners, self.hints = _direct_listen()
        self.on_data, self.on_failed = on_data, on_failed
        self._stop = threading.Event()
        # Guards sock, so that `stop` can shut down a connection the thread is reading.
        self._lock = threading.Lock()
        self.sock: Optional[socket.socket] = None
        self._thread = threading.Thread(target=guarded(self._run), name=f"link-direct-{peer_id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            if self.sock is not None:
                try:
                    self.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self._thread.join(DIRECT_IO_TIMEOUT_S)

    def _run(self) -> None:
        incoming = self.incoming
        won = _direct_race(self.listeners, self.peer_hints, self.token, incoming.transfer_id, "receiver",
                           time.monotonic() + DIRECT_LISTEN_S, self._stop, wait_go=True)
        if won is None:
            return
        with self._lock:
            self.sock, address = won
            if self._stop.is_set():
                self.sock.close()
                return
        incoming.via = f"direct TCP {address}"
        sealer = _Sealer(self.key, incoming.transfer_id)
        try:
            while True:
                kind, data = sealer.read(self.sock)
                if kind == _FRAME_END:
                    if int.from_bytes(data, "big") != incoming.received:
                        raise TransferError(f"the direct stream ended at byte {int.from_bytes(data, 'big')} "
                                            f"but {incoming.received} arrived")
                    self.sock.sendall(_DONE)
                    return
                if kind != _FRAME_DATA:
                    raise TransferError("an unknown frame on the direct connection")
                incoming.write(data)
                self.on_data()
        except TransferError as exc:
            error = f"{incoming.name}: {exc}"
            log.warning("link %s: %s", self.peer_id, error)
            self.on_failed(error)
        except OSError as exc:  # the sender goes on over the link (FILE_CHANNEL) or ends the transfer
            log.info("link %s: direct connection for %s broke: %s", self.peer_id, incoming.name, exc)
        finally:
            self.sock.close()


# ---------------------------------------------------------------------------------------
# The WebRTC link
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileReceived:
    """Inbox event: a file arrived, was checked and now lies at `path`."""

    path: Path
    name: str
    size: int
    sha256: str
    via: str = "data channel"  # or "direct TCP ADDRESS", and how a broken one went on
    seconds: float = 0.0  # from FILE_BEGIN to the checked file


@dataclass(frozen=True)
class TransferFailed:
    """Inbox event: an incoming file did not arrive; nothing was kept."""

    name: str
    error: str


# What Link.recv returns and expect hands on: a decoded Message, a file event, or, on an
# upstream link, a text frame as it came (their binary frames never reach the inbox).
Received = Message | FileReceived | TransferFailed | str


class Incoming:
    """A file being received into `part`, moved to `final()` once size and SHA-256 match.

    A resumable one (an upload into a worker's store) starts at `offset`: the bytes
    already in `part` are hashed again and kept, and when the link ends mid-transfer the
    part stays for the next attempt. `release` hands the part over to a newer upload of
    the same content, which arrived on another link.
    """

    def __init__(self, transfer_id: str, name: str, size: int, sha256: str, part: Optional[Path],
                 final: Callable[[], Path], offset: int = 0, resumable: bool = False):
        self.transfer_id = transfer_id
        self.name = name
        self.size = size
        self.sha256 = sha256
        self.part = part
        self.final = final
        self.offset = offset
        self.resumable = resumable
        self.received = offset
        self.digest = hashlib.sha256()
        self.refused: Optional[str] = None
        self.finished = False
        self.closed = False  # finished, discarded, suspended or released: nothing more is written
        self.via = "data channel"  # the path the bytes took, for the receiver to report
        self.started = time.monotonic()
        # Guards file and released: `release` comes from another link's receive thread.
        self._lock = threading.Lock()
        self.file = None
        self.released: Optional[str] = None

    def open(self) -> None:
        self.part.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.part.parent).free
        if self.size - self.offset > free:
            raise TransferError(f"not enough space on the receiving side: need {self.size - self.offset} bytes, "
                                f"{free} free")
        with self._lock:
            if not self.offset:
                self.file = open(self.part, "wb")
                return
            held = self.part.stat().st_size if self.part.exists() else 0
            if held < self.offset:
                raise TransferError(f"{self.name}: cannot resume at byte {self.offset}; only {held} are held")
            self.file = open(self.part, "r+b")
            self.file.truncate(self.offset)
            left = self.offset
            while left:
                chunk = self.file.read(min(left, 1024 * 1024))
                self.digest.update(chunk)
                left -= len(chunk)
            self.file.seek(self.offset)

    def write(self, chunk: bytes) -> None:
        with self._lock:
            if self.released:
                raise TransferError(self.released)
            self.received += len(chunk)
            if self.received > self.size:
                raise TransferError(f"{self.name}: more bytes than the {self.size} announced")
            self.digest.update(chunk)
            self.file.write(chunk)

    def finish(self) -> Path:
        with self._lock:
            if self.released:
                raise TransferError(self.released)
            self.file.close()
            if self.received != self.size:
                raise TransferError(f"{self.name}: received {self.received} of {self.size} bytes")
            if self.digest.hexdigest() != self.sha256:
                raise TransferError(f"{self.name}: SHA-256 mismatch (file corrupted in transit)")
            final = self.final()
            os.replace(self.part, final)
            self.finished = self.closed = True
            return final

    def discard(self) -> None:
        """The transfer failed: nothing of it is kept."""
        with self._lock:
            self.closed = True
            if self.file is not None:
                self.file.close()
            if self.part is not None and not self.released:
                self.part.unlink(missing_ok=True)

    def suspend(self) -> None:
        """The link ended mid-transfer: a resumable part stays for the next attempt."""
        if not self.resumable:
            self.discard()
            return
        with self._lock:
            self.closed = True
            if self.file is not None:
                self.file.close()

    def release(self, reason: str) -> None:
        """Give the part up to a newer transfer of the same content; later writes fail with `reason`."""
        with self._lock:
            self.released = reason
            self.closed = True
            if self.file is not None:
                self.file.close()


def check_opened(f, path: Path) -> None:
    """Raise TransferError when the file `f` opened is not the real path `path` the caller
    checked earlier: a file checked once and sent later (a download waits in the sender's
    queue) must not be swapped for a link to another file in between. Linux only (it asks
    /proc); elsewhere it trusts the path."""
    where = Path(f"/proc/self/fd/{f.fileno()}")
    if where.exists() and os.path.realpath(where) != str(path):
        raise TransferError(f"{path} changed after it was checked (it now leads to {os.path.realpath(where)})")


def _free_name(path: Path) -> Path:
    """`path`, or `stem.1.ext`, `stem.2.ext`, ... when it exists: never overwrite a user's file."""
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}.{n}{path.suffix}")
    return candidate


def safe_file_name(name: str) -> str:
    """The name a received file may take: a plain file name, nothing that climbs directories."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    if base in ("", ".", "..") or base.startswith(".") or "\x00" in base or len(base.encode()) > 255:
        raise TransferError(f"refusing file name {echo(name)}")
    return base


class Transfers:
    """The receiving end of a link's file transfers, with no socket or channel of its own.

    The link's receive thread feeds it what the peer sends about files: FILE_BEGIN,
    FILE_CHANNEL, FILE_END and FILE_ABORT (`begin`, `channel`, `end`, `abort`), the binary
    frames between them (`chunk`), and `lost` when the link ends. One file arrives at a
    time, as an Incoming; a second FILE_BEGIN supersedes the one still open. Whatever
    the peer must hear (FILE_ACK with the verdict, FILE_DIRECT, FILE_OFFSET, ERROR) goes
    to `send(name, payload)`, which must not block; FileReceived and TransferFailed go to
    `deliver` (the link's inbox).

    Files go to `receive_dir` (None: refused) or, announced with `store`, to `store`
    (anything with `incoming(transfer_id, name, size, sha256, offset) -> Incoming`).
    A FILE_BEGIN that offers a direct path is answered here too: `start_direct(incoming,
    offer, on_data, on_failed)` builds the _DirectReceiver whose thread then writes that
    file's bytes (None, or no token left in `races`: the bytes take the data channel).
    """

    def __init__(self, peer_id: str, receive_dir: Optional[Path], store, send: Callable[[str, dict], None],
                 deliver: Callable[[Any], None], start_direct: Optional[Callable[..., _DirectReceiver]] = None,
                 races: Optional[TokenBucket] = None):
        self.peer_id = peer_id  # for the log
        self.receive_dir = Path(receive_dir) if receive_dir is not None else None
        self.store = store
        # Called as (bytes_received, total) while a file arrives, from the direct thread too.
        self.on_progress: Optional[Callable[[int, int], None]] = None
        self._send, self._deliver = send, deliver
        self._start_direct = start_direct
        # Direct races this side may start; a link shares one bucket with its sending side.
        self._races = races or TokenBucket(DIRECT_RACES_PER_S, DIRECT_RACES_BURST)
        # The file arriving now and the direct path writing it, if any. Only the caller's one
        # thread changes them; a direct thread writes into `incoming` until `stop` returns.
        self.incoming: Optional[Incoming] = None
        self._direct: Optional[_DirectReceiver] = None

    def chunk(self, data: bytes) -> None:
        """A binary frame: the next bytes of the file arriving."""
        incoming = self.incoming
        if incoming is None:
            log.warning("link %s: binary frame outside a transfer, dropped", self.peer_id)
            return
        if incoming.refused:
            return
        try:
            incoming.write(data)
        except (TransferError, OSError) as exc:
            incoming.refused = str(exc)
            incoming.discard()
            self._ack(incoming.transfer_id, ok=False, error=str(exc))
            return
        self.progress(incoming)

    def begin(self, message: Message) -> None:
        """FILE_BEGIN: a new file; one still arriving is superseded."""
        self._stop_direct()
        self.incoming = self._open(message.payload, self.incoming)
        self._direct = self._offer_direct(self.incoming, message.payload.get("direct"))

    def channel(self, message: Message) -> None:
        """FILE_CHANNEL: the rest of the bytes comes over the link; say from which byte."""
        incoming = self._current(message)
        if incoming is None:
            return
        if incoming.via != "data channel":
            incoming.via += f", then data channel from byte {incoming.received}"
        if not incoming.refused:
            self._send(FILE_OFFSET, {"transfer_id": incoming.transfer_id, "offset": incoming.received})

    def end(self, message: Message) -> None:
        """FILE_END: check the file, keep it under its final name, and give the verdict."""
        incoming = self._current(message)
        if incoming is None:
            return
        self.incoming = None
        if incoming.refused:  # the verdict went out when it was refused
            return
        try:
            final = incoming.finish()
        except (TransferError, OSError) as exc:
            incoming.discard()
            self._ack(incoming.transfer_id, ok=False, error=str(exc))
            self._deliver(TransferFailed(incoming.name, str(exc)))
            return
        stored = {"path": str(final)} if incoming.resumable else {}  # a path in the store; a client keeps its own
        self._ack(incoming.transfer_id, ok=True, saved_as=final.name, **stored)
        self._deliver(FileReceived(final, incoming.name, incoming.size, incoming.sha256, incoming.via,
                                   time.monotonic() - incoming.started))

    def abort(self, message: Message) -> None:
        """FILE_ABORT: the sender gave up; what an upload into the store holds stays for it to resume."""
        incoming = self._current(message)
        if incoming is None:
            return
        self.incoming = None
        if incoming.refused:
            return
        incoming.suspend()
        kept = "; what arrived is kept for resuming" if incoming.resumable else ""
        reason = str(message.payload.get("reason", ""))
        self._deliver(TransferFailed(incoming.name, f"{incoming.name}: the sender aborted ({reason}){kept}"))

    def lost(self, reason: str) -> None:
        """The link ended (`reason`): a file still arriving fails; a resumable part stays."""
        self._stop_direct()
        incoming, self.incoming = self.incoming, None
        if incoming is not None and not incoming.refused:
            incoming.suspend()
            kept = "; kept for resuming" if incoming.resumable else ""
            self._deliver(TransferFailed(incoming.name, f"{incoming.name}: link lost after {incoming.received} "
                                         f"of {incoming.size} bytes{kept} ({reason})"))

    def progress(self, incoming: Incoming) -> None:
        if self.on_progress:
            self.on_progress(incoming.received, incoming.size)

    def direct_failed(self, incoming: Incoming, error: str) -> None:
        """The direct path's stream failed its checks (called from its thread): nothing is kept."""
        incoming.refused = error
        incoming.discard()
        self._ack(incoming.transfer_id, ok=False, error=error)
        self._deliver(TransferFailed(incoming.name, error))

    def _current(self, message: Message) -> Optional[Incoming]:
        """The file that `message` is about, its direct path stopped; None (and an ERROR
        to the peer) when it names another transfer."""
        incoming = self.incoming
        if incoming is None or message.payload.get("transfer_id") != incoming.transfer_id:
            self.reply_error(f"{message.name} for an unknown transfer")
            return None
        self._stop_direct()
        return incoming

    def _stop_direct(self) -> None:
        if self._direct is not None:
            self._direct.stop()
            self._direct = None

    def _open(self, payload: dict, previous: Optional[Incoming]) -> Incoming:
        """The Incoming a FILE_BEGIN announces, opened; a refused one (with `refused` set)
        when it cannot be taken, after the verdict went to the peer and the inbox."""
        if previous is not None and not previous.refused:
            previous.suspend()
            self._deliver(TransferFailed(previous.name, f"{previous.name}: superseded by a new transfer"))
        transfer_id = str(payload.get("transfer_id", ""))
        try:
            size, sha256, offset = payload["size"], payload["sha256"], payload.get("offset", 0)
            if not isinstance(size, int) or size < 0 or not SHA256_RE.fullmatch(str(sha256)):
                raise TransferError("FILE_BEGIN needs a size (bytes) and a SHA-256 hex digest")
            if not isinstance(offset, int) or isinstance(offset, bool) or not 0 <= offset <= size:
                raise TransferError(f"offset must be a byte count from 0 to the size, not {echo(offset)}")
            name = safe_file_name(str(payload.get("name", "")))
            if payload.get("store"):
                if self.store is None:
                    raise TransferError("this side keeps no upload store")
                incoming = self.store.incoming(transfer_id, name, size, sha256, offset)
            elif offset or self.receive_dir is None:
                raise TransferError("this side takes files only into its upload store (client.py upload)"
                                    if self.receive_dir is None else "only an upload into the store resumes")
            else:
                directory = self.receive_dir
                incoming = Incoming(transfer_id, name, size, sha256, directory / f".{name}.{transfer_id}.part",
                                    lambda: _free_name(directory / name))
            incoming.open()
        except (KeyError, TransferError, OSError) as exc:
            error = f"refused: {exc}"
            self._ack(transfer_id, ok=False, error=error)
            self._deliver(TransferFailed(str(payload.get("name", "?"))[:100], error))
            refused = Incoming(transfer_id, "refused", 0, "", None, lambda: Path())
            refused.refused = error
            return refused
        return incoming

    def _offer_direct(self, incoming: Incoming, offer: Any) -> Optional[_DirectReceiver]:
        """Answer a FILE_BEGIN's direct offer with FILE_DIRECT; the started direct path, if any."""
        if offer is None or incoming.refused:
            return None
        reply: dict = {"transfer_id": incoming.transfer_id}
        direct = None
        if self._start_direct is None or not direct_enabled():
            reply["off"] = "direct transfers are turned off on this side"
        elif not isinstance(offer, dict):  # before the rate limit: only a real attempt takes a token
            reply["off"] = "the direct offer must be an object"
        elif not self._races.allow():
            reply["off"] = "too many direct transfers on this link just now; this one takes the data channel"
        else:
            try:
                direct = self._start_direct(incoming, offer, lambda: self.progress(incoming),
                                            lambda error: self.direct_failed(incoming, error))
                reply["hints"] = direct.hints
            except (TransferError, OSError) as exc:
                reply["off"] = str(exc)
        self._send(FILE_DIRECT, reply)
        if direct is not None:
            direct.start()
        return direct

    def _ack(self, transfer_id: str, **fields) -> None:
        self._send(FILE_ACK, {"transfer_id": transfer_id, **fields})

    def reply_error(self, text: str) -> None:
        """Tell the peer (LINK_ERROR) and the log what was wrong with what it sent."""
        log.warning("link %s: %s", self.peer_id, text)
        self._send(*link_error(text[:500]))


_CLOSED = object()  # in a link's queues: the link ended
_WAKE = object()  # in a link's inbox: Link.wake


class FileSender:
    """The sending side of a link's file transfers (Transfers is the receiving side):
    FILE_BEGIN, the bytes, FILE_END, then the receiver's FILE_ACK. The bytes take a
    direct TCP connection when one opens, and the data channel otherwise or from where a
    direct one broke. One file at a time; the caller's thread does the sending.

    The link's receive thread hands it the receiver's replies (`on_ack`, `on_reply`), and
    the link's end wakes every waiting sender (`lost`).
    """

    def __init__(self, link: "Link", direct_races: TokenBucket):
        self._link = link
        self._direct_races = direct_races  # shared with the link's Transfers
        # Guards _acks (transfers waiting for the receiver's FILE_ACK) and _replies (the
        # receiver's FILE_DIRECT and FILE_OFFSET for them). `lost` wakes every waiter
        # registered before it; one registered after it fails on its first send.
        self._lock = threading.Lock()
        self._acks: dict[str, tuple[threading.Event, dict]] = {}
        self._replies: dict[str, "queue.Queue[Any]"] = {}
        self._gone = threading.Event()  # the link ended: stops a direct connection's race too
        # One outgoing transfer at a time: binary frames belong to the current transfer.
        self._one_at_a_time = threading.Lock()

    def send(self, path: Path, name: Optional[str] = None,
                  progress: Optional[Callable[[int, int], None]] = None, store: bool = False, offset: int = 0,
                  digest: Optional[tuple[int, str]] = None, exact: bool = False) -> dict:
        """Send a file and wait until the receiver checked size and SHA-256.

        With `store` the file goes into the receiver's upload store, from byte `offset`
        on (the receiver holds the bytes before it). `digest` is the file's (size,
        SHA-256) when the caller has it already. With `exact`, `path` is a real path the
        caller checked, and a file that no longer is it is not sent (see check_opened).
        The bytes take a direct TCP connection when one opens, and the data channel
        otherwise or from where a direct one broke.
        Returns the receiver's FILE_ACK payload (with `saved_as`, and `path` in the
        store) plus `via`, the path taken; raises TransferError or LinkClosed.
        """
        link, path = self._link, Path(path)
        size, sha256 = digest or file_digest(path)
        name = name or path.name
        transfer_id = uuid.uuid4().hex[:12]
        event, result = threading.Event(), {}
        direct: Optional[_DirectSender] = None
        via = "data channel"
        with self._one_at_a_time:
            if direct_enabled() and self._direct_races.allow():
                direct = _DirectSender(transfer_id)
            with self._lock:
                self._acks[transfer_id] = (event, result)
                self._replies[transfer_id] = queue.Queue()
            try:
                begin = {"transfer_id": transfer_id, "name": name, "size": size, "sha256": sha256}
                if store:
                    begin.update(store=True, offset=offset)
                if direct is not None:
                    begin["direct"] = direct.offer()
                link.send(FILE_BEGIN, begin)
                channel_from: Optional[int] = offset
                with open(path, "rb") as f:
                    if exact:
                        check_opened(f, path)
                    if direct is not None:
                        via, channel_from = self._send_direct(direct, f, offset, size, progress, event)
                    if channel_from is not None:
                        f.seek(channel_from)
                        sent = channel_from
                        while chunk := f.read(CHUNK_BYTES):
                            if event.is_set():  # refused or failed early
                                break
                            link.send_raw(chunk)
                            sent += len(chunk)
                            if progress:
                                progress(sent, size)
                if event.is_set() and not result.get("ok"):
                    if not link.closed:
                        link.send(FILE_ABORT, {"transfer_id": transfer_id, "reason": "refused by the receiver"})
                else:
                    link.send(FILE_END, {"transfer_id": transfer_id})
                # The verdict, or the link's end (`lost` sets the event with its reason).
                if not event.wait(FILE_ACK_TIMEOUT_S) and not link.closed:
                    result["error"] = f"{self._link.peer_id} did not confirm it within {FILE_ACK_TIMEOUT_S:.0f} s"
            except LinkClosed as exc:
                raise TransferError(f"sending {name} failed: {exc}") from None
            finally:
                if direct is not None:
                    direct.close()
                with self._lock:
                    self._acks.pop(transfer_id, None)
                    self._replies.pop(transfer_id, None)
        if not result.get("ok"):
            raise TransferError(f"sending {name} failed: {result.get('error') or self._link.close_reason}")
        return {**result, "via": via}

    def _send_direct(self, direct: _DirectSender, f, offset: int, size: int,
                     progress: Optional[Callable[[int, int], None]], refused: threading.Event) -> tuple[str, Optional[int]]:
        """Send the bytes from `offset` over a direct connection if one opens.

        Returns (the path taken, None) when they all went that way, or (the path taken,
        the byte the data channel goes on from) when no connection opened or it broke.
        """
        tid = direct.transfer_id
        reply = self._transfer_reply(tid, FILE_DIRECT, refused)
        if reply is None:  # refused: the caller aborts
            return "data channel", None
        if reply.payload.get("off"):
            return f"data channel (the receiver: {str(reply.payload['off'])[:200]})", offset
        won = direct.connect(reply.payload, self._gone, self._link.remote_addresses)
        if won is None:
            return "data channel (no direct connection)", self._channel_from(tid, refused)
        sock, address = won
        sent = offset
        try:
            with sock:
                sock.sendall(_GO)
                sealer = _Sealer(direct.key, tid)
                f.seek(offset)
                while chunk := f.read(CHUNK_BYTES):
                    if refused.is_set():
                        return f"direct TCP {address}", None
                    sock.sendall(sealer.seal(_FRAME_DATA, chunk))
                    sent += len(chunk)
                    if progress:
                        progress(sent, size)
                sock.sendall(sealer.seal(_FRAME_END, sent.to_bytes(8, "big")))
                if sock.recv(1) != _DONE:
                    raise ConnectionError("closed before confirming the last frame")
            return f"direct TCP {address}", None
        except OSError as exc:
            if refused.is_set():
                return f"direct TCP {address}", None
            log.warning("link %s: the direct connection broke after %d bytes (%s); going on over the link",
                        self._link.peer_id, sent, exc)
            resume = self._channel_from(tid, refused)
            return f"direct TCP {address}, then data channel from byte {resume} (the direct connection broke)", resume

    def _channel_from(self, transfer_id: str, refused: threading.Event) -> Optional[int]:
        """Tell the receiver the rest comes over the link; the byte it wants next (None: refused)."""
        self._link.send(FILE_CHANNEL, {"transfer_id": transfer_id})
        reply = self._transfer_reply(transfer_id, FILE_OFFSET, refused)
        if reply is None:
            return None
        offset = reply.payload.get("offset")
        if not _is_a(offset, int) or offset < 0:
            raise TransferError(f"the receiver asked to go on from byte {echo(offset)}")
        return offset

    def _transfer_reply(self, transfer_id: str, name: str, refused: threading.Event) -> Optional[Message]:
        """The receiver's `name` reply about a transfer; None when it refused the transfer instead."""
        replies = self._replies[transfer_id]  # FILE_ACK and the link's end wake it too
        deadline = time.monotonic() + FILE_ACK_TIMEOUT_S
        while not refused.is_set():
            self._link.raise_if_closed()
            try:
                reply = replies.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TransferError(f"{self._link.peer_id} sent no {name} within {FILE_ACK_TIMEOUT_S:.0f} s") from None
            if reply is not _CLOSED and reply.name == name:
                return reply
        return None

    def on_ack(self, message: Message) -> None:
        """FILE_ACK: the receiver's verdict on a file this side sends."""
        transfer_id = str(message.payload.get("transfer_id"))
        with self._lock:
            waiter = self._acks.get(transfer_id)
            replies = self._replies.get(transfer_id)
        if waiter:
            waiter[1].update(message.payload)
            waiter[0].set()
        if replies is not None:  # a sender waiting for FILE_DIRECT or FILE_OFFSET sees the verdict at once
            replies.put(message)

    def on_reply(self, message: Message) -> None:
        """FILE_DIRECT or FILE_OFFSET: the receiver's answer to a file this side sends."""
        with self._lock:
            replies = self._replies.get(str(message.payload.get("transfer_id")))
        if replies is not None:
            replies.put(message)

    def lost(self, reason: str) -> None:
        """The link ended: every transfer waiting for a reply fails with `reason`. The link
        marks itself closed first, so a transfer that registers after this fails on its
        first send instead of waiting."""
        with self._lock:
            self._gone.set()
            waiters = list(self._acks.values())
            replies = list(self._replies.values())
        for event, result in waiters:
            result.setdefault("ok", False)
            result.setdefault("error", reason)
            event.set()
        for box in replies:
            box.put(_CLOSED)


class Link:
    """A WebRTC data channel to one peer, used from plain threads.

    Objects of aiortc live on the loop thread. The loop's message handler answers
    heartbeats and close requests and hands everything else to this link's receive thread
    ("link-rx-PEER", stopped by close), which puts application messages into `inbox`,
    hands what concerns incoming files to the link's Transfers (which puts FileReceived
    and TransferFailed events into `inbox`), and the receiver's replies about outgoing
    files to its FileSender. `send` blocks while the SCTP queue is above SEND_HIGH_WATER.
    A peer silent for PEER_TIMEOUT_S closes the link. File bytes take a direct TCP
    connection when both sides allow it and one reaches the other, and the data channel
    otherwise. Once closed, recv, expect and send raise LinkClosed, from the exception
    that closed the link when one did.

    A channel with an upstream label (UPSTREAM_CHANNEL_LABELS) makes an `upstream` link:
    no heartbeats and no silence rule (its WebRTC connection decides when it ends), binary
    KEEP_ALIVE dropped, and every text frame put into `inbox` as the str it is; the owner
    answers with `send_raw`.
    """

    def __init__(self, peer_id: str, pc, receive_dir: Optional[Path], store=None):
        self.peer_id = peer_id
        self.inbox: "queue.Queue[Received]" = queue.Queue()
        self.upstream = False  # set from the channel's label when it arrives
        self.close_reason = ""
        self._close_cause: Optional[BaseException] = None  # the exception that closed the link, if one did
        self._pc = pc
        self._loop = aio_loop()
        self._channel = None
        self._opened = threading.Event()
        self._closed = threading.Event()
        self._settled = threading.Event()  # opened or closed, whichever came first: wakes wait_open
        self._bye_acked = threading.Event()
        self._raw: "queue.Queue[Any]" = queue.Queue()
        self.last_activity = time.monotonic()  # when the receive thread last took a frame
        # The addresses the peer offered as ICE candidates: the only ones its direct-path
        # hints may send this side to (set once the peer's SDP is known).
        self.remote_addresses: set[str] = set()
        # What each side offered (candidate types) and the ICE servers handed out: what a
        # link that finds no path names in its error.
        self.candidates: tuple[list[str], list[str]] = ([], [])
        self.ice_servers: list[dict] = []
        self._direct_races = TokenBucket(DIRECT_RACES_PER_S, DIRECT_RACES_BURST)
        self._low = asyncio.Event()  # loop-side: SCTP queue drained to SEND_LOW_WATER
        self._last_rx = time.monotonic()  # loop-side only
        # Guards the one-way change to closed, with close_reason and _close_cause.
        self._close_lock = threading.Lock()
        # Outgoing files, sent from the caller's thread.
        self._files_out = FileSender(self, self._direct_races)
        # Incoming files; only the receive thread feeds it. Its owner may set `receive_dir`
        # (where files go; None: refused, but for uploads into the store) and `on_progress`.
        self.incoming = Transfers(peer_id, receive_dir, store, self._send_control, self.inbox.put,
                                    self._direct_receiver, self._direct_races)
        # What the receive thread does with each housekeeping message; the rest go to inbox.
        self._handlers: dict[str, Callable[[Message], None]] = {
            FILE_BEGIN: self.incoming.begin, FILE_CHANNEL: self.incoming.channel,
            FILE_END: self.incoming.end, FILE_ABORT: self.incoming.abort,
            FILE_ACK: self._files_out.on_ack, FILE_DIRECT: self._files_out.on_reply,
            FILE_OFFSET: self._files_out.on_reply,
        }
        # _rx_loop logs its own failure and closes the link, so it needs no guarded().
        self._rx_thread = threading.Thread(target=self._rx_loop, name=f"link-rx-{peer_id}", daemon=True)
        self._rx_thread.start()

    # -- loop side ----------------------------------------------------------------------

    def _attach(self, channel) -> None:
        """Wire a data channel's events (runs on the loop)."""
        self._channel = channel
        self.upstream = channel.label in UPSTREAM_CHANNEL_LABELS
        channel.bufferedAmountLowThreshold = SEND_LOW_WATER

        @channel.on("open")
        def _on_open():
            self._on_open()

        @channel.on("message")
        def _on_message(data):
            self._last_rx = time.monotonic()
            if self.upstream:
                if data != UPSTREAM_KEEP_ALIVE:
                    self._raw.put(data)
                return
            if isinstance(data, str):
                if data == HEARTBEAT:
                    return
                if data == BYE:
                    self._send_now(BYE_ACK)
                    self._mark_closed("the peer closed the link")
                    self._loop.call_later(CLOSE_ACK_TIMEOUT_S, lambda: asyncio.ensure_future(self._pc.close()))
                    return
                if data == BYE_ACK:
                    self._bye_acked.set()
                    return
            self._raw.put(data)

        @channel.on("close")
        def _on_close():
            self._mark_closed("the data channel closed")

        @channel.on("bufferedamountlow")
        def _on_low():
            self._low.set()

        if channel.readyState == "open":
            self._on_open()

    def _on_open(self) -> None:
        if self._opened.is_set():
            return
        self._last_rx = time.monotonic()
        self._opened.set()
        self._settled.set()
        if not self.upstream:
            asyncio.ensure_future(self._heartbeat())

    async def _heartbeat(self) -> None:
        while not self._closed.is_set():
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)
            silent = time.monotonic() - self._last_rx
            if silent > PEER_TIMEOUT_S:
                self._mark_closed(f"peer {self.peer_id} stopped answering (silent for {silent:.0f} s)")
                await self._pc.close()
                return
            self._send_now(HEARTBEAT)

    def _send_now(self, data) -> None:
        """Send a small control frame at once, past the high-water mark (runs on the loop)."""
        try:
            if self._channel is not None and self._channel.readyState == "open":
                self._channel.send(data)
        except Exception as exc:  # aiortc raises several types from a channel that is closing; the frame is moot then
            log.debug("link %s: control frame not sent: %s", self.peer_id, exc)

    async def _send_async(self, data) -> None:
        while self._channel.bufferedAmount > SEND_HIGH_WATER:
            if self._closed.is_set():
                break
            self._low.clear()
            await self._low.wait()
        if self._closed.is_set() or self._channel.readyState != "open":
            raise LinkClosed(self.close_reason or "the link is closed") from self._close_cause
        self._channel.send(data)

    def _mark_closed(self, reason: str, cause: Optional[BaseException] = None) -> None:
        """Record why the link ended (first reason wins), and the exception that ended it if
        one did, and wake everything waiting on it."""
        with self._close_lock:
            if self._closed.is_set():
                return
            self.close_reason, self._close_cause = reason, cause
            self._closed.set()
            self._settled.set()
        self._raw.put(_CLOSED)
        self._loop.call_soon_threadsafe(self._low.set)
        self._files_out.lost(reason)

    # -- thread side --------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def wait_open(self, timeout: float) -> None:
        """Wait until the data channel is open; LinkClosed naming the topology when ICE
        found no path (as soon as it gives up, or at `timeout`)."""
        self._settled.wait(timeout)
        if self._opened.is_set():
            return
        if self._closed.is_set() and self.close_reason != ICE_FAILED:
            self.close()
            raise LinkClosed(f"the link to {self.peer_id} closed before it opened: {self.close_reason}") \
                from self._close_cause
        waited = "" if self.close_reason == ICE_FAILED else f" within {timeout:.0f} s"  # ICE gave up sooner
        self.close()
        raise LinkClosed(f"no WebRTC connection to {self.peer_id}{waited}: "
                         f"{no_route_advice(*self.candidates, self.peer_id, self.ice_servers)}")

    def route(self) -> Optional[str]:
        """The candidate pair ICE chose, as "host|srflx|relay <-> ..." (this side first),
        or None when unknown. aiortc keeps no public accessor: read from its ICE agent."""
        async def nominated() -> Optional[str]:
            pair = self._pc.sctp.transport.transport._connection._nominated.get(1)
            return f"{pair.local_candidate.type} <-> {pair.remote_candidate.type}" if pair else None

        try:
            return on_loop(nominated(), timeout=5)
        except Exception:  # a diagnostic: an aiortc without these attributes only loses this line
            return None

    def raise_if_closed(self) -> None:
        """LinkClosed, from the exception that closed the link if one did, once it is closed."""
        if self._closed.is_set():
            raise LinkClosed(self.close_reason) from self._close_cause

    def _send(self, data, timeout: float = 120.0) -> None:
        self.raise_if_closed()
        future = asyncio.run_coroutine_threadsafe(self._send_async(data), self._loop)
        try:
            future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise LinkClosed(f"sending to {self.peer_id} stalled for {timeout:.0f} s") from None

    def send(self, name: str, payload: Optional[dict] = None) -> None:
        """Send one text message; blocks while the link is congested; raises LinkClosed."""
        self._send(encode(name, payload))

    def send_raw(self, data) -> None:
        """Send a frame as it is (text or bytes): the upstream dialect's way to write."""
        self._send(data)

    def drain(self, timeout: float) -> None:
        """Wait until what was sent has left the data channel's queue (or `timeout` passed)."""
        async def buffered() -> int:
            return self._channel.bufferedAmount if self._channel is not None else 0

        deadline = time.monotonic() + timeout
        while not self._closed.is_set() and time.monotonic() < deadline:
            if on_loop(buffered(), timeout=5) == 0:
                return
            time.sleep(0.05)

    def wake(self) -> None:
        """Make one waiting (or the next) `recv` return None at once: how its owner asks its
        reader to look at a stop flag."""
        self.inbox.put(_WAKE)

    def recv(self, timeout: Optional[float] = None) -> Optional[Received]:
        """The next inbox item (see Received); None on timeout or `wake`; LinkClosed at the end."""
        try:
            item = self.inbox.get(timeout=timeout)
        except queue.Empty:
            return None
        if item is _WAKE:
            return None
        if item is _CLOSED:
            self.inbox.put(_CLOSED)  # every later recv raises too
            raise LinkClosed(self.close_reason) from self._close_cause
        return item

    def expect(self, accept: Callable[[Received], bool], timeout: Optional[float], what: str,
               on_other: Optional[Callable[[Received], None]] = None) -> Received:
        """The next inbox item that `accept` takes; the others go to `on_other` (or are dropped).

        Raises LinkClosed when the link ends, PeerError when the peer sends ERROR, and
        LinkTimeout when nothing at all (not even file bytes) arrived for `timeout` seconds.
        With timeout None it waits as long as the link lives; a silent peer still ends the
        link within PEER_TIMEOUT_S.
        """
        quiet_since = time.monotonic()
        while True:
            item = self.recv(timeout=None if timeout is None else max(0.0, quiet_since + timeout - time.monotonic()))
            if item is None and timeout is None:  # woken: waiting on
                continue
            if item is None:  # file bytes may have arrived meanwhile: they count as an answer
                quiet_since = max(quiet_since, self.last_activity)
                if time.monotonic() - quiet_since > timeout:
                    raise LinkTimeout(f"no {what} from {self.peer_id} within {timeout:.0f} s")
                continue
            quiet_since = time.monotonic()
            if isinstance(item, Message) and item.name == LINK_ERROR:
                raise PeerError(f"{self.peer_id}: {item.payload.get('message')}")
            if accept(item):
                return item
            if on_other is not None:
                on_other(item)

    def send_file(self, path: Path, name: Optional[str] = None,
                  progress: Optional[Callable[[int, int], None]] = None, store: bool = False, offset: int = 0,
                  digest: Optional[tuple[int, str]] = None, exact: bool = False) -> dict:
        """Send a file and wait until the receiver checked size and SHA-256 (FileSender.send)."""
        return self._files_out.send(path, name, progress, store, offset, digest, exact)

    def close(self, timeout: float = CLOSE_ACK_TIMEOUT_S) -> None:
        """Close after the peer acknowledged everything sent so far (or after `timeout`)."""
        if not self._closed.is_set() and self._opened.is_set() and not self.upstream:
            try:
                self._send(BYE, timeout=timeout)
                self._bye_acked.wait(timeout)
            except LinkClosed:
                pass
        self._mark_closed("closed by this side")
        try:
            on_loop(self._pc.close(), timeout=5)
        except Exception as exc:  # closing a connection that failed may raise anything aiortc raises; it is closed
            log.debug("link %s: close: %s", self.peer_id, exc)
        if self._rx_thread is not threading.current_thread():
            self._rx_thread.join(timeout=5)

    def _rx_loop(self) -> None:
        try:
            self._receive_forever()
        except Exception as exc:  # a bug must not leave the link looking open with nobody reading it
            log.exception("link %s: the receive thread failed", self.peer_id)
            self._mark_closed("the receive thread failed; see the log", exc)
            self.inbox.put(_CLOSED)

    def _receive_forever(self) -> None:
        while True:
            item = self._raw.get()
            self.last_activity = time.monotonic()
            if item is _CLOSED:
                self.incoming.lost(self.close_reason)
                self.inbox.put(_CLOSED)
                return
            if self.upstream:
                if isinstance(item, str):
                    self.inbox.put(item)
                else:
                    log.info("link %s: a %d-byte binary frame dropped (a sleap-rtc 0.0.7 client uploads "
                             "nothing to this worker)", self.peer_id, len(item))
                continue
            if isinstance(item, bytes):
                self.incoming.chunk(item)
                continue
            try:
                message = decode(item)
            except ProtocolError as exc:
                self.incoming.reply_error(f"malformed message: {exc}")
                continue
            self._handlers.get(message.name, self.inbox.put)(message)

    def _direct_receiver(self, incoming: Incoming, offer: dict, on_data: Callable[[], None],
                         on_failed: Callable[[str], None]) -> _DirectReceiver:
        """Transfers' way to open a direct path for `incoming`: its bytes count as activity on the link."""
        def data() -> None:
            self.last_activity = time.monotonic()
            on_data()

        return _DirectReceiver(self.peer_id, incoming, offer, self.remote_addresses, data, on_failed)

    def _send_control(self, name: str, payload: dict) -> None:
        """Queue a small reply on the loop without waiting: the receive thread never blocks
        on a congested peer."""
        if not self._closed.is_set():
            self._loop.call_soon_threadsafe(self._send_now, encode(name, payload))



def _new_link(peer_id: str, ice_servers: list[dict], receive_dir: Optional[Path], store=None) -> Link:
    from aiortc import RTCPeerConnection

    configuration = _rtc_configuration(ice_servers)  # may probe the network: not on the loop

    async def make() -> Link:
        # Handlers are registered here, on the loop, like every other touch of an aiortc object.
        pc = RTCPeerConnection(configuration)
        link = Link(peer_id, pc, receive_dir, store)
        link.ice_servers = ice_servers

        @pc.on("connectionstatechange")
        def _on_state():
            if pc.connectionState in ("failed", "closed"):
                link._mark_closed(ICE_FAILED if pc.connectionState == "failed" else "WebRTC connection closed")

        return link

    return on_loop(make(), timeout=10)


def open_link(signaling: SignalingClient, target: str, receive_dir: Path,
              timeout: float = LINK_OPEN_TIMEOUT_S, label: str = "sleap-rtc") -> Link:
    """Offer a link to `target` through the signaling server and wait until it is open.
    (An UPSTREAM_CHANNEL_LABELS `label` speaks as a sleap-rtc 0.0.7 client would.)"""
    from aiortc import RTCSessionDescription

    link = _new_link(target, signaling.ice_servers, receive_dir)

    async def offer() -> str:
        link._attach(link._pc.createDataChannel(label))
        await link._pc.setLocalDescription(await link._pc.createOffer())
        return link._pc.localDescription.sdp

    sdp = on_loop(offer(), timeout=timeout)
    signaling.send(sdp_frame(OFFER, signaling.peer_id, target, sdp))

    def is_answer(f: dict) -> bool:
        return (f.get("type") == ANSWER and f.get("sender") == target) or (
            f.get("type") == ERROR and f.get("in_reply_to") == OFFER)

    reply = signaling.next(is_answer, timeout)
    if reply is None or reply["type"] == ERROR:
        link.close()
        why = f"{reply['code']}: {reply['message']}" if reply else f"no answer within {timeout:.0f} s"
        gone = reply is not None and reply.get("code") == PEER_NOT_FOUND
        raise (PeerGone if gone else LinkClosed)(f"could not open a link to {target}: {why}")
    link.remote_addresses = sdp_addresses(reply["sdp"])
    link.candidates = (candidate_types(sdp), candidate_types(reply["sdp"]))
    on_loop(link._pc.setRemoteDescription(RTCSessionDescription(sdp=reply["sdp"], type="answer")), timeout)
    link.wait_open(timeout)
    return link


def accept_link(signaling: SignalingClient, offer_frame: dict, receive_dir: Optional[Path], store=None,
                timeout: float = LINK_OPEN_TIMEOUT_S) -> Link:
    """Answer an offer frame and wait until the peer's data channel is open. Files the
    peer sends go to `receive_dir` (None: refused) or, announced for the store, to `store`."""
    from aiortc import RTCSessionDescription

    peer = offer_frame["sender"]
    link = _new_link(peer, signaling.ice_servers, receive_dir, store)
    link.remote_addresses = sdp_addresses(offer_frame["sdp"])

    async def answer() -> str:
        link._pc.on("datachannel", link._attach)
        await link._pc.setRemoteDescription(RTCSessionDescription(sdp=offer_frame["sdp"], type="offer"))
        await link._pc.setLocalDescription(await link._pc.createAnswer())
        return link._pc.localDescription.sdp

    try:
        sdp = on_loop(answer(), timeout=timeout)
    except Exception as exc:
        link.close()
        raise LinkClosed(f"bad offer from {peer}: {exc}") from None
    link.candidates = (candidate_types(sdp), candidate_types(offer_frame["sdp"]))
    signaling.send(sdp_frame(ANSWER, signaling.peer_id, peer, sdp))
    link.wait_open(timeout)
    return link
