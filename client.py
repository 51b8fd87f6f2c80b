"""The sleap-rtc client: the researcher's command line.

    python client.py login
    python client.py rooms create
    python client.py workers  [--min-gpu-memory MB]
    python client.py ping     [--worker-id W] [--count N]
    python client.py upload   FILE [--worker-id W]
    python client.py download PATH [--worker-id W] [--download DIR]

Every command takes --server, --room and --token, or the environment variables
SLEAP_RTC_SERVER, SLEAP_RTC_ROOM and SLEAP_RTC_TOKEN. Needs only this file, protocol.py
and the transport dependencies (no torch, no sleap-nn).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import protocol as P

# ---------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------

CLIENT_ROLE = "client"
CREDENTIALS_FILE = Path("~/.sleap-rtc/credentials.json")


class UsageError(P.SleapRTCError):
    """The command line is missing something; the text says what."""


# ---------------------------------------------------------------------------------------
# Terminal output
# ---------------------------------------------------------------------------------------


class Progress:
    """One status line on stderr: redrawn in place on a terminal, every 10% otherwise."""

    def __init__(self, label: str):
        self.label = label
        self.tty = sys.stderr.isatty()
        self.started = time.monotonic()
        self.last_decile = -1

    def __call__(self, done: int, total: int) -> None:
        percent = 100.0 * done / total if total else 100.0
        rate = done / max(1e-6, time.monotonic() - self.started) / 1e6
        line = f"{self.label}: {percent:5.1f}%  {done / 1e6:.1f}/{total / 1e6:.1f} MB  {rate:.1f} MB/s"
        if self.tty:
            sys.stderr.write("\r" + line)
            if done >= total:
                sys.stderr.write("\n")
        elif int(percent // 10) > self.last_decile:
            self.last_decile = int(percent // 10)
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


def print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for row in [header] + rows:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())


# ---------------------------------------------------------------------------------------
# Connections
# ---------------------------------------------------------------------------------------


def load_credentials() -> dict:
    path = CREDENTIALS_FILE.expanduser()
    return json.loads(path.read_text()) if path.exists() else {}


def save_credentials(credentials: dict) -> Path:
    path = CREDENTIALS_FILE.expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(credentials, f, indent=2)
    return path


def connect(args) -> P.SignalingClient:
    """Register in the room as a fresh client peer."""
    if not args.room or not args.token:
        raise UsageError(f"say which room: --room R --token T (or set {P.ENV_ROOM} and {P.ENV_TOKEN}); "
                         "`python client.py rooms create` makes one")
    signaling = P.SignalingClient(args.server, args.room, args.token, f"client-{secrets.token_hex(4)}",
                                  CLIENT_ROLE, {"tags": ["sleap-rtc"], "properties": {}})
    signaling.connect()
    return signaling


def find_workers(signaling: P.SignalingClient, min_gpu_memory: int = 0) -> list[dict]:
    properties = {"gpu_memory_mb": {"$gte": min_gpu_memory}} if min_gpu_memory else None
    return signaling.discover(role="worker", properties=properties)


def choose_worker(signaling: P.SignalingClient, worker_id: Optional[str]) -> str:
    """`worker_id` when it is in the room, else the first available worker."""
    workers = find_workers(signaling)
    if worker_id:
        if not any(w["peer_id"] == worker_id for w in workers):
            known = ", ".join(w["peer_id"] for w in workers) or "none"
            raise UsageError(f"worker {worker_id} is not in room {signaling.room_id} (workers there: {known})")
        return worker_id
    available = [w for w in workers if w["metadata"].get("properties", {}).get("status") == "available"]
    if not available:
        raise UsageError(f"no available worker in room {signaling.room_id} "
                         f"({len(workers)} worker(s) there); start one with `python worker.py`")
    return sorted(available, key=lambda w: w["peer_id"])[0]["peer_id"]


def with_link(args, work: Callable[[P.Link], int], receive_dir: Path = Path(".")) -> int:
    """Open a link to the chosen worker, run `work(link)`, then close everything."""
    signaling = connect(args)
    link = None
    try:
        worker_id = choose_worker(signaling, args.worker_id)
        link = P.open_link(signaling, worker_id, receive_dir)
        return work(link)
    finally:
        if link is not None:
            link.close()
        signaling.close()


# ---------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------


def cmd_login(args) -> int:
    base = P.http_base_url(args.server, args.http)
    status, body = P.http_call("POST", base + "/anonymous-signin", {})
    if status != 200:
        raise P.SignalingError(P.INVALID_TOKEN, f"sign-in at {base} failed: {body.get('error', status)}")
    credentials = load_credentials()
    credentials[base] = {"id_token": body["id_token"], "username": body["username"]}
    path = save_credentials(credentials)
    print(f"signed in as {body['username']} at {base}; id token saved in {path}")
    return 0


def cmd_rooms_create(args) -> int:
    base = P.http_base_url(args.server, args.http)
    saved = load_credentials().get(base, {}).get("id_token")
    room = P.create_room(base, saved)
    print(f"room:  {room['room_id']}\ntoken: {room['token']}\n\n"
          f"export {P.ENV_SERVER}={args.server}\nexport {P.ENV_ROOM}={room['room_id']}\n"
          f"export {P.ENV_TOKEN}={room['token']}")
    return 0


def cmd_workers(args) -> int:
    signaling = connect(args)
    try:
        workers = find_workers(signaling, args.min_gpu_memory)
    finally:
        signaling.close()
    if not workers:
        wanted = f" with >= {args.min_gpu_memory} MB GPU memory" if args.min_gpu_memory else ""
        print(f"no workers{wanted} in room {args.room}")
        return 1
    rows = []
    for w in sorted(workers, key=lambda w: w["peer_id"]):
        p = w["metadata"].get("properties", {})
        rows.append([w["peer_id"], p.get("worker_name", ""), p.get("status", "?"), p.get("gpu_model", "?"),
                     f"{p.get('gpu_memory_mb', 0)} MB", str(p.get("queue_length", 0))])
    print_table(rows, ["ID", "NAME", "STATUS", "GPU", "MEMORY", "QUEUE"])
    return 0


def cmd_ping(args) -> int:
    def work(link: P.Link) -> int:
        rtts = []
        for seq in range(args.count):
            sent = time.monotonic()
            link.send(P.LINK_PING, {"seq": seq})
            reply = _wait_for(link, lambda m: m.name == P.LINK_PONG and m.payload.get("seq") == seq, 10)
            if reply is None:
                print(f"ping {seq}: no answer within 10 s", file=sys.stderr)
                return 1
            rtts.append((time.monotonic() - sent) * 1000)
            print(f"pong from {link.peer_id}: seq={seq} rtt={rtts[-1]:.2f} ms", flush=True)
            if seq + 1 < args.count:
                time.sleep(args.interval)
        print(f"{len(rtts)} pings over WebRTC: median rtt {statistics.median(rtts):.2f} ms")
        return 0

    return with_link(args, work)


def cmd_upload(args) -> int:
    path = Path(args.file)
    if not path.is_file():
        raise UsageError(f"{path} is not a file")

    def work(link: P.Link) -> int:
        ack = link.send_file(path, progress=Progress(f"upload {path.name}"))
        print(f"uploaded {path.name} to {link.peer_id}: saved as {ack.get('saved_as')} in its uploads directory")
        return 0

    return with_link(args, work)


def cmd_download(args) -> int:
    target = Path(args.download)
    target.mkdir(parents=True, exist_ok=True)

    def work(link: P.Link) -> int:
        link.on_receive_progress = lambda name, done, total: progress(done, total)
        progress = Progress(f"download {Path(args.path).name}")
        link.send(P.FILE_REQUEST, {"path": args.path})
        item = _wait_for(link, lambda m: True, None)
        if isinstance(item, P.FileReceived):
            print(f"downloaded {item.path} ({item.size} bytes, sha256 {item.sha256})")
            return 0
        if isinstance(item, P.TransferFailed):
            print(f"error: download failed: {item.error}", file=sys.stderr)
        else:
            print(f"error: {item.payload.get('message')}", file=sys.stderr)
        return 1

    return with_link(args, work, receive_dir=target)


def _wait_for(link: P.Link, accept: Callable, timeout: Optional[float]):
    """The next inbox item that `accept` takes (messages), or any file event; None on timeout."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while deadline is None or time.monotonic() < deadline:
        item = link.recv(timeout=0.5)
        if item is None:
            continue
        if isinstance(item, (P.FileReceived, P.TransferFailed)) or item.name == P.LINK_ERROR or accept(item):
            return item
    return None


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--server", default=os.environ.get(P.ENV_SERVER, P.DEFAULT_SERVER_URL),
                        help=f"signaling server URL (env {P.ENV_SERVER}, default {P.DEFAULT_SERVER_URL})")
    common.add_argument("--http", default=os.environ.get(P.ENV_HTTP),
                        help=f"HTTP API port or URL (env {P.ENV_HTTP}; default port {P.DEFAULT_HTTP_PORT})")
    common.add_argument("--room", default=os.environ.get(P.ENV_ROOM), help=f"room id (env {P.ENV_ROOM})")
    common.add_argument("--token", default=os.environ.get(P.ENV_TOKEN), help=f"room token (env {P.ENV_TOKEN})")
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    worker_choice = argparse.ArgumentParser(add_help=False)
    worker_choice.add_argument("--worker-id", help="the worker's peer id (default: the first available worker)")

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("login", parents=[common], help="sign in anonymously and keep the id token")
    p.set_defaults(run=cmd_login)

    rooms = commands.add_parser("rooms", help="manage rooms")
    rooms_commands = rooms.add_subparsers(dest="rooms_command", required=True, metavar="ACTION")
    p = rooms_commands.add_parser("create", parents=[common], help="create a room and print its id and token")
    p.set_defaults(run=cmd_rooms_create)

    p = commands.add_parser("workers", parents=[common], help="list the workers in the room")
    p.add_argument("--min-gpu-memory", type=int, default=0, metavar="MB", help="only workers with this much")
    p.set_defaults(run=cmd_workers)

    p = commands.add_parser("ping", parents=[common, worker_choice], help="round trip over a WebRTC link")
    p.add_argument("--count", type=int, default=3, help="how many pings (default 3)")
    p.add_argument("--interval", type=float, default=0.2, help="seconds between pings (default 0.2)")
    p.set_defaults(run=cmd_ping)

    p = commands.add_parser("upload", parents=[common, worker_choice], help="send a file to the worker's uploads")
    p.add_argument("file", help="local file")
    p.set_defaults(run=cmd_upload)

    p = commands.add_parser("download", parents=[common, worker_choice], help="fetch a file from the worker")
    p.add_argument("path", help="path on the worker (inside its mounts or working dir)")
    p.add_argument("--download", default=".", metavar="DIR", help="local directory (default: current)")
    p.set_defaults(run=cmd_download)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s")
    try:
        return args.run(args)
    except P.SleapRTCError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
