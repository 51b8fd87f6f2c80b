"""The sleap-rtc worker: joins a room as a GPU worker and serves clients over WebRTC.

    python worker.py --room R --token T [--server URL] [--name N] [--mount PATH[:LABEL]]...
                     [--working-dir DIR] [--gpu N]

With no --server and nothing listening on ws://127.0.0.1:8080, the worker starts the
signaling server in-process (signaling.py beside this file), creates a room and prints
what a client needs. Needs only this file, protocol.py and their transport dependencies
next to an installed sleap-nn.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import protocol as P

log = logging.getLogger("sleap_rtc.worker")

# ---------------------------------------------------------------------------------------
# Constants and data model
# ---------------------------------------------------------------------------------------

WORKER_ROLE = "worker"
WORKER_TAGS = ["sleap-rtc", "training-worker", "inference-worker"]
DEFAULT_WORKING_DIR = "sleap-rtc-worker"
EMBEDDED_STATE_FILE = "signaling-state.json"
ROOM_ENV_FILE = "room.env"
UPLOADS_DIR = "uploads"


@dataclass(frozen=True)
class Mount:
    """A directory tree clients may name paths in; `label` is what discovery shows."""

    path: Path
    label: str

    def public(self) -> dict:
        return {"path": str(self.path), "label": self.label}


def parse_mount(text: str) -> Mount:
    """`PATH` or `PATH:LABEL`; the path must be an existing directory."""
    path, label = text.rsplit(":", 1) if ":" in text else (text, "")
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_dir():
        raise argparse.ArgumentTypeError(f"mount {path!r} is not an existing directory")
    return Mount(resolved, label or resolved.name or str(resolved))


def resolve_in_mounts(path: str, mounts: list[Mount]) -> Path:
    """The real path of `path` if it lies inside a mount (symlinks resolved); else PermissionError."""
    resolved = Path(path).expanduser().resolve()
    if not any(resolved == m.path or resolved.is_relative_to(m.path) for m in mounts):
        raise PermissionError(f"Access denied: {path} is outside the worker's mounts")
    return resolved


# ---------------------------------------------------------------------------------------
# What this machine offers
# ---------------------------------------------------------------------------------------


def gpu_facts(gpu_index: int) -> dict:
    """GPU memory, model and CUDA version: from torch, else nvidia-smi, else CPU fallbacks."""
    try:
        import torch

        if torch.cuda.is_available() and gpu_index < torch.cuda.device_count():
            props = torch.cuda.get_device_properties(gpu_index)
            return {"gpu_memory_mb": props.total_memory // 2**20, "gpu_model": props.name,
                    "cuda_version": torch.version.cuda or "N/A"}
    except Exception as exc:  # a broken CUDA install must not stop the worker
        log.info("torch did not report a GPU (%s)", exc)
    try:
        query = subprocess.run(
            ["nvidia-smi", f"--id={gpu_index}", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True)
        name, memory = [part.strip() for part in query.stdout.strip().splitlines()[0].split(",")]
        header = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=10).stdout
        cuda = re.search(r"CUDA Version:\s*([\d.]+)", header)
        return {"gpu_memory_mb": int(float(memory)), "gpu_model": name,
                "cuda_version": cuda.group(1) if cuda else "N/A"}
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return {"gpu_memory_mb": 0, "gpu_model": "CPU", "cuda_version": "N/A"}


def sleap_nn_version() -> str:
    try:
        return importlib.metadata.version("sleap-nn")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def worker_peer_id(working_dir: Path, name: str) -> str:
    """A peer id kept in the working directory, so a restarted worker is the same peer."""
    id_file = working_dir / "worker-id"
    if id_file.exists():
        return id_file.read_text().strip()
    safe = re.sub(r"[^A-Za-z0-9._-]", "-", name)[:60]
    peer_id = f"worker-{safe}-{secrets.token_hex(3)}"
    id_file.write_text(peer_id + "\n")
    return peer_id


# ---------------------------------------------------------------------------------------
# Embedded signaling server
# ---------------------------------------------------------------------------------------


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def start_embedded_server(working_dir: Path):
    """Start signaling.py's server in this process on the default local ports."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import signaling

    server = signaling.SignalingServer("127.0.0.1", P.DEFAULT_WS_PORT, P.DEFAULT_HTTP_PORT,
                                       state_file=working_dir / EMBEDDED_STATE_FILE)
    server.start()
    log.info("started the embedded signaling server: %s (HTTP %s)", server.ws_url, server.http_url)
    return server


def write_room_env(working_dir: Path, server_url: str, room_id: str, token: str) -> Path:
    """Write the variables a client needs (owner-readable only: the token is a secret)."""
    path = working_dir / ROOM_ENV_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"export {P.ENV_SERVER}={server_url}\nexport {P.ENV_ROOM}={room_id}\nexport {P.ENV_TOKEN}={token}\n")
    return path


# ---------------------------------------------------------------------------------------
# Sessions: one per client link
# ---------------------------------------------------------------------------------------


class Session:
    """One client's WebRTC link, served by the thread "session-PEER" until the link ends."""

    def __init__(self, worker: "Worker", offer: dict):
        self.worker = worker
        self.offer = offer
        self.peer_id = offer["sender"]
        self.link: Optional[P.Link] = None
        self.thread = threading.Thread(target=self._run, name=f"session-{self.peer_id}", daemon=True)

    def _run(self) -> None:
        try:
            self.link = P.accept_link(self.worker.signaling, self.offer, self.worker.uploads_dir)
        except (P.SleapRTCError, OSError) as exc:
            log.warning("link with %s failed to open: %s", self.peer_id, exc)
            self.worker.session_ended(self)
            return
        log.info("link open with %s", self.peer_id)
        try:
            while not self.worker.stopping.is_set():
                item = self.link.recv(timeout=0.5)
                if item is not None:
                    self._handle(item)
        except P.LinkClosed as exc:
            log.info("link with %s ended: %s", self.peer_id, exc)
        finally:
            self.link.close()
            self.worker.session_ended(self)

    def _handle(self, item) -> None:
        if isinstance(item, P.FileReceived):
            log.info("received %s from %s (%d bytes, sha256 %s)", item.path, self.peer_id, item.size, item.sha256[:12])
        elif isinstance(item, P.TransferFailed):
            log.warning("upload from %s failed: %s", self.peer_id, item.error)
        elif item.name == P.LINK_PING:
            self.link.send(P.LINK_PONG, item.payload)
        elif item.name == P.FILE_REQUEST:
            self._send_requested_file(item.payload)
        elif item.name == P.LINK_ERROR:
            log.warning("%s reports: %s", self.peer_id, item.payload.get("message"))
        else:
            self.link.send(P.LINK_ERROR, {"message": f"this worker does not understand {item.name}"})

    def _send_requested_file(self, payload: dict) -> None:
        requested = str(payload.get("path", ""))
        try:
            path = resolve_in_mounts(requested, self.worker.readable_mounts)
            if not path.is_file():
                raise FileNotFoundError(f"{requested} is not a file on the worker")
        except (PermissionError, FileNotFoundError) as exc:
            self.link.send(P.LINK_ERROR, {"message": str(exc), "path": requested})
            return
        try:
            self.link.send_file(path)
            log.info("sent %s to %s", path, self.peer_id)
        except P.TransferError as exc:
            log.warning("sending %s to %s failed: %s", path, self.peer_id, exc)


# ---------------------------------------------------------------------------------------
# The worker
# ---------------------------------------------------------------------------------------


class Worker:
    """Registers in a room and answers offers; owns its sessions and the embedded server.

    The main thread runs `serve()` until `stop()`; each session has its own thread.
    """

    def __init__(self, server_url: str, room_id: str, token: str, working_dir: Path, name: str,
                 mounts: list[Mount], gpu_index: int, embedded=None):
        self.server_url = server_url
        self.room_id = room_id
        self.working_dir = working_dir
        self.name = name
        self.mounts = mounts
        self.readable_mounts = mounts + [Mount(working_dir, "working-dir")]
        self.uploads_dir = working_dir / UPLOADS_DIR
        self.embedded = embedded
        self.peer_id = worker_peer_id(working_dir, name)
        self.stopping = threading.Event()
        # Guards sessions, the live client links by peer id.
        self._sessions_lock = threading.Lock()
        self.sessions: dict[str, Session] = {}
        self.metadata = {
            "tags": list(WORKER_TAGS),
            "properties": {
                **gpu_facts(gpu_index),
                "sleap_nn_version": sleap_nn_version(),
                "hostname": socket.gethostname(),
                "worker_name": name,
                "status": "available",
                "max_concurrent_jobs": 1,
                "queue_length": 0,
                "supported_job_types": ["training", "inference"],
                "mounts": [m.public() for m in mounts],
            },
        }
        self.signaling = P.SignalingClient(server_url, room_id, token, self.peer_id, WORKER_ROLE, self.metadata)

    def serve(self) -> None:
        self.signaling.connect()
        props = self.metadata["properties"]
        print(f"worker: registered as {self.peer_id} in room {self.room_id} "
              f"({props['gpu_model']}, {props['gpu_memory_mb']} MB)", flush=True)
        while not self.stopping.is_set():
            frame = self.signaling.next(timeout=0.5)
            if frame is None:
                continue
            kind = frame.get("type")
            if kind == P.OFFER:
                self._start_session(frame)
            elif kind == P.PEER_LEFT:
                log.info("peer %s left the room", frame.get("peer_id"))
            elif kind == P.ERROR:
                log.warning("signaling error: %s %s", frame.get("code"), frame.get("message"))

    def _start_session(self, offer: dict) -> None:
        session = Session(self, offer)
        with self._sessions_lock:
            previous = self.sessions.get(session.peer_id)
            self.sessions[session.peer_id] = session
        if previous is not None and previous.link is not None:
            previous.link.close()  # the client reconnected; its old link is stale
        session.thread.start()

    def session_ended(self, session: Session) -> None:
        with self._sessions_lock:
            if self.sessions.get(session.peer_id) is session:
                del self.sessions[session.peer_id]

    def stop(self) -> None:
        """Close every link, deregister, stop the embedded server; joins session threads."""
        self.stopping.set()
        with self._sessions_lock:
            sessions = list(self.sessions.values())
        for session in sessions:
            session.thread.join(timeout=P.CLOSE_ACK_TIMEOUT_S + 5)
        self.signaling.close()
        if self.embedded is not None:
            self.embedded.stop()


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", default=os.environ.get(P.ENV_SERVER),
                        help=f"signaling server URL (env {P.ENV_SERVER}); default: {P.DEFAULT_SERVER_URL}, "
                             "started in-process when nothing listens there")
    parser.add_argument("--http", default=os.environ.get(P.ENV_HTTP),
                        help=f"HTTP API port or URL of the signaling server (env {P.ENV_HTTP}; default port "
                             f"{P.DEFAULT_HTTP_PORT} on the server's host)")
    parser.add_argument("--room", default=os.environ.get(P.ENV_ROOM), help=f"room id (env {P.ENV_ROOM})")
    parser.add_argument("--token", default=os.environ.get(P.ENV_TOKEN), help=f"room token (env {P.ENV_TOKEN})")
    parser.add_argument("--name", default=socket.gethostname(), help="a readable worker name (default: hostname)")
    parser.add_argument("--mount", action="append", type=parse_mount, default=[], metavar="PATH[:LABEL]",
                        help="a directory clients may name paths in (repeatable; default: the working dir)")
    parser.add_argument("--working-dir", type=Path, default=Path(DEFAULT_WORKING_DIR),
                        help=f"where jobs, logs and uploads live (default ./{DEFAULT_WORKING_DIR})")
    parser.add_argument("--gpu", type=int, default=0, help="GPU index to use and report (default 0)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout)
    working_dir = args.working_dir.expanduser().resolve()
    working_dir.mkdir(parents=True, exist_ok=True)
    mounts = args.mount or [Mount(working_dir, "working-dir")]

    embedded = None
    server_url = args.server or P.DEFAULT_SERVER_URL
    if not args.server and not _listening("127.0.0.1", P.DEFAULT_WS_PORT):
        try:
            embedded = start_embedded_server(working_dir)
        except OSError as exc:
            print(f"error: cannot start the embedded signaling server: {exc}", file=sys.stderr)
            return 1
    room_id, token = args.room, args.token
    if not room_id or not token:
        if not embedded and args.server:
            print(f"error: --room and --token are needed (or {P.ENV_ROOM} / {P.ENV_TOKEN}); "
                  "create a room with `python client.py rooms create`", file=sys.stderr)
            return 2
        room = P.create_room(P.http_base_url(server_url, args.http))
        room_id, token = room["room_id"], room["token"]
        env_file = write_room_env(working_dir, server_url, room_id, token)
        print(f"worker: created room {room_id}\n  token: {token}\n"
              f"  clients: source {env_file}  (or pass --room {room_id} --token {token})", flush=True)

    worker = Worker(server_url, room_id, token, working_dir, args.name, mounts, args.gpu, embedded)
    stop = lambda *_: worker.stopping.set()  # noqa: E731
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        worker.serve()
    except P.SignalingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        worker.stop()
        return 1
    worker.stop()
    print("worker: stopped", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
