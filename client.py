"""The sleap-rtc client: the researcher's command line.

    python client.py login    [--sleap-rtc-credentials]   (the latter: for sleap-rtc 0.0.7 installs)
    python client.py rooms create | rooms join ROOM --token T | rooms list | rooms delete ROOM
    python client.py workers  [--min-gpu-memory MB]
    python client.py ping     [--worker-id W] [--count N]
    python client.py doctor   [--worker-id W]     (why a worker cannot be reached from here)
    python client.py upload   FILE [--worker-id W]
    python client.py download PATH [--worker-id W] [--download DIR]
    python client.py ls       [PATH]          python client.py browse [PATH] [--filter GLOB]
    python client.py train    --config C.yaml [--labels L.slp] [--max-epochs N] ... [--upload] [--detach]
    python client.py train    --pkg-path PKG.zip | --worker-pkg-path PATH     (SLEAP training packages)
    python client.py track    --data-path V.mp4 --model-paths DIR ... [--detach]
    python client.py jobs     [--worker-id W] [--state S]
    python client.py status|logs [--follow]|fetch [--download DIR]|stop|cancel  JOB

A job goes to the worker that can start it soonest (--worker-id W to name one); paths
in a job are paths on the worker, or, with --upload, files here sent first. The worker keeps every job in its ledger, so a client
can leave (--detach, Ctrl+C, a closed laptop) and reattach later with the job id alone.

Every command takes --server, --room and --token (before or after the command, as with
git), or the environment variables SLEAP_RTC_SERVER, SLEAP_RTC_ROOM and SLEAP_RTC_TOKEN.
On first use the client signs in anonymously and keeps its id token in
~/.sleap-rtc/credentials.json: the jobs you submit are yours, and only you (or a worker's
admin) may stop, cancel or prune them. `workers`, `jobs`, `status` and `files ls` take
--json for scripts. Needs only this file, protocol.py and the transport dependencies
(no torch, no sleap-nn).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import secrets
import shlex
import signal
import socket
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import protocol as P

log = logging.getLogger("sleap_rtc.client")

# ---------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------

CLIENT_ROLE = "client"
# Shared with a sleap-rtc 0.0.7 install: our entries are keyed by server URL, its own
# (jwt, user, tokens, room_secrets, ...) by name, and each side keeps the other's.
CREDENTIALS_FILE = Path("~/.sleap-rtc/credentials.json")


class UsageError(P.SleapRTCError):
    """The command line is missing something; the text says what."""


# ---------------------------------------------------------------------------------------
# Terminal output
# ---------------------------------------------------------------------------------------


class Progress:
    """One status line on stderr: redrawn in place on a terminal, every 10% otherwise.
    The speed and ETA count only the bytes after `start` (where a resumed transfer began)."""

    def __init__(self, label: str, start: int = 0):
        self.label = label
        self.start = start
        self.tty = sys.stderr.isatty()
        self.started = time.monotonic()
        self.last_decile = -1

    def __call__(self, done: int, total: int) -> None:
        percent = 100.0 * done / total if total else 100.0
        rate = (done - self.start) / max(1e-6, time.monotonic() - self.started)
        eta = f"  ETA {(total - done) / rate:.0f} s" if rate > 0 and done < total else ""
        line = (f"{self.label}: {percent:5.1f}%  {done / 1e6:.1f}/{total / 1e6:.1f} MB  {rate / 1e6:.1f} MB/s"
                f"{eta}")
        if self.tty:
            sys.stderr.write("\r" + line)
            if done >= total:
                sys.stderr.write("\n")
        elif int(percent // 10) > self.last_decile:
            self.last_decile = int(percent // 10)
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


def transfer_note(size: int, seconds: float, via: str) -> str:
    """Which path a file's bytes took and how fast, e.g. "over direct TCP 10.0.0.5: 310.2 MB/s"."""
    return f"over {via}: {size / max(seconds, 1e-6) / 1e6:.1f} MB/s"


TABLE_CELL_CHARS = 100_000  # a ledger query's cell may hold a whole spec


def print_table(rows: list[list[str]], header: list[str]) -> None:
    """Rows under a header, in columns. Cells may be a peer's text: a character that does
    not print shows as '?', so none moves the cursor or rewrites the terminal."""
    shown = [[P.shown_text(str(cell), TABLE_CELL_CHARS) for cell in row] for row in [header] + rows]
    widths = [max(len(r[i]) for r in shown) for i in range(len(header))]
    for row in shown:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


# ---------------------------------------------------------------------------------------
# Connections
# ---------------------------------------------------------------------------------------


def load_credentials() -> dict:
    path = CREDENTIALS_FILE.expanduser()
    return json.loads(path.read_text()) if path.exists() else {}


def save_credentials(credentials: dict) -> Path:
    """Write the credentials file, readable by its owner only, whole or not at all."""
    path = CREDENTIALS_FILE.expanduser()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")  # two clients may write at once
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(credentials, f, indent=2)
    os.replace(tmp, path)
    return path


def signed_in(args, again: bool = False) -> Optional[str]:
    """This user's id token for the server, made on first use (an anonymous sign-in kept in
    the credentials file): the server tells workers who sent each job by it, and only its
    holder (or a worker's admin) may stop, cancel or prune that job later. `again` signs
    in anew (the server no longer knows the saved one). None when the HTTP API cannot be
    reached: the client goes on anonymously."""
    base = P.http_base_url(args.server, args.http)
    saved = load_credentials().get(base, {}).get("id_token")
    if saved and not again:
        return saved
    token: Optional[str] = None

    def sign_in(credentials: dict) -> None:  # under the file's lock: clients started together sign in as one
        nonlocal token
        current = credentials.get(base, {}).get("id_token")
        if current and current != saved:
            token = current  # another client just signed in
            return
        try:
            body = P.anonymous_sign_in(base)
        except P.SignalingError as exc:
            log.info("no sign-in at %s (%s); going on anonymously", base, exc)
            return
        credentials[base] = {**credentials.get(base, {}), "id_token": body["id_token"], "username": body["username"]}
        token = body["id_token"]

    update_credentials(sign_in)
    return token


def update_credentials(change: Callable[[dict], None]) -> Path:
    """Read, change and write the credentials file under its lock: clients started
    together each keep what the others wrote."""
    import fcntl

    path = CREDENTIALS_FILE.expanduser()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # guards the file's read-change-write against other clients
        credentials = load_credentials()
        change(credentials)
        return save_credentials(credentials)


def remember_room(args, room_id: str, token: str, created: bool) -> Path:
    """Keep a room's token for this server (what room.env holds), so `--room R` alone is
    enough later; the room joined or created last is the default."""
    base = P.http_base_url(args.server, args.http)

    def change(credentials: dict) -> None:
        entry = credentials.setdefault(base, {})
        entry.setdefault("rooms", {})[room_id] = {"token": token, "server": args.server, "created": created,
                                                  "since": time.time()}
        entry["default_room"] = room_id

    return update_credentials(change)


def known_room(args) -> tuple[Optional[str], Optional[str]]:
    """The room and token to use. A room typed on the command line takes its own token:
    typed, else the one kept for it on this server, else the environment's. With no room
    typed: the environment's room and token, else this server's default room (only when
    no token was typed either: a typed token belongs to a room the user means)."""
    kept = load_credentials().get(P.http_base_url(args.server, args.http), {})
    rooms = {room: entry for room, entry in kept.get("rooms", {}).items() if entry.get("server") == args.server}

    def kept_token(room: Optional[str]) -> Optional[str]:
        return rooms.get(room, {}).get("token")

    env_room, env_token = os.environ.get(P.ENV_ROOM), os.environ.get(P.ENV_TOKEN)
    if args.room:
        return args.room, args.token or kept_token(args.room) or env_token
    if env_room:
        return env_room, args.token or env_token or kept_token(env_room)
    if args.token:
        return None, args.token
    default = kept.get("default_room") if kept.get("default_room") in rooms else None
    return default, kept_token(default)


def connect(args) -> P.SignalingClient:
    """Register in the room as a fresh client peer, signed in as this user."""
    args.room, args.token = known_room(args)
    if not args.room or not args.token:
        raise UsageError(f"say which room: --room R --token T (or set {P.ENV_ROOM} and {P.ENV_TOKEN}); "
                         "`python client.py rooms create` makes one, `rooms join ROOM --token T` keeps one")

    def register(id_token: Optional[str]) -> P.SignalingClient:
        signaling = P.SignalingClient(args.server, args.room, args.token, f"client-{secrets.token_hex(4)}",
                                      CLIENT_ROLE, {"tags": ["sleap-rtc"], "properties": {}}, id_token=id_token)
        signaling.connect()
        return signaling

    try:
        return register(signed_in(args))
    except P.SignalingError as exc:
        if exc.code != P.INVALID_TOKEN or "id_token" not in exc.message:
            raise
        return register(signed_in(args, again=True))  # e.g. the server restarted without its state file


def discover_workers(signaling: P.SignalingClient, job_type: Optional[str] = None,
                     min_gpu_memory: int = 0) -> list[P.WorkerCard]:
    """The room's workers (for `job_type`, with at least `min_gpu_memory` MB). A server
    that cannot discover gives the worker named by SLEAP_RTC_WORKER_PEER_ID instead,
    marked "fallback"."""
    tags = [P.JOB_TYPE_TAGS[job_type]] if job_type in P.JOB_TYPE_TAGS else None
    properties = {"gpu_memory_mb": {"$gte": min_gpu_memory}} if min_gpu_memory else None
    try:
        return [P.WorkerCard.read(peer) for peer in signaling.discover(role="worker", tags=tags, properties=properties)]
    except P.SignalingError as exc:
        if exc.code not in (P.UNKNOWN_MESSAGE_TYPE, "TIMEOUT"):
            raise
        named = os.environ.get(P.ENV_WORKER_PEER_ID)
        if not named:
            raise P.NoWorkersAvailableError(
                f"the signaling server at {signaling.url} cannot discover workers ({exc.message}); "
                f"set {P.ENV_WORKER_PEER_ID} to the peer id the worker printed at start") from None
        return [P.WorkerCard(named, fallback=True)]


def choose_worker(signaling: P.SignalingClient, worker_id: Optional[str]) -> str:
    """`worker_id` when it is in the room, else a worker for a file transfer or ping: one
    that is available if there is one, else any (a transfer needs no free job slot)."""
    workers = discover_workers(signaling)
    if workers and workers[0].fallback:
        return workers[0].peer_id
    if worker_id:
        if not any(w.peer_id == worker_id for w in workers):
            known = ", ".join(w.peer_id for w in workers) or "none"
            raise UsageError(f"worker {worker_id} is not in room {signaling.room_id} (workers there: {known})")
        return worker_id
    if not workers:
        raise UsageError(f"no worker in room {signaling.room_id}; start one with `python worker.py`")
    return min(workers, key=lambda w: (w.status != P.AVAILABLE, w.peer_id)).peer_id


# How long a command that lost its link (a new network, a laptop that slept) keeps
# trying to get one back before it gives up.
RECONNECT_PATIENCE_S = 300.0
# A link that lived this long counts as having worked: losing it starts the patience anew.
LINK_LASTED_S = 30.0


def with_link(args, work: Callable[[P.Link], int], receive_dir: Path = Path("."), again: bool = False) -> int:
    """Open a link to the chosen worker, run `work(link)`, then close everything. With
    `again`, a lost link is opened again and `work` runs again (see with_link_again)."""
    signaling = connect(args)
    link = None
    try:
        worker_id = choose_worker(signaling, args.worker_id)
        link = P.open_link(signaling, worker_id, receive_dir)
        return work(link) if not again else with_link_again(args, worker_id, work, receive_dir, (signaling, link))
    finally:
        if link is not None:
            link.close()
        signaling.close()


def with_link_again(args, worker_id: str, work: Callable[[P.Link], int], receive_dir: Path,
                    first: tuple[P.SignalingClient, P.Link]) -> int:
    """Run `work` over `first`'s link; when that link or the signaling connection is lost,
    close both (the old connection may be dead without knowing it yet, or come back as a
    ghost), register again as a fresh peer, open a new link and run `work` again, which
    goes on from what it has. Gives up after RECONNECT_PATIENCE_S without a link that
    lasted LINK_LASTED_S, so a link that opens and dies at once cannot loop forever."""
    signaling, link = first
    lost_since: Optional[float] = None
    delay = 0.0  # the first try at once: it also tells a worker that is gone from one that is not
    while True:
        opened = time.monotonic()
        try:
            if link is None:
                signaling = connect(args)
                link = P.open_link(signaling, worker_id, receive_dir)
                opened = time.monotonic()
                print(f"connected to {worker_id} again", file=sys.stderr, flush=True)
            return work(link)
        except P.PeerGone as exc:  # the worker left the room (it stopped, or died): nothing to wait for
            raise P.PeerGone(f"{worker_id} has left the room ({exc}); when it is back, the same command "
                             "goes on from where this one stopped") from None
        except (P.LinkClosed, P.SignalingError, P.TransferError) as exc:
            lost = (isinstance(exc, P.LinkClosed) or (isinstance(exc, P.SignalingError) and exc.code == P.DISCONNECTED)
                    or (link is not None and link.closed))  # a transfer cut off by the link's end
            if not lost:
                raise
            now = time.monotonic()
            if link is not None and now - opened >= LINK_LASTED_S:
                lost_since, delay = now, 0.0  # it had worked for a while: patience starts again
            lost_since = lost_since or now
            if now - lost_since > RECONNECT_PATIENCE_S:
                raise
            P.forget_network()  # a new network may block what the old one let through
            print(f"lost the link to {worker_id} ({exc}); connecting again{f' in {delay:.0f} s' if delay else ''}",
                  file=sys.stderr, flush=True)
            if link is not None:
                link.close(timeout=1)
            signaling.close()
        finally:
            if link is not None and link is not first[1] and not link.closed:  # done: work returned or raised
                link.close()
            if signaling is not first[0]:
                signaling.close()
        link = None
        time.sleep(delay)
        delay = min(max(delay * 2, 1.0), 10.0)


# ---------------------------------------------------------------------------------------
# Choosing a worker for a job, and asking workers about jobs (peer messages via signaling)
# ---------------------------------------------------------------------------------------

ANSWER_TIMEOUT_S = 5.0  # how long workers have to answer a job_request or jobs_query
# How long a worker may stay quiet over the link before a request counts as unanswered
# (file bytes arriving count as an answer in progress).
REPLY_TIMEOUT_S = 30.0
SUMMARY_FIELDS = ("type", "config", "labels", "data_path", "max_epochs", "batch_size", "command")


def ask_workers(signaling: P.SignalingClient, worker_ids: list[str], payload: dict, reply_type: str,
                timeout: float = ANSWER_TIMEOUT_S,
                enough: Callable[[dict], bool] = lambda replies: False) -> dict[str, dict]:
    """Send `payload` to each worker and collect their `reply_type` answers (matched on
    request_id, else job_id) until all answered, `enough(replies)`, or `timeout`."""
    key = "request_id" if "request_id" in payload else "job_id"
    wanted = set(worker_ids)

    def is_answer(frame: dict) -> bool:
        body = frame.get("payload")
        return (frame.get("type") == P.PEER_MESSAGE and frame.get("from_peer_id") in wanted
                and isinstance(body, dict) and body.get(P.APP_MESSAGE_TYPE) == reply_type
                and body.get(key) == payload[key])

    for worker_id in worker_ids:
        signaling.send_to_peer(worker_id, payload)
    replies: dict[str, dict] = {}
    deadline = time.monotonic() + timeout
    while len(replies) < len(wanted) and not enough(replies):
        frame = signaling.next(is_answer, timeout=max(0.0, deadline - time.monotonic()))
        if frame is None:
            break
        replies[frame["from_peer_id"]] = frame["payload"]
    return replies


def rank_key(candidate: dict) -> tuple:
    """Can start now, then shortest queue, then most GPU memory; the peer id breaks ties."""
    position = candidate["response"].queue_position
    return (position > 0, position, -candidate["gpu_memory_mb"], candidate["peer_id"])


def choice_reason(ranked: list[dict]) -> str:
    best = ranked[0]
    if len(ranked) == 1:
        return "the only worker that accepted"
    first, second = rank_key(best), rank_key(ranked[1])
    if first[0] != second[0]:
        return "it can start now; the others would queue"
    if first[1] != second[1]:
        return f"shortest queue (position {first[1]})"
    if first[2] != second[2]:
        return f"most GPU memory ({best['gpu_memory_mb']} MB)"
    return "as good as the others; first by peer id"


def no_worker_fits(signaling: P.SignalingClient, wanted: str, min_gpu_memory: int) -> P.NoWorkersAvailableError:
    """The error for an empty discovery, saying what the room has instead."""
    room = signaling.room_id
    everyone = [P.WorkerCard.read(peer) for peer in signaling.discover(role="worker")]
    if not everyone:
        return P.NoWorkersAvailableError(f"no workers in room {room}; start one with "
                                         f"`python worker.py --room {room} --token ...`")
    described = ", ".join(f"{w.peer_id} ({_memory(w)})" for w in sorted(everyone, key=lambda w: w.peer_id))
    if min_gpu_memory:
        return P.NoWorkersAvailableError(
            f"no worker with >= {min_gpu_memory} MB GPU memory in room {room}; {len(everyone)} worker(s) "
            f"have less: {described}. Lower --min-gpu-memory or start a bigger worker.")
    offers: dict[str, list[str]] = {}
    for w in everyone:
        for kind in w.job_types:
            offers.setdefault(kind, []).append(w.peer_id)
    listed = "; ".join(f"{kind} ({', '.join(sorted(ids))})" for kind, ids in sorted(offers.items()))
    return P.NoWorkersAvailableError(f"no worker in room {room} offers {wanted}; the room offers: {listed}")


def negotiate(signaling: P.SignalingClient, job_id: str, spec: dict, worker_id: Optional[str],
              min_gpu_memory: int = 0) -> tuple[str, Optional[P.JobResponse]]:
    """Pick the worker for a job and assign it there: (worker id, its job_response; None
    for the worker named by SLEAP_RTC_WORKER_PEER_ID, which is not asked).

    Sends job_request to every fitting worker (or only `worker_id`), ranks those that
    accept with `rank_key`, prints the candidates and the choice, sends job_assignment.
    """
    wanted = P.capability(spec)
    workers = [w for w in discover_workers(signaling, spec["type"], min_gpu_memory)
               if w.fallback or wanted in w.job_types]
    if workers and workers[0].fallback:
        print(f"the server cannot discover workers; using {P.ENV_WORKER_PEER_ID}={workers[0].peer_id}",
              file=sys.stderr)
        return workers[0].peer_id, None
    if worker_id:
        named = [w for w in workers if w.peer_id == worker_id]
        if not named:
            fitting = ", ".join(sorted(w.peer_id for w in workers)) or "none"
            raise P.NoWorkersAvailableError(
                f"worker {worker_id} is not in room {signaling.room_id}, or cannot take {wanted} jobs"
                f"{f' with >= {min_gpu_memory} MB' if min_gpu_memory else ''} (workers that can: {fitting})")
        workers = named
    elif not workers:
        raise no_worker_fits(signaling, wanted, min_gpu_memory)
    request = P.app_job_request(job_id, spec, wanted, min_gpu_memory, {k: spec[k] for k in SUMMARY_FIELDS if k in spec})
    replies = ask_workers(signaling, [w.peer_id for w in workers], request, P.APP_JOB_RESPONSE)
    candidates, refusals = [], []
    print(f"candidates for job {job_id}:", file=sys.stderr)
    for w in sorted(workers, key=lambda w: w.peer_id):
        reply = P.JobResponse.read(replies[w.peer_id]) if w.peer_id in replies else None
        if reply is None:
            refusals.append(f"{w.peer_id}: no answer within {ANSWER_TIMEOUT_S:.0f} s")
            verdict = "no answer"
        elif not reply.accepted:
            refusals.append(f"{w.peer_id}: {reply.reason} ({reply.message})")
            verdict = f"refused: {reply.reason}"
        else:
            candidates.append({"peer_id": w.peer_id, "gpu_memory_mb": w.gpu_memory_mb or 0, "response": reply})
            position, start = reply.queue_position, reply.estimated_start_time_sec
            verdict = "can start now" if not position else \
                f"queue position {position}" + (f", starts in ~{start} s" if start is not None else "")
        print(f"  {w.peer_id}  {_memory(w)}  {verdict}", file=sys.stderr)
    if not candidates:
        raise P.NoWorkersAcceptedError(f"no worker accepted job {job_id}: " + "; ".join(refusals))
    ranked = sorted(candidates, key=rank_key)
    chosen = ranked[0]
    reason = "named with --worker-id" if worker_id else choice_reason(ranked)
    print(f"chose {chosen['peer_id']}: {reason}", file=sys.stderr)
    assignment = P.app_job_assignment(job_id)
    ask_workers(signaling, [chosen["peer_id"]], assignment, P.APP_JOB_ASSIGNED)
    return chosen["peer_id"], chosen["response"]


def locate_job(signaling: P.SignalingClient, job_id: str, worker_id: Optional[str] = None) -> tuple[str, dict]:
    """The worker holding `job_id` and the job's record: the worker named, else the one
    remembered here, else whichever worker in the room knows the job."""
    if not P.valid_job_id(job_id):
        raise UsageError(f"{job_id!r} is not a job id (letters, digits, '-' and '_')")
    first = worker_id or remembered_worker(job_id)
    query = P.app_jobs_query(secrets.token_hex(6), job_id=job_id)

    def record(reply: Optional[dict]) -> Optional[dict]:
        """The asked job's record in a worker's answer, if it holds one."""
        return next((j for j in P.JobsAnswer.read(reply or {}).jobs if j["job_id"] == job_id), None)

    if first:
        found = record(ask_workers(signaling, [first], query, P.APP_JOBS_LIST).get(first))
        if found:
            return first, found
        if worker_id:
            raise P.SleapRTCError(f"worker {worker_id} does not know job {job_id} (or did not answer)")
    workers = [w.peer_id for w in discover_workers(signaling)]
    replies = ask_workers(signaling, workers, query, P.APP_JOBS_LIST,
                          enough=lambda replies: any(record(r) for r in replies.values()))
    for holder, reply in replies.items():
        found = record(reply)
        if found:
            remember_job(job_id, holder, signaling.room_id)
            return holder, found
    silent = len(workers) - len(replies)
    raise P.SleapRTCError(f"no worker in room {signaling.room_id} knows job {job_id} (asked {len(workers)}"
                          f"{f', {silent} did not answer' if silent else ''})")


# ---------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------


def cmd_login(args) -> int:
    base = P.http_base_url(args.server, args.http)
    args.room, args.token = args.room or os.environ.get(P.ENV_ROOM), args.token or os.environ.get(P.ENV_TOKEN)
    body = P.anonymous_sign_in(base)

    def change(credentials: dict) -> None:
        # The rooms kept stay: their tokens let this sign-in in as well.
        credentials[base] = {**credentials.get(base, {}), "id_token": body["id_token"], "username": body["username"]}
        if args.sleap_rtc_credentials:
            add_upstream_credentials(credentials, args, base, body["id_token"], body["username"])

    path = update_credentials(change)
    credentials = load_credentials()
    print(f"signed in as {body['username']} at {base}; id token saved in {path}")
    if args.sleap_rtc_credentials:
        print(f"sleap-rtc 0.0.7 reads the same file; point it at this server:\n"
              f"  export SLEAP_RTC_SIGNALING_WS={args.server.rstrip('/')}\n  export SLEAP_RTC_SIGNALING_HTTP={base}")
        if args.room and args.token:
            print(f"joined room {args.room} as {body['username']}: sleap-rtc train --room {args.room} --worker-id W ...\n"
                  f"a sleap-rtc worker for the room: sleap-rtc worker --room {args.room} "
                  f"--account-key {credentials['tokens'][args.room]['api_key']}")
        else:
            print("no room joined (pass --room and --token to join one); or use the worker's --session-string")
    return 0


def add_upstream_credentials(credentials: dict, args, base: str, id_token: str, username: str) -> None:
    """Add what an unmodified sleap-rtc 0.0.7 install reads from the credentials file:
    the sign-in as its jwt and user and, with --room and --token, membership of the room
    (so that `--room R` alone lets it in), a worker key for `sleap-rtc worker` and the
    room secret its peer authentication uses."""
    try:
        import upstream  # the dialect's file, beside this one in a full checkout
    except ImportError:
        raise UsageError("--sleap-rtc-credentials needs upstream.py beside client.py (a full checkout)") from None

    credentials.update(jwt=id_token, user={"id": username, "username": username})
    if args.room and args.token:
        room = {"room_id": args.room, "token": args.token}
        status, joined = P.http_call("POST", base + "/join-room", room, bearer=id_token)
        if status != 200:
            raise P.SignalingError(P.INVALID_TOKEN, f"joining room {args.room} failed: {joined.get('error', status)}")
        status, issued = P.http_call("POST", base + "/create-api-key", room)
        if status != 200:
            raise P.SignalingError(P.INVALID_TOKEN, f"a worker key for room {args.room} was refused: "
                                   f"{issued.get('error', status)}")
        credentials["default_room"] = args.room
        credentials.setdefault("tokens", {})[args.room] = {"api_key": issued["api_key"], "worker_name": ""}
        credentials.setdefault("room_secrets", {})[args.room] = upstream.upstream_room_secret(args.token)


def cmd_rooms_create(args) -> int:
    base = P.http_base_url(args.server, args.http)
    room = P.create_room(base, signed_in(args))
    remember_room(args, room["room_id"], room["token"], created=True)
    print(f"room:  {room['room_id']}\ntoken: {room['token']}\n\n"
          f"export {P.ENV_SERVER}={args.server}\nexport {P.ENV_ROOM}={room['room_id']}\n"
          f"export {P.ENV_TOKEN}={room['token']}\n\n"
          "you created it: only you (this sign-in) may delete it, with `python client.py rooms delete ROOM`;\n"
          "it is kept in ~/.sleap-rtc/credentials.json: `--room ROOM` alone finds it, `rooms list` lists it")
    return 0


def cmd_rooms_join(args) -> int:
    """Check a room's token with the server and keep both, as room.env holds them."""
    args.token = args.token or os.environ.get(P.ENV_TOKEN)
    if not args.token:
        raise UsageError("rooms join ROOM needs the room's token: --token T (ask whoever created the room)")
    base = P.http_base_url(args.server, args.http)
    id_token = signed_in(args)
    status, body = P.http_call("POST", base + "/join-room", {"room_id": args.room_id, "token": args.token},
                               bearer=id_token)
    if status != 200:
        raise P.SignalingError(P.INVALID_TOKEN, f"joining room {args.room_id} failed: {body.get('error', status)}")
    path = remember_room(args, args.room_id, args.token, created=False)
    print(f"joined room {args.room_id}; its token is kept in {path}, and it is the default room for "
          f"{args.server}:\n  python client.py workers                 (this room)\n"
          f"  python client.py --room {args.room_id} ...   (when another room is the default)")
    return 0


def cmd_rooms_list(args) -> int:
    """The rooms this user created or joined on this server, with the workers in each now."""
    base = P.http_base_url(args.server, args.http)
    kept = load_credentials().get(base, {})
    kept_rooms, default = kept.get("rooms", {}), kept.get("default_room")
    status, body = P.http_call("POST", base + "/my-rooms", {}, bearer=signed_in(args))
    if status == 404:  # a server from before POST /my-rooms: the rooms kept here, without their workers
        print(f"note: {base} does not list rooms; these are the ones kept here", file=sys.stderr)
    elif status != 200:
        raise P.SignalingError(P.INVALID_TOKEN, f"the server did not list your rooms: {body.get('error', status)}")
    on_server = {room["room_id"]: room for room in body.get("rooms", [])} if status == 200 else {}
    rooms = []
    for room_id in sorted(set(on_server) | set(kept_rooms)):
        live, mine = on_server.get(room_id), kept_rooms.get(room_id, {})
        rooms.append({"room_id": room_id, "default": room_id == default,
                      "created": bool(live["created"] if live else mine.get("created")),
                      "token_kept": "token" in mine, "on_server": live is not None,
                      "workers": live["workers"] if live else [], "peers": live["peers"] if live else 0})
    if args.json:
        print_json({"server": args.server, "rooms": rooms})
        return 0
    if not rooms:
        print(f"no rooms of yours on {args.server}: `rooms create` makes one, `rooms join ROOM --token T` joins one")
        return 0
    rows = [[r["room_id"] + (" *" if r["default"] else ""), "created" if r["created"] else "joined",
             "yes" if r["token_kept"] else "no",
             (", ".join(w["peer_id"] for w in r["workers"]) or "none") if r["on_server"] else
             "(not on the server for this sign-in: deleted, or joined under another)"]
            for r in rooms]
    print_table(rows, ["ROOM", "YOU", "TOKEN KEPT", "WORKERS NOW"])
    if default:
        print("* the default room: commands without --room use it")
    return 0


def cmd_rooms_delete(args) -> int:
    base = P.http_base_url(args.server, args.http)
    body = P.delete_room(base, args.room_id, signed_in(args))

    def forget(credentials: dict) -> None:
        entry = credentials.get(base, {})
        entry.get("rooms", {}).pop(args.room_id, None)
        if entry.get("default_room") == args.room_id:
            entry.pop("default_room")

    update_credentials(forget)
    print(f"deleted room {args.room_id}; {len(body['deleted_peers'])} peer(s) were in it")
    return 0


# ---------------------------------------------------------------------------------------
# --json: one document per command, with the field names the README lists
# ---------------------------------------------------------------------------------------

# A job as `jobs --json` lists it, and the fields `status --json` gives (null when unknown).
JOB_JSON_FIELDS = ("job_id", "type", "state", "submitted_at", "duration_s")
STATUS_JSON_FIELDS = ("job_id", "type", "state", "queue_position", "submitted_at", "started_at", "finished_at",
                      "duration_s", "exit_code", "stopped_early", "outputs", "error", "warning", "stderr_tail",
                      "log_path", "pruned", "slurm")
UPLOAD_JSON_FIELDS = ("sha256", "size", "names", "uploaders", "last_use", "jobs", "needed", "partial")


def print_json(document: dict) -> None:
    print(json.dumps(document, indent=1))


def worker_json(worker: P.WorkerCard) -> dict:
    """A worker as `workers --json` gives it."""
    return {"peer_id": worker.peer_id, "name": worker.name, "status": worker.status, "gpu_model": worker.gpu_model,
            "gpu_memory_mb": worker.gpu_memory_mb, "queue_length": worker.queue_length,
            "executor": worker.executor, "job_types": list(worker.job_types), "refusing": worker.refusing}


def _memory(worker: P.WorkerCard) -> str:
    return f"{'?' if worker.gpu_memory_mb is None else worker.gpu_memory_mb} MB"


def picked(record: dict, fields: tuple[str, ...]) -> dict:
    return {field: record.get(field) for field in fields}


# ---------------------------------------------------------------------------------------
# Commands about workers and the way to them: workers, ping, doctor, upload, download
# ---------------------------------------------------------------------------------------


def cmd_workers(args) -> int:
    signaling = connect(args)
    try:
        workers = discover_workers(signaling, min_gpu_memory=args.min_gpu_memory)
    finally:
        signaling.close()
    if args.json:
        listed = sorted(workers, key=lambda w: w.peer_id)
        print_json({"room": args.room, "workers": [worker_json(w) for w in listed]})
        return 0 if workers else 1
    if not workers:
        wanted = f" with >= {args.min_gpu_memory} MB GPU memory" if args.min_gpu_memory else ""
        print(f"no workers{wanted} in room {args.room}")
        return 1
    rows = []
    listed = sorted(workers, key=lambda w: w.peer_id)
    for w in listed:
        runs_on = w.executor
        if runs_on == "slurm":
            runs_on += f" ({w.slurm_partition or '?'}, {w.max_concurrent_jobs or '?'} at once)"
        rows.append([w.peer_id, w.name or "", w.status or "?", w.gpu_model or "?", _memory(w), str(w.queue_length),
                     runs_on])
    print_table(rows, ["ID", "NAME", "STATUS", "GPU", "MEMORY", "QUEUE", "RUNS JOBS"])
    for w in listed:
        if w.refusing:
            print(f"{w.peer_id} takes no new jobs: {w.refusing}")
    return 0


def cmd_ping(args) -> int:
    def work(link: P.Link) -> int:
        rtts = []
        for seq in range(args.count):
            sent = time.monotonic()
            link.send(*P.link_ping(seq))
            link.expect(lambda m: _is(m, P.LINK_PONG) and m.payload.get("seq") == seq, REPLY_TIMEOUT_S, "pong")
            rtts.append((time.monotonic() - sent) * 1000)
            print(f"pong from {link.peer_id}: seq={seq} rtt={rtts[-1]:.2f} ms", flush=True)
            if seq + 1 < args.count:
                time.sleep(args.interval)
        print(f"{len(rtts)} pings over WebRTC: median rtt {statistics.median(rtts):.2f} ms")
        return 0

    return with_link(args, work)


def cmd_doctor(args) -> int:
    """Check, in order, what a link to a worker needs, and print a verdict per line. The
    exit code says whether a worker was reached (a network without UDP can still reach one)."""
    def row(check: str, verdict: str, detail: str) -> None:
        print(f"{check:<18} {verdict:<5} {detail}", flush=True)

    print(f"{'check':<18} {'':<5} result")
    began = time.monotonic()
    try:
        signaling = connect(args)
    except P.SleapRTCError as exc:
        row("signaling server", "FAIL", str(exc))
        return 1
    try:
        urls = P.ice_urls(signaling.ice_servers)
        row("signaling server", "ok", f"{args.server}: registered in room {args.room} in "
                                      f"{(time.monotonic() - began) * 1000:.0f} ms; hands out "
                                      f"{', '.join(u.url for u in urls) or 'no STUN or TURN server'}")
        _doctor_stun(urls, row)
        for transport in ("udp", "tcp"):
            _doctor_turn(urls, transport, row)
        return _doctor_worker(args, signaling, row)
    finally:
        signaling.close()


def nat_mapping(url: P.IceUrl,
                timeout: float = P.UDP_PROBE_TIMEOUT_S) -> tuple[Optional[tuple], Optional[tuple]]:
    """(the address a STUN server sees us at, the one its second address sees from the same
    local port), for telling NAT kinds apart (RFC 5780: the server names its second
    address in OTHER-ADDRESS; coturn does when it listens on two IPs). Either is None
    when unanswered or, for the second, when the server has no second address."""
    from aioice import stun

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("0.0.0.0", 0))
        request = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
        first = P.stun_answer(sock, request, (url.host, url.port), timeout)
        if first is None:
            return None, None
        other = first.attributes.get("OTHER-ADDRESS")
        if not other:
            return P.mapped_address(first), None
        second = P.stun_mapped_address(other[0], other[1], timeout, sock)
        return P.mapped_address(first), second


def turn_allocation(url: P.IceUrl, timeout: float = 5.0) -> tuple[Optional[tuple[str, int]], str]:
    """Ask a TURN server for a relay over `url`'s transport: (the relayed address, "") or
    (None, why not). The allocation is released at once."""
    from aioice import turn

    async def allocate():
        transport, _ = await asyncio.wait_for(turn.create_turn_endpoint(
            asyncio.DatagramProtocol, (url.host, url.port), url.username, url.credential,
            ssl=url.scheme == "turns", transport=url.transport), timeout)
        try:
            return transport.get_extra_info("sockname")
        finally:
            transport.close()

    try:
        relayed = P.on_loop(allocate(), timeout + 1)
    except (TimeoutError, asyncio.TimeoutError):
        return None, f"no answer within {timeout:.0f} s"
    except Exception as exc:  # aioice raises TransactionFailed (401, 437...), OSError and more: each a reason
        return None, str(exc) or type(exc).__name__
    return (relayed[0], relayed[1]), ""


def _doctor_stun(urls: list[P.IceUrl], row) -> None:
    stun = next((u for u in urls if u.scheme == "stun"), None)
    if stun is None:
        row("STUN", "warn", "none handed out: peers behind NAT learn no public address "
                            "(signaling.py --ice-server stun:HOST:3478)")
        return
    first, second = nat_mapping(stun)
    if first is None:
        row("STUN", "FAIL", f"no answer from {stun.host}:{stun.port} over UDP: this network blocks UDP "
                            "(or the server is down); only TURN over TCP can reach a worker from here")
        return
    row("STUN", "ok", f"{stun.host}:{stun.port} sees this machine at {first[0]}:{first[1]}")
    if second is None:
        row("NAT kind", "?", "the STUN server has no second address to compare with (coturn gives one "
                             "when it listens on two IPs)")
    elif second[1] == first[1] and second[0] == first[0]:
        row("NAT kind", "ok", f"keeps its port across destinations ({first[1]} to both): "
                              "a direct path can be punched")
    else:
        row("NAT kind", "warn", f"a new port for every destination ({first[1]}, then {second[1]}): "
                                "symmetric NAT; a worker behind one too is reachable only through TURN")


def _doctor_turn(urls: list[P.IceUrl], transport: str, row) -> None:
    check = f"TURN over {transport.upper()}"
    turn = next((u for u in urls if u.scheme in ("turn", "turns") and u.transport == transport), None)
    if turn is None:
        row(check, "warn", "none handed out" + (": a network without UDP cannot reach a worker behind NAT"
                                                if transport == "tcp" else ""))
        return
    relayed, why = turn_allocation(turn)
    if relayed is None:
        row(check, "FAIL", f"{turn.url}: no relay: {why}")
    else:
        row(check, "ok", f"{turn.url}: relay at {relayed[0]}:{relayed[1]}")


def _doctor_worker(args, signaling: P.SignalingClient, row) -> int:
    try:
        worker_id = choose_worker(signaling, args.worker_id)
    except UsageError as exc:
        row("worker", "FAIL", str(exc))
        return 1
    began = time.monotonic()
    try:
        link = P.open_link(signaling, worker_id, Path("."))
    except P.SleapRTCError as exc:
        row("worker", "FAIL", str(exc))
        return 1
    try:
        opened = time.monotonic() - began
        sent = time.monotonic()
        link.send(*P.link_ping(0))
        link.expect(lambda m: _is(m, P.LINK_PONG), REPLY_TIMEOUT_S, "pong")
        rtt = (time.monotonic() - sent) * 1000
        local, remote = link.candidates
        row("worker", "ok", f"{worker_id}: link open in {opened:.1f} s over {link.route() or 'a path'} "
                            f"(this machine offered {', '.join(local)}; the worker {', '.join(remote)}); "
                            f"ping {rtt:.1f} ms")
        return 0
    finally:
        link.close()


def send_content(link: P.Link, path: Path) -> str:
    """Put a local file into the worker's upload store; its path there.

    The worker is asked for the content's SHA-256 first: what it holds is not sent
    again, and an upload cut off earlier resumes from the bytes the worker kept."""
    size, sha256 = P.file_digest(path)
    link.send(*P.upload_query(sha256, size, path.name))
    reply = link.expect(lambda m: _is(m, P.UPLOAD_STATUS) and m.payload.get("sha256") == sha256, REPLY_TIMEOUT_S,
                        f"answer about {path.name}").payload
    if reply.get("error"):
        raise P.TransferError(f"{path.name}: {reply['error']}")
    if reply.get("have"):
        print(f"{path.name}: already on the worker (sha256 {sha256[:12]}); sent 0 bytes", file=sys.stderr)
        return reply["path"]
    offset = reply.get("offset") or 0
    if offset:
        print(f"{path.name}: the worker holds {offset} of {size} bytes from an earlier try; resuming",
              file=sys.stderr)
    started = time.monotonic()
    ack = link.send_file(path, progress=Progress(f"upload {path.name}", offset), store=True, offset=offset,
                         digest=(size, sha256))
    seconds = time.monotonic() - started
    print(f"{path.name}: sent {size - offset} bytes in {seconds:.1f} s "
          f"{transfer_note(size - offset, seconds, ack['via'])}, sha256 checked by the worker", file=sys.stderr)
    return ack["path"]


def cmd_upload(args) -> int:
    path = Path(args.file)
    if not path.is_file():
        raise UsageError(f"{path} is not a file")

    def work(link: P.Link) -> int:
        print(f"uploaded {path.name} to {link.peer_id}: {send_content(link, path)}")
        return 0

    return with_link(args, work, again=True)  # a lost link resumes from the bytes the worker kept


def cmd_download(args) -> int:
    target = Path(args.download)
    target.mkdir(parents=True, exist_ok=True)

    def work(link: P.Link) -> int:
        link.incoming.on_progress = Progress(f"download {Path(args.path).name}")
        link.send(*P.file_request(args.path))
        item = link.expect(lambda i: isinstance(i, (P.FileReceived, P.TransferFailed)), REPLY_TIMEOUT_S, "file")
        if isinstance(item, P.TransferFailed):
            print(f"error: download failed: {item.error}", file=sys.stderr)
            return 1
        print(f"downloaded {item.path} ({item.size} bytes, sha256 {item.sha256})")
        print(f"{item.name}: {transfer_note(item.size, item.seconds, item.via)}", file=sys.stderr)
        return 0

    return with_link(args, work, receive_dir=target)


def _is(item, name: str, job_id: Optional[str] = None) -> bool:
    """Whether an inbox item is the message `name` (of job `job_id`, when given)."""
    return (isinstance(item, P.Message) and item.name == name
            and (job_id is None or item.payload.get("job_id") == job_id))


# ---------------------------------------------------------------------------------------
# The worker's files: ls, browse, search
# ---------------------------------------------------------------------------------------

BROWSE_MAX_ENTRIES = 20_000  # a directory longer than this shows its first ones


def ask(link: P.Link, request: P.Outgoing, reply: str, what: str) -> dict:
    """Send a request over the link and wait for the reply that carries its request id."""
    request_id = secrets.token_hex(4)
    name, payload = request
    link.send(name, {**payload, "request_id": request_id})
    return link.expect(lambda m: _is(m, reply) and m.payload.get("request_id") == request_id, REPLY_TIMEOUT_S,
                       what).payload


def listing(link: P.Link, path: Optional[str], nearest: bool = False) -> dict:
    """A whole directory of the worker (every page, up to BROWSE_MAX_ENTRIES), or the mounts."""
    page = ask(link, P.fs_list(path, nearest=nearest), P.FS_LISTING, "listing")
    entries = list(page.get("entries", []))
    while not page.get("error") and page.get("entries") and len(entries) < min(page["total"], BROWSE_MAX_ENTRIES):
        page = ask(link, P.fs_list(page["path"], len(entries)), P.FS_LISTING, "listing")
        entries += page.get("entries", [])
    return {**page, "entries": entries}


def _size(size: Optional[int]) -> str:
    if size is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return "-"


def cmd_ls(args) -> int:
    def work(link: P.Link) -> int:
        offset, interactive = 0, sys.stdin.isatty() and sys.stdout.isatty()
        while True:
            page = ask(link, P.fs_list(args.path, offset), P.FS_LISTING, "listing")
            if page.get("error"):
                print(f"error: {page['error']}", file=sys.stderr)
                return 1
            if "mounts" in page:
                print_table([[m["path"], m["label"]] for m in page["mounts"]], ["MOUNT", "LABEL"])
                return 0
            if offset == 0:
                print(f"{page['path']}  ({page['total']} entries)")
            for entry in page["entries"]:
                folder = entry["kind"] == "dir"
                print(f"{'d' if folder else '-'}  {_when(entry['mtime'])}  {_size(entry['size']):>9}  "
                      f"{entry['name']}{'/' if folder else ''}")
            offset += len(page["entries"])
            if offset >= page["total"] or not page["entries"]:
                return 0
            if interactive and input(f"-- {page['total'] - offset} more: Enter for the next page, q to stop -- ")\
                    .strip().lower().startswith("q"):
                return 0

    return with_link(args, work)


class Browser:
    """A curses listing of the worker's directories: arrows move, Enter opens a directory
    or picks a file, Left (or Backspace on an empty filter) goes up, typing edits a glob
    filter on file names, Esc cancels."""

    KEYS = "Up/Down move  Enter open/pick  Left up  type: filter  Esc cancel"

    def __init__(self, link: P.Link, start: Optional[str], pattern: str = "", nearest: bool = False):
        self.link = link
        self.filter = pattern
        self.mounts: list[str] = [m["path"] for m in listing(link, None).get("mounts", [])]
        self.path: Optional[str] = None
        self.entries: list[dict] = []
        self.cursor = self.top = 0
        self.message = ""
        if not self.open(start, nearest):
            self.open(None)

    def open(self, path: Optional[str], nearest: bool = False) -> bool:
        """Show `path` (None: the mounts); False, with the reason shown, when it cannot be."""
        page = listing(self.link, path, nearest)
        if page.get("error"):
            self.message = page["error"]
            return False
        if "mounts" in page:
            self.path, self.entries = None, [{"name": m["path"], "kind": "dir", "size": None} for m in page["mounts"]]
        else:
            self.path, self.entries = page["path"], page["entries"]
        self.cursor = self.top = 0
        return True

    def shown(self) -> list[dict]:
        import fnmatch

        pattern = self.filter if any(c in self.filter for c in "*?[") else f"*{self.filter}*"
        return [e for e in self.entries if e["kind"] == "dir" or fnmatch.fnmatch(e["name"].lower(), pattern.lower())]

    def up(self) -> None:
        if self.path is None:
            return
        if self.path in self.mounts or not self.open(str(Path(self.path).parent)):
            self.open(None)

    def run(self, screen) -> Optional[str]:
        import curses

        curses.curs_set(0)
        while True:
            entries = self.shown()
            self.cursor = max(0, min(self.cursor, len(entries) - 1))
            self.draw(screen, entries)
            key = screen.getch()
            chosen = entries[self.cursor] if entries else None
            if key == 27:
                return None
            if key in (curses.KEY_UP, curses.KEY_DOWN, curses.KEY_PPAGE, curses.KEY_NPAGE):
                step = {curses.KEY_UP: -1, curses.KEY_DOWN: 1}.get(key, (screen.getmaxyx()[0] - 4) *
                                                                   (1 if key == curses.KEY_NPAGE else -1))
                self.cursor += step
            elif key in (10, 13, curses.KEY_ENTER, curses.KEY_RIGHT) and chosen is not None:
                target = chosen["name"] if self.path is None else str(Path(self.path) / chosen["name"])
                if chosen["kind"] == "file":
                    if key != curses.KEY_RIGHT:
                        return target
                elif self.open(target):
                    self.message = ""
            elif key == curses.KEY_LEFT or (key in (curses.KEY_BACKSPACE, 127, 8) and not self.filter):
                self.up()
            elif key in (curses.KEY_BACKSPACE, 127, 8):
                self.filter = self.filter[:-1]
            elif 32 <= key < 127:
                self.filter += chr(key)
                self.cursor = 0

    def draw(self, screen, entries: list[dict]) -> None:
        import curses

        screen.erase()
        height, width = screen.getmaxyx()
        rows = max(1, height - 4)
        if self.cursor < self.top:
            self.top = self.cursor
        elif self.cursor >= self.top + rows:
            self.top = self.cursor - rows + 1
        screen.addnstr(0, 0, f"{self.link.peer_id}: {self.path or 'mounts'}", width - 1, curses.A_BOLD)
        screen.addnstr(1, 0, f"filter: {self.filter or '(type to filter files)'}   {len(entries)} shown", width - 1)
        for row, entry in enumerate(entries[self.top:self.top + rows]):
            folder = entry["kind"] == "dir"
            text = f"{'[d]' if folder else '   '} {entry['name']}{'/' if folder else ''}"
            if not folder:
                text = f"{text:<{max(10, width - 14)}} {_size(entry['size']):>10}"
            attribute = curses.A_REVERSE if self.top + row == self.cursor else curses.A_NORMAL
            screen.addnstr(2 + row, 0, text, width - 1, attribute)
        screen.addnstr(height - 1, 0, self.message or self.KEYS, width - 1)
        screen.refresh()


def pick_on_worker(link: P.Link, start: Optional[str], pattern: str = "", nearest: bool = False) -> Optional[str]:
    """Let the person at this terminal pick a file on the worker; None when they cancel.
    The browser draws on the terminal itself, so that stdout can be captured:
    `$(python client.py browse)`."""
    import curses

    os.environ.setdefault("ESCDELAY", "25")  # Esc cancels at once, not after curses' default second
    for stale in ("LINES", "COLUMNS"):  # curses would take them over the terminal's own size
        os.environ.pop(stale, None)
    browser = Browser(link, start, pattern, nearest)
    saved = []
    try:
        terminal = os.open("/dev/tty", os.O_RDWR)
    except OSError as exc:
        raise UsageError(f"browsing needs a terminal: {exc.strerror}") from None
    try:
        for fd in (0, 1):
            saved.append(os.dup(fd))
            os.dup2(terminal, fd)
        return curses.wrapper(browser.run)
    finally:
        for fd, copy in enumerate(saved):
            os.dup2(copy, fd)
            os.close(copy)
        os.close(terminal)


def cmd_browse(args) -> int:
    def work(link: P.Link) -> int:
        chosen = pick_on_worker(link, args.path, args.filter or "")
        if chosen is None:
            print("cancelled", file=sys.stderr)
            return 1
        print(chosen)
        return 0

    return with_link(args, work)


# ---------------------------------------------------------------------------------------
# Fixing a rejected path and submitting again
# ---------------------------------------------------------------------------------------

PATH_REJECTED = 4  # exit code: rejected for paths the worker does not have; candidates were printed
PATH_CODES = ("NOT_FOUND", "ACCESS_DENIED", "BAD_PATH")
# A path inside the config that a spec field overrides, so that the fix goes there.
CONFIG_KEY_FIELDS = {"config": "config", "data_config.train_labels_path": "labels",
                     "data_config.val_labels_path": "val_labels", "trainer_config.resume_ckpt_path": "resume"}
SPEC_FLAGS = {"config": "--config", "labels": "--labels", "val_labels": "--val-labels", "max_epochs": "--max-epochs",
              "batch_size": "--batch-size", "learning_rate": "--learning-rate", "run_name": "--run-name",
              "resume": "--resume", "data_path": "--data-path", "output": "--output",
              "peak_threshold": "--peak-threshold", "frames": "--frames", "frame_filter": "--frame-filter",
              "video_index": "--video-index"}


def fix_target(error: dict) -> Optional[str]:
    """The spec field that fixes a rejected path (path_map for a video), or None."""
    if error.get("video"):
        return "path_map"
    if not error.get("path") or error.get("code") not in PATH_CODES:
        return None
    if error["field"] in ("labels", "val_labels", "resume", "data_path", "model_paths"):
        return error["field"]
    return CONFIG_KEY_FIELDS.get(error.get("key")) if error["field"] == "config" else None


def command_line(spec: dict) -> str:
    """The client command that submits `spec` (paths on the worker)."""
    words = ["python", "client.py", spec["type"]]
    for field, flag in SPEC_FLAGS.items():
        if spec.get(field) is not None:
            words += [flag, str(spec[field])]
    for model in spec.get("model_paths") or []:
        words += ["--model-paths", model]
    if spec.get("only_suggested_frames"):
        words.append("--only-suggested-frames")
    if spec.get("exclude_user_labeled"):
        words.append("--exclude-user-labeled")
    if spec["type"] == P.TRAIN and spec.get("gui") is False:
        words.append("--no-progress")
    for old, new in spec.get("path_map") or []:
        words += ["--path-map", f"{old}={new}"]
    return shlex.join(words)


def fix_rejected_paths(link: P.Link, spec: dict, errors: list[dict], interactive: bool) -> Optional[dict]:
    """Show each rejected path with the worker's candidates for it; at a terminal, ask
    for a candidate, the browser or giving up, and return the spec with the choices
    (None: nothing to fix, or the person gave up, or no terminal)."""
    fixable = [e for e in errors if fix_target(e)]
    if not fixable:
        return None
    fixed = json.loads(json.dumps(spec))
    videos = [e for e in fixable if e.get("video")]
    for error in [e for e in fixable if not e.get("video")]:
        candidates = _candidates(link, error["path"])
        print(f"\n{error['path']} ({error['field']}): {error['code'].lower().replace('_', ' ')}", file=sys.stderr)
        for number, candidate in enumerate(candidates, 1):
            print(f"  {number}. {candidate['path']}  ({_size(candidate['size'])}, {_when(candidate['mtime'])})",
                  file=sys.stderr)
        if not candidates:
            print("  no file of a similar name on the worker", file=sys.stderr)
        if not interactive:
            continue
        choice = _choose(candidates, link, error["path"])
        if choice is None:
            return None
        _replace(fixed, fix_target(error), error["path"], choice)
    if videos:
        for error in videos:
            print(f"\n{error['message']}", file=sys.stderr)
            for candidate in error.get("candidates", []):
                print(f"  found: {candidate}", file=sys.stderr)
        proposal = videos[0].get("proposal")
        if proposal:
            print(f"\nproposed: --path-map {proposal['old']}={proposal['new']} (resolves {proposal['resolves']} of "
                  f"{proposal['of']} missing videos)", file=sys.stderr)
        if not interactive:
            return None
        if not proposal or input("use this mapping? [y/N] ").strip().lower() not in ("y", "yes"):
            return None
        fixed["path_map"] = [*fixed.get("path_map", []), [proposal["old"], proposal["new"]]]
    return fixed if interactive else None


def _candidates(link: P.Link, path: str) -> list[dict]:
    local = Path(path).expanduser()
    size = local.stat().st_size if local.is_file() else None  # the same file here tells the size to look for
    found = ask(link, P.fs_search(path, size), P.FS_FOUND, "search results")
    if found.get("error"):
        print(f"  no search: {found['error']}", file=sys.stderr)
    return found.get("candidates", [])[:9]


def _choose(candidates: list[dict], link: P.Link, path: str) -> Optional[str]:
    while True:
        numbers = (f"[1-{len(candidates)}] a candidate, " if len(candidates) > 1 else "[1] the candidate, "
                   if candidates else "")
        answer = input(f"choose {numbers}[b] browse the worker, [q] give up: ").strip().lower()
        if answer.isdigit() and 1 <= int(answer) <= len(candidates):
            return candidates[int(answer) - 1]["path"]
        if answer.startswith("b"):
            suffix = Path(path.replace("\\", "/")).suffix
            chosen = pick_on_worker(link, path, f"*{suffix}" if suffix else "", nearest=True)
            if chosen is not None:
                return chosen
        elif answer.startswith("q"):
            return None


def _replace(spec: dict, field: str, old: str, new: str) -> None:
    if field == "model_paths":
        spec[field] = [new if m == old else m for m in spec[field]]
    else:
        spec[field] = new


# ---------------------------------------------------------------------------------------
# Jobs
# ---------------------------------------------------------------------------------------

# One small file per job, so that clients running side by side never rewrite each other's.
JOBS_DIR = Path("~/.sleap-rtc/jobs")
DETACHED = 3  # exit code: the job runs on, this client stopped following it


def remember_job(job_id: str, worker_id: str, room_id: str) -> None:
    """Note which worker holds a job, so that JOB alone is enough later."""
    directory = JOBS_DIR.expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{job_id}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"job_id": job_id, "worker_id": worker_id, "room_id": room_id,
                               "remembered_at": time.time()}))
    os.replace(tmp, directory / f"{job_id}.json")


def remembered_worker(job_id: str) -> Optional[str]:
    path = JOBS_DIR.expanduser() / f"{job_id}.json"
    try:
        return json.loads(path.read_text()).get("worker_id")
    except (OSError, ValueError):
        return None


class JobMonitor:
    """Follows one job over a link: status line, local log, progress events, outcome."""

    def __init__(self, link: P.Link, job_id: str, local_dir: Path, verbose: bool):
        self.link = link
        self.job_id = job_id
        self.local_dir = local_dir
        self.verbose = verbose
        self.tty = sys.stderr.isatty()
        self.interrupts = 0
        self.epochs: list[dict] = []  # epoch_end events: epoch, loss, val_loss
        self.plot = LossPlot(local_dir / "loss.png", f"job {job_id}", self.epochs)
        self.epoch_started: Optional[float] = None
        self.epoch_seconds: list[float] = []
        self.files: list[P.FileReceived] = []
        self.early: list = []  # what arrived while waiting for JOB_ACCEPTED: the job may already log
        local_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = local_dir / "job.log"
        self.log_file = open(self.log_path, "a", encoding="utf-8")
        self.reports_file = open(local_dir / "progress.jsonl", "a", encoding="utf-8")
        self.events_file = open(local_dir / "events.jsonl", "a", encoding="utf-8")  # every job message but logs

    def close(self) -> None:
        self.plot.stop()
        self.log_file.close()
        self.reports_file.close()
        self.events_file.close()

    def status(self, text: str, final: bool = False) -> None:
        if self.tty:
            sys.stderr.write("\r\033[K" + text + ("\n" if final else ""))
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def wait_accepted(self, timeout: float = 60) -> tuple[Optional[dict], list[dict]]:
        """(the JOB_ACCEPTED payload, []), or (None, the errors) after printing why the
        job was rejected."""
        reply = self.link.expect(lambda m: _is(m, P.JOB_ACCEPTED, self.job_id) or _is(m, P.JOB_REJECTED, self.job_id),
                                 timeout, f"answer to job {self.job_id}", on_other=self.early.append)
        if reply.name == P.JOB_ACCEPTED:
            return reply.payload, []
        print(f"error: job {self.job_id} was rejected by {self.link.peer_id}:", file=sys.stderr)
        errors = reply.payload.get("errors") or [{"field": "?", "message": reply.payload.get("message")}]
        for error in errors:
            print(f"  {error['field']}: {error['message']}", file=sys.stderr)
        return None, errors

    def follow(self) -> int:
        """Relay until JOB_COMPLETE / JOB_FAILED; the exit code of the command."""
        while True:
            if self.interrupts:
                code = self._on_interrupt()
                if code is not None:
                    return code
            try:
                item = self.early.pop(0) if self.early else self.link.recv(timeout=0.2)
            except P.LinkClosed as exc:
                self.status(f"error: lost the link to {self.link.peer_id} ({exc}). The job may still be running "
                            f"there, or the worker may be gone: check with `python client.py status {self.job_id}`, "
                            f"follow it again with `python client.py logs {self.job_id} --follow` (which reconnects "
                            "on its own)", True)
                return 1
            if item is None:
                continue
            if isinstance(item, P.FileReceived):
                self.files.append(item)
                continue
            if isinstance(item, P.TransferFailed):
                self.status(f"error: a result file did not arrive: {item.error}", True)
                continue
            if item.name == P.LINK_ERROR:
                self.status(f"the worker reports: {item.payload.get('message')}", True)
                continue
            if item.payload.get("job_id") != self.job_id:
                continue
            if item.name not in (P.JOB_LOG, P.PROGRESS_REPORT):
                self.events_file.write(json.dumps({"name": item.name, "payload": item.payload}) + "\n")
                self.events_file.flush()
            if item.name == P.JOB_DETACHED:
                self.status(f"error: {item.payload.get('reason')}", True)
                return DETACHED
            elif item.name == P.JOB_LOG:
                self._log(P.LogBatch.read(item.payload))
            elif item.name == P.JOB_PROGRESS:
                self._progress(item.payload)
            elif item.name == P.PROGRESS_REPORT:
                self.reports_file.write(item.payload.get("report", "") + "\n")
            elif item.name == P.JOB_CONTROL:
                self.status(f"{item.payload['action']}: {item.payload['message']}", True)
            elif item.name in P.STEP_MESSAGES:
                self._step(item.name, item.payload)
            elif item.name in (P.JOB_COMPLETE, P.JOB_FAILED):
                return self._finish(P.Outcome.read(item.payload))

    def _step(self, name: str, p: dict) -> None:
        """A step of the job started or ended (a package trains several models, then predicts)."""
        model = p.get("name")
        if name == P.TRAIN_JOB_START:
            self.status(f"job {self.job_id} started on {self.link.peer_id}: training {model}", True)
            self.plot.prepare()
        elif name == P.TRAIN_JOB_END:
            self.status(f"model {model} trained{' (stopped early)' if p.get('stopped_early') else ''}", True)
        elif name == P.TRAIN_JOB_ERROR:
            self.status(f"model {model} failed (exit code {p.get('exit_code')}); what follows it does not run", True)
        elif name == P.INFERENCE_START:
            self.status("training done; inference follows", True)
        elif name == P.INFERENCE_JOB_START:
            self.status(f"job {self.job_id} started on {self.link.peer_id}: inference", True)
        elif name == P.COMMAND_START:
            self.status(f"job {self.job_id} started on {self.link.peer_id}: command {model}", True)

    def _log(self, batch: P.LogBatch) -> None:
        for stream, line in batch.lines:
            self.log_file.write(line + "\n")
            if stream == "w":  # the worker's own notes: what it decided in the job's stead
                self.status(line, True)
            elif self.verbose and stream != "m":  # "m": the worker's marker of a message that follows
                (sys.stdout if stream == "o" else sys.stderr).write(line + "\n")
        self.log_file.flush()
        if self.verbose and batch.progress and self.tty:
            sys.stderr.write("\r\033[K" + batch.progress[:200])

    def _progress(self, p: dict) -> None:
        event = p.get("event")
        now = time.monotonic()
        if event == "queued":
            self.status(f"queued on {self.link.peer_id} at position {p.get('queue_position')}")
        elif event == "inference":
            self.status(f"inference: {p.get('n_processed')}/{p.get('n_total')} frames  "
                        f"{p.get('rate') or 0:.1f} fps  ETA {p.get('eta') or 0:.0f} s")
        elif event == "train_begin":
            self.status("training started")
        elif event == "epoch_begin":
            self.epoch_started = now
        elif event == "epoch_end":
            if self.epoch_started is not None:
                self.epoch_seconds.append(now - self.epoch_started)
            self.epochs.append({"epoch": p.get("epoch"), "loss": p.get("loss"), "val_loss": p.get("val_loss"),
                                "model": p.get("model")})
            self.plot.update()
            total = p.get("max_epochs")
            done = (p.get("epoch") or 0) + 1
            eta = ""
            if total and self.epoch_seconds:
                eta = f"  ETA {statistics.mean(self.epoch_seconds) * max(0, total - done):.0f} s"
            self.status(f"epoch {done}/{total or '?'}  loss {_num(p.get('loss'))}  "
                        f"val_loss {_num(p.get('val_loss'))}{eta}")
        elif event == "train_end":
            self.status("training finished; sleap-nn is evaluating and saving", True)

    def _on_interrupt(self) -> Optional[int]:
        """Ctrl+C: ask on a terminal; otherwise the first stops early, the second cancels."""
        count, self.interrupts = self.interrupts, 0
        if sys.stdin.isatty():
            self.status("", True)
            choice = input("[s] stop early (keep the model)  [c] cancel  [d] detach  [Enter] go on: ").strip().lower()
        else:
            choice = "s" if count == 1 and not getattr(self, "_stop_sent", False) else "c"
        if choice.startswith("s"):
            self._stop_sent = True
            self.link.send(*P.job_request_control(P.ZMQ_CTRL, self.job_id))
        elif choice.startswith("c"):
            self.link.send(*P.job_request_control(P.JOB_CANCEL, self.job_id))
        elif choice.startswith("d"):
            self.status(f"detached; job {self.job_id} runs on {self.link.peer_id}", True)
            return DETACHED
        return None

    def _finish(self, outcome: P.Outcome) -> int:
        state = outcome.state
        self.status(f"job {self.job_id} {state} (exit code {outcome.exit_code}, "
                    f"{outcome.duration_s} s{', stopped early' if outcome.stopped_early else ''})", True)
        for step in outcome.steps if len(outcome.steps) > 1 else []:
            code = f" (exit code {step['exit_code']})" if step.get("exit_code") not in (None, 0) else ""
            print(f"  {step['kind']} {step['name']}: {step['state']}{code}")
        for output in outcome.outputs:
            if output.get("relative"):
                print(f"{output['kind']} next to the package: {output['relative']}")
            if output["kind"] == "model":
                print(f"model on the worker: {output['path']}")
            elif output["kind"] == "replica":
                print(f"{output['of']} on {output['worker']}: {output['path']} (job {output['replica_job']} there)")
            elif output["kind"] == "predictions":
                local = next((f for f in self.files if f.sha256 == output["sha256"]), None)
                print(f"predictions: {local.path} (sha256 {output['sha256']}, checked, "
                      f"{transfer_note(local.size, local.seconds, local.via)})" if local else
                      f"predictions on the worker: {output['path']} (not received here)")
        if outcome.warning:
            print(f"warning: {outcome.warning}")
        if state != P.COMPLETED:
            print(f"error: {outcome.error}", file=sys.stderr)
            for line in outcome.stderr_tail:
                print(f"  | {line}", file=sys.stderr)
        print(f"log: {self.log_path}")
        if self.epochs:
            print(self.plot.finish())
        return 0 if state == P.COMPLETED else 1


PLOT_INTERVAL_S = 2.0  # the loss plot is redrawn at most this often while epochs end


class LossPlot:
    """loss.png of a job's epochs, drawn in a thread of its own as epochs end (at most
    every PLOT_INTERVAL_S), so that the job's end waits for no drawing: matplotlib's import
    alone takes half a second. The thread imports it as training starts (sleap-nn's own
    start-up leaves a core free). `finish` draws what came after the last drawing, if anything."""

    def __init__(self, path: Path, title: str, epochs: list[dict]):
        self.path, self.title, self.epochs = path, title, epochs
        self.problem: Optional[str] = None
        self._wake = threading.Event()  # set when there is more to draw
        self._finishing = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def prepare(self) -> None:
        """Start the thread: it imports matplotlib, then draws when there are epochs."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="loss-plot", daemon=True)
            self._thread.start()

    def update(self) -> None:
        """The epochs grew: draw them soon."""
        self.prepare()
        self._wake.set()

    def stop(self) -> None:
        """End the thread after its drawing, if any, without waiting for it (a job that
        ended before any epoch has nothing to draw)."""
        self._finishing.set()
        self._wake.set()

    def finish(self, timeout: float = 60) -> str:
        """Wait until every epoch is drawn; the line to print."""
        self.prepare()
        self._finishing.set()
        self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            return f"no loss plot: drawing it took over {timeout:.0f} s"
        return self.problem or f"loss plot: {self.path}"

    def _run(self) -> None:
        try:
            from matplotlib.figure import Figure  # no pyplot: a Figure of its own is safe in a thread
        except ImportError:
            self.problem = "no loss plot: matplotlib is not installed here (pip install matplotlib)"
            return
        except Exception as exc:  # a broken install: the job's outcome stands, and says why there is no plot
            self.problem = f"no loss plot: importing matplotlib failed: {exc}"
            return
        drawn = 0
        while True:
            self._wake.wait()
            self._wake.clear()
            finishing = self._finishing.is_set()
            epochs = list(self.epochs)
            if len(epochs) != drawn:
                try:
                    self._draw(Figure, epochs)
                except Exception as exc:  # matplotlib and the disk may raise anything; the job's outcome stands
                    self.problem = f"no loss plot: {exc}"
                    return
                drawn = len(epochs)
            if finishing:
                return
            self._finishing.wait(PLOT_INTERVAL_S)

    def _draw(self, Figure, epochs: list[dict]) -> None:
        figure = Figure(figsize=(6, 4))
        axes = figure.subplots()
        models = list(dict.fromkeys(e["model"] for e in epochs))  # a package trains several, in order
        for model in models:
            run = [e for e in epochs if e["model"] == model]
            for key, label in (("loss", "train loss"), ("val_loss", "val loss")):
                values = [e[key] for e in run]
                if any(v is not None for v in values):
                    axes.plot([e["epoch"] + 1 for e in run], [float("nan") if v is None else v for v in values],
                              marker="o", label=f"{model} {label}" if len(models) > 1 else label)
        from matplotlib.ticker import MaxNLocator

        axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole: no tick at 1.5
        axes.set_xlabel("epoch")
        axes.set_ylabel("loss")
        axes.set_title(self.title)
        axes.legend()
        partial = self.path.with_name(self.path.name + ".part")  # a reader sees the old plot or the new one
        figure.savefig(partial, dpi=100, bbox_inches="tight", format="png")
        os.replace(partial, self.path)


def _num(value) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else "-"


def run_job(args, spec: dict, prepare: Optional[Callable[[P.Link, dict], dict]] = None) -> int:
    """Submit a spec to a worker and follow it to the end (or until detached). `prepare`
    gets the open link and gives the spec to submit (after uploading files)."""
    job_id = P.new_job_id()
    download = Path(getattr(args, "download", None) or ".")
    download.mkdir(parents=True, exist_ok=True)
    signaling = connect(args)
    link = monitor = None
    try:
        worker_id, _ = negotiate(signaling, job_id, spec, args.worker_id, args.min_gpu_memory)
        link = P.open_link(signaling, worker_id, download)
        link.incoming.on_progress = Progress("predictions")
        if prepare is not None:
            spec = prepare(link, spec)
        monitor = JobMonitor(link, job_id, Path(args.log_dir) / job_id, args.verbose)
        link.send(*P.job_submit(job_id, spec))
        interactive = sys.stdin.isatty() and sys.stdout.isatty() and not getattr(args, "non_interactive", False)
        while True:
            accepted, errors = monitor.wait_accepted()
            if accepted is not None:
                break
            fixed = fix_rejected_paths(link, spec, errors, interactive)
            if fixed is None:
                return PATH_REJECTED if any(fix_target(e) for e in errors) else 1
            spec = fixed
            print(f"submitting job {job_id} again with the corrected paths; the command for it:\n  "
                  f"{command_line(spec)}", flush=True)
            link.send(*P.job_submit(job_id, spec))
        remember_job(job_id, worker_id, signaling.room_id)
        position = accepted.get("queue_position") or 0
        print(f"job {job_id} accepted by {worker_id}; "
              f"{f'queued at position {position}' if position else 'starting now'}; "
              f"worker directory {accepted['job_dir']}", flush=True)
        if args.detach:
            print(f"detached; follow it with `python client.py logs {job_id} --follow` "
                  f"(or status, fetch, stop, cancel)")
            return 0
        previous = signal.signal(signal.SIGINT, lambda *_: setattr(monitor, "interrupts", monitor.interrupts + 1))
        try:
            return monitor.follow()
        finally:
            signal.signal(signal.SIGINT, previous)
    finally:
        if monitor is not None:
            monitor.close()
        if link is not None:
            link.close()
        signaling.close()


# Spec fields that --upload sends when they name a file on this machine.
UPLOADABLE_FIELDS = {P.TRAIN: ("config", "labels", "val_labels", "resume"), P.TRACK: ("data_path",)}
PACKAGE_NOTE = ("note: training packages are deprecated; --config and --labels (with --upload for files on this "
                "machine) say the same. This package runs in full.")


def cmd_train(args) -> int:
    if args.pkg_path or args.worker_pkg_path:
        return _submit_package(args, P.TRAIN)
    if not args.config:
        raise UsageError("train needs --config, or a package: --pkg-path (on this machine) or --worker-pkg-path")
    spec = {"type": P.TRAIN, "config": args.config, "labels": args.labels, "val_labels": args.val_labels,
            "max_epochs": args.max_epochs, "batch_size": args.batch_size, "learning_rate": args.learning_rate,
            "run_name": args.run_name, "resume": args.resume, "gui": not args.no_progress, "path_map": args.path_map}
    return _submit_checked(args, spec, UPLOADABLE_FIELDS[P.TRAIN] if args.upload else ())


def cmd_track(args) -> int:
    if args.pkg_path or args.worker_pkg_path:
        return _submit_package(args, P.TRACK)
    if not args.data_path or not args.model_paths:
        raise UsageError("track needs --data-path and --model-paths, or a package: --pkg-path (on this machine) "
                         "or --worker-pkg-path")
    if args.only_suggested_frames and args.frame_filter not in (None, "suggested"):
        raise UsageError(f"--only-suggested-frames and --frame-filter {args.frame_filter} ask for different frames; "
                         "give one")
    spec = {"type": P.TRACK, "data_path": args.data_path, "model_paths": args.model_paths, "output": args.output,
            "batch_size": args.batch_size, "peak_threshold": args.peak_threshold, "frames": args.frames,
            "only_suggested_frames": args.only_suggested_frames or None, "frame_filter": args.frame_filter,
            "video_index": args.video_index, "exclude_user_labeled": args.exclude_user_labeled or None,
            "gui": True, "path_map": args.path_map}
    return _submit_checked(args, spec, UPLOADABLE_FIELDS[P.TRACK] if args.upload else ())


def cmd_run(args) -> int:
    command = args.args[1:] if args.args[:1] == ["--"] else args.args
    spec = {"type": P.COMMAND, "command": args.name, "args": command}
    errors = P.check_spec(spec)
    if errors:
        raise UsageError("; ".join(e["message"] for e in errors))
    return run_job(args, spec)


def _duration(text: str) -> float:
    """Seconds in "30d", "12h", "90m", "45s" or a plain number of days."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([dhms]?)", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"want a duration like 30d, 12h or 90m, not {text!r}")
    return float(match.group(1)) * {"d": 86400, "h": 3600, "m": 60, "s": 1, "": 86400}[match.group(2)]


def cmd_files(args) -> int:
    """`files ls`: the worker's upload store; `files rm SHA...`: a prune job for those uploads."""
    if args.action == "rm":
        if not args.sha256:
            raise UsageError("files rm needs the SHA-256 (or its first 6+ digits) of each upload to remove")
        if args.json:
            raise UsageError("--json goes with files ls; files rm runs a prune job, followed as one")
        spec = {"type": P.PRUNE, "uploads": args.sha256, "dry_run": args.dry_run or None}
        errors = P.check_spec(spec)
        if errors:
            raise UsageError(errors[0]["message"])
        return run_job(args, spec)
    if args.sha256:
        raise UsageError("files ls takes no arguments")

    def work(link: P.Link) -> int:
        files = ask(link, P.store_list(), P.STORE_LISTING, "upload store listing").get("files", [])
        if args.json:
            print_json({"worker": link.peer_id, "files": [
                {**picked(f, UPLOAD_JSON_FIELDS), "partial": bool(f.get("partial"))} for f in files]})
            return 0
        if not files:
            print(f"the upload store of {link.peer_id} is empty")
            return 0
        rows = [[f["sha256"][:12], _size(f["size"]), _when(f["last_use"]),
                 "(cut off)" if f.get("partial") else ", ".join(f["names"]),
                 ", ".join(f["jobs"]) + (" (needed now)" if f["needed"] else "") or "-"] for f in files]
        print_table(rows, ["SHA256", "SIZE", "LAST USE", "NAMES", "JOBS"])
        partial = sum(bool(f.get("partial")) for f in files)
        print(f"{len(files) - partial} upload(s), {partial} cut off (resumable, removed after a day unused), "
              f"{_size(sum(f['size'] for f in files))} in all")
        return 0

    return with_link(args, work)


def cmd_replicate(args) -> int:
    """A replicate job on the worker holding JOB: its results go to --to, which keeps them as a job of its own."""
    signaling = connect(args)
    try:
        holder, record = locate_job(signaling, args.job_id)
    finally:
        signaling.close()
    if holder == args.to:
        raise UsageError(f"job {args.job_id} is on {holder} already")
    args.worker_id = holder
    return run_job(args, {"type": P.REPLICATE, "source_job": args.job_id, "to": args.to})


def cmd_prune(args) -> int:
    """A prune job on the worker named, else on every worker in the room, one after the other."""
    spec = {"type": P.PRUNE, "older_than_s": args.older_than, "keep_failed": args.keep_failed or None,
            "dry_run": args.dry_run or None}
    if args.worker_id:
        return run_job(args, spec)
    signaling = connect(args)
    try:
        workers = sorted(w.peer_id for w in discover_workers(signaling) if P.PRUNE in w.job_types)
    finally:
        signaling.close()
    if not workers:
        raise P.NoWorkersAvailableError(f"no worker in room {args.room} can prune")
    codes = []
    for worker_id in workers:
        args.worker_id = worker_id
        codes.append(run_job(args, spec))
    return max(codes)


def _submit_package(args, job_type: str) -> int:
    """A SLEAP training package: sent from this machine (--pkg-path), or used where it lies
    on the worker's shared storage (--worker-pkg-path)."""
    print(PACKAGE_NOTE, file=sys.stderr)
    if args.pkg_path and args.worker_pkg_path:
        raise UsageError("give --pkg-path (a file here) or --worker-pkg-path (a file on the worker), not both")
    gui = not getattr(args, "no_progress", False)
    if args.worker_pkg_path:
        return _submit_checked(args, {"type": job_type, "package": args.worker_pkg_path, "gui": gui})
    if not Path(args.pkg_path).is_file():
        raise UsageError(f"{args.pkg_path} is not a file on this machine (for a package on the worker's storage, "
                         "use --worker-pkg-path)")
    return _submit_checked(args, {"type": job_type, "package": args.pkg_path, "gui": gui}, ("package",))


def _submit_checked(args, spec: dict, uploads: tuple[str, ...] = ()) -> int:
    """Check a spec here, then run it; the `uploads` fields that name local files are
    sent to the worker's upload store first and replaced by their paths there."""
    spec = {k: v for k, v in spec.items() if v is not None}
    errors = P.check_spec(spec)
    if errors:  # the worker checks again, with its paths; this saves a round trip
        print("error: the job spec is not valid:", file=sys.stderr)
        for error in errors:
            print(f"  {error['field']}: {error['message']}", file=sys.stderr)
        return 2
    local = {field: Path(spec[field]).expanduser() for field in uploads
             if field in spec and Path(spec[field]).expanduser().exists()}
    for field, path in local.items():
        if not path.is_file():
            raise UsageError(f"{field}: {path} is a directory here; --upload sends files only")

    def prepare(link: P.Link, spec: dict) -> dict:
        return {**spec, **{field: send_content(link, path) for field, path in local.items()}}

    return run_job(args, spec, prepare if local else None)


def with_job_link(args, work: Callable[[P.Link, dict], int], receive_dir: Path = Path("."),
                  again: bool = False) -> int:
    """Find the worker holding args.job_id, open a link to it, run `work(link, record)`
    (with `again`, on every link until it returns: see with_link_again)."""
    signaling = connect(args)
    link = None
    try:
        worker_id, record = locate_job(signaling, args.job_id, args.worker_id)
        link = P.open_link(signaling, worker_id, receive_dir)
        if not again:
            return work(link, record)
        return with_link_again(args, worker_id, lambda again_link: work(again_link, record), receive_dir,
                               (signaling, link))
    finally:
        if link is not None:
            link.close()
        signaling.close()


def cmd_control(args) -> int:
    name = P.ZMQ_CTRL if args.command == "stop" else P.JOB_CANCEL

    def work(link: P.Link, record: dict) -> int:
        link.send(name, {"job_id": args.job_id})
        reply = link.expect(lambda m: _is(m, P.JOB_CONTROL, args.job_id), REPLY_TIMEOUT_S, f"answer to {args.command}")
        print(f"{args.command} {args.job_id} on {link.peer_id}: {reply.payload['message']}")
        return 0 if reply.payload.get("ok") else 1

    return with_job_link(args, work)


def _when(timestamp: Optional[float]) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp)) if timestamp else "-"


def cmd_jobs(args) -> int:
    signaling = connect(args)
    try:
        workers = [args.worker_id] if args.worker_id else sorted(w.peer_id for w in discover_workers(signaling))
        if not workers:
            print(f"no workers in room {args.room}", file=sys.stderr)
            return 1
        query = P.app_jobs_query(secrets.token_hex(6), state=args.state, sql=args.sql or None)
        replies = {w: P.JobsAnswer.read(r) for w, r in ask_workers(signaling, workers, query, P.APP_JOBS_LIST).items()}
    finally:
        signaling.close()
    for worker_id in workers:
        if worker_id not in replies:
            print(f"warning: {worker_id} did not answer within {ANSWER_TIMEOUT_S:.0f} s", file=sys.stderr)
        elif replies[worker_id].error:
            print(f"error from {worker_id}: {replies[worker_id].error}", file=sys.stderr)
    if args.sql:
        return _print_query(replies, args.json)
    jobs = sorted(((worker_id, job) for worker_id, reply in replies.items() for job in reply.jobs),
                  key=lambda pair: pair[1]["submitted_at"] or 0)
    if args.json:
        print_json({"room": args.room, "jobs": [{**picked(job, JOB_JSON_FIELDS), "worker": worker_id}
                                                for worker_id, job in jobs],
                    "unanswered": [w for w in workers if w not in replies],
                    "errors": {w: r.error for w, r in replies.items() if r.error}})
        return 0 if replies else 1
    if not jobs:
        print(f"no {args.state + ' ' if args.state else ''}jobs on {len(replies)} worker(s) in room {args.room}")
        return 0 if replies else 1
    rows = [[job["job_id"], worker_id, job.get("type"), job.get("state"), _when(job["submitted_at"]),
             f"{job['duration_s']:.1f} s" if job["duration_s"] is not None else "-"]
            for worker_id, job in jobs]
    print_table(rows, ["JOB", "WORKER", "TYPE", "STATE", "SUBMITTED", "DURATION"])
    return 0


def _print_query(replies: dict[str, P.JobsAnswer], as_json: bool) -> int:
    """Every worker's rows of a ledger query, with a WORKER column first, as a table or JSON."""
    answered = {w: r for w, r in sorted(replies.items()) if r.columns is not None}
    columns = ["worker"] + list(dict.fromkeys(c for r in answered.values() for c in r.columns))
    rows = [{"worker": w, **dict(zip(r.columns, row))} for w, r in answered.items() for row in r.rows]
    for worker_id, reply in answered.items():
        if reply.truncated:
            print(f"warning: {worker_id} sent only the first {len(reply.rows)} rows", file=sys.stderr)
    if as_json:
        print(json.dumps(rows, indent=1))
    elif rows:
        print_table([["" if row.get(c) is None else str(row.get(c)) for c in columns] for row in rows],
                    [c.upper() for c in columns])
    else:
        print(f"no rows from {len(answered)} worker(s)")
    return 0 if answered else 1


def cmd_status(args) -> int:
    signaling = connect(args)
    try:
        worker_id, job = locate_job(signaling, args.job_id, args.worker_id)
    finally:
        signaling.close()
    if args.json:
        print_json({**picked(job, STATUS_JSON_FIELDS), "worker": worker_id})
        return 0
    state = job["state"]
    if state == P.PENDING and job.get("queue_position"):
        state += f" (queue position {job['queue_position']})"
    print(f"job        {job['job_id']}\nworker     {worker_id}\ntype       {job['type']}\nstate      {state}")
    for label, key in (("submitted", "submitted_at"), ("started", "started_at"), ("finished", "finished_at")):
        print(f"{label:<10} {_when(job.get(key))}")
    if job.get("duration_s") is not None:
        print(f"duration   {job['duration_s']:.1f} s")
    if job.get("exit_code") is not None:
        print(f"exit code  {job['exit_code']}")
    slurm = job.get("slurm") or {}
    if slurm.get("job_id"):
        if slurm.get("state") == "PENDING":
            where = f": pending in SLURM: {slurm.get('reason') or 'no reason given'}"
        else:
            where = (f" on {slurm['node']}" if slurm.get("node") else "") + f": {slurm.get('state') or 'submitted'}"
            where += f" ({slurm['reason']})" if slurm.get("reason") else ""
        print(f"slurm      job {slurm['job_id']}{where}")
        if slurm.get("problem"):
            print(f"           {slurm['problem']}")
    if job.get("stopped_early"):
        print("stopped early, model kept")
    for output in job.get("outputs") or []:
        if output["kind"] == "model":
            print(f"model      {output['path']} ({len(output.get('files', []))} files)")
        elif output["kind"] == "replica":
            print(f"replica    {output['of']} on {output['worker']}: {output['path']} (job {output['replica_job']})")
        else:
            print(f"{output['kind']:<10} {output['path']} (sha256 {output['sha256']})")
    if job.get("warning"):
        print(f"warning    {job['warning']}")
    if job.get("pruned"):
        when = _when(job["pruned"].get("at"))
        print(f"pruned     {when} by job {job['pruned'].get('by')}: {job['pruned'].get('path')} is gone "
              "(this record stays)")
    if job.get("error"):
        print(f"error      {job['error']}")
    for line in job.get("stderr_tail") or []:
        print(f"  | {line}")
    print(f"log        {job.get('log_path')} (on the worker; `python client.py logs {job['job_id']}`)")
    return 0


def cmd_logs(args) -> int:
    shown = {"offset": 0}  # how much of the job's log this command printed: a new link goes on from there

    def work(link: P.Link, record: dict) -> int:
        def show(item) -> None:
            if _is(item, P.JOB_LOG, args.job_id):
                batch = P.LogBatch.read(item.payload)
                sys.stdout.writelines(line + "\n" for _, line in batch.lines)
                sys.stdout.flush()
                if batch.offset is not None:
                    shown["offset"] = batch.offset

        link.send(*P.job_attach(args.job_id, args.follow, shown["offset"]))
        attached = link.expect(lambda m: _is(m, P.JOB_ATTACHED, args.job_id), REPLY_TIMEOUT_S,
                               f"log of job {args.job_id}", on_other=show)
        if attached.payload.get("error"):
            print(f"error: {attached.payload['error']}", file=sys.stderr)
            return 1
        if not attached.payload.get("following"):
            if args.follow:  # it had ended already
                print(f"job {args.job_id} {attached.payload.get('state')}", file=sys.stderr)
            return 0
        # A job may be quiet for hours: wait as long as the link lives (a gone worker ends it).
        end = link.expect(lambda m: any(_is(m, name, args.job_id) for name in (P.JOB_COMPLETE, P.JOB_FAILED,
                                                                               P.JOB_DETACHED)),
                          None, f"end of job {args.job_id}", on_other=show)
        if end.name == P.JOB_DETACHED:
            print(f"error: {end.payload.get('reason')}", file=sys.stderr)
            return 1
        print(f"job {args.job_id} {P.Outcome.read(end.payload).state}", file=sys.stderr)
        return 0

    return with_job_link(args, work, again=args.follow)


def cmd_fetch(args) -> int:
    target = Path(args.download) / args.job_id

    def work(link: P.Link, record: dict) -> int:
        if record["state"] != P.COMPLETED:
            raise P.JobFailedError(
                f"job {args.job_id} is {record['state']}{': ' + record['error'] if record.get('error') else ''}; "
                f"it has no results to fetch. See `python client.py logs {args.job_id}`")
        expected = {}
        for output in record.get("outputs") or []:
            if output["kind"] == "replica":  # files on another worker: fetch that worker's job
                continue
            files = output.get("files") or [{"name": Path(output["path"]).name, "sha256": output["sha256"]}]
            expected.update({f["sha256"]: f["name"] for f in files})
        received: list[P.FileReceived] = []

        def arrived(item) -> None:
            if isinstance(item, P.FileReceived):
                received.append(item)
                print(f"received {item.path} ({item.size} bytes) {transfer_note(item.size, item.seconds, item.via)}",
                      file=sys.stderr)
            elif isinstance(item, P.TransferFailed):
                print(f"error: a file did not arrive: {item.error}", file=sys.stderr)

        link.send(*P.job_fetch(args.job_id))
        item = link.expect(lambda m: _is(m, P.JOB_FETCHED, args.job_id), REPLY_TIMEOUT_S,
                           f"results of job {args.job_id}", on_other=arrived)
        if item.payload.get("error"):
            print(f"error: {item.payload['error']}", file=sys.stderr)
        missing = [name for sha256, name in expected.items() if sha256 not in {f.sha256 for f in received}]
        for name in missing:
            print(f"error: {name} did not arrive as the job recorded it (missing, or changed on the worker "
                  "since the job ended)", file=sys.stderr)
        if missing or item.payload.get("error"):
            return 1
        print(f"fetched {len(received)} file(s) of job {args.job_id} into {target}; "
              "each SHA-256 matches the job record")
        return 0

    target.mkdir(parents=True, exist_ok=True)
    return with_job_link(args, work, receive_dir=target)


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------


def _path_map(text: str) -> list[str]:
    old, sep, new = text.partition("=")
    if not sep or not old or not new:
        raise argparse.ArgumentTypeError(f"{text!r} is not OLD=NEW (two path prefixes)")
    return [old, new]


def add_common_options(parser: argparse.ArgumentParser, after_command: bool) -> None:
    """The options every command takes, before the command (where the defaults are set) or
    after it (where a default would overwrite what was given before it: none is set)."""
    def default(value):
        return argparse.SUPPRESS if after_command else value

    parser.add_argument("--server", default=default(os.environ.get(P.ENV_SERVER, P.DEFAULT_SERVER_URL)),
                        help=f"signaling server URL (env {P.ENV_SERVER}, default {P.DEFAULT_SERVER_URL})")
    parser.add_argument("--http", default=default(os.environ.get(P.ENV_HTTP)),
                        help=f"HTTP API port or URL (env {P.ENV_HTTP}; default port {P.DEFAULT_HTTP_PORT})")
    # No defaults from the environment here: known_room tells typed values from it.
    parser.add_argument("--room", default=default(None), help=f"room id (env {P.ENV_ROOM}; default: the room "
                                                              "joined or created last, see `rooms list`)")
    parser.add_argument("--token", default=default(None),
                        help=f"room token (env {P.ENV_TOKEN}); one that starts with '-' as --token=VALUE")
    parser.add_argument("--debug", action="store_true", default=default(False), help="debug logging of the transport")
    parser.add_argument("--no-direct", action="store_true", default=default(False),
                        help="send file bytes only over the WebRTC data channel, never over a direct TCP "
                             f"connection between the machines (env {P.ENV_NO_DIRECT}=1)")


def build_parser() -> argparse.ArgumentParser:
    # Common options go before or after the command, as git and docker users expect.
    common = argparse.ArgumentParser(add_help=False)
    add_common_options(common, after_command=True)
    worker_choice = argparse.ArgumentParser(add_help=False)
    worker_choice.add_argument("--worker-id", default=argparse.SUPPRESS,
                               help="the worker's peer id (default: the first available worker)")

    parser = P.CommandLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_options(parser, after_command=False)
    parser.add_argument("--worker-id", help="the worker to use (each command says how it picks one without it)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("login", parents=[common], help="sign in anonymously and keep the id token")
    p.add_argument("--sleap-rtc-credentials", action="store_true",
                   help="also write ~/.sleap-rtc/credentials.json for a sleap-rtc 0.0.7 install (with --room and "
                        "--token: join that room and issue a worker key)")
    p.set_defaults(run=cmd_login)

    rooms = commands.add_parser("rooms", help="manage rooms")
    rooms_commands = rooms.add_subparsers(dest="rooms_command", required=True, metavar="ACTION")
    p = rooms_commands.add_parser("create", parents=[common], help="create a room and print its id and token")
    p.set_defaults(run=cmd_rooms_create)
    p = rooms_commands.add_parser("join", parents=[common],
                                  help="check a room's token and keep it (--room ROOM alone finds it later; "
                                       "it becomes the default room)")
    p.add_argument("room_id", metavar="ROOM")
    p.set_defaults(run=cmd_rooms_join)
    p = rooms_commands.add_parser("list", parents=[common],
                                  help="the rooms you created or joined on this server, with the workers in each now")
    p.add_argument("--json", action="store_true", help="one JSON document (fields in the README)")
    p.set_defaults(run=cmd_rooms_list)
    p = rooms_commands.add_parser("delete", parents=[common],
                                  help="delete a room you created (everyone in it is disconnected)")
    p.add_argument("room_id", metavar="ROOM")
    p.set_defaults(run=cmd_rooms_delete)

    p = commands.add_parser("workers", parents=[common], help="list the workers in the room")
    p.add_argument("--min-gpu-memory", type=int, default=0, metavar="MB", help="only workers with this much")
    p.add_argument("--json", action="store_true", help="one JSON document (fields in the README) instead of a table")
    p.set_defaults(run=cmd_workers)

    p = commands.add_parser("doctor", parents=[common, worker_choice],
                            help="check the signaling server, STUN (and the NAT kind), TURN over UDP and TCP, "
                                 "and a link to a worker, with a verdict per line")
    p.set_defaults(run=cmd_doctor)

    p = commands.add_parser("ping", parents=[common, worker_choice], help="round trip over a WebRTC link")
    p.add_argument("--count", type=int, default=3, help="how many pings (default 3)")
    p.add_argument("--interval", type=float, default=0.2, help="seconds between pings (default 0.2)")
    p.set_defaults(run=cmd_ping)

    p = commands.add_parser("upload", parents=[common, worker_choice],
                            help="put a file into the worker's upload store (what it holds is not sent again; "
                                 "a cut-off upload resumes) and print its path there")
    p.add_argument("file", help="local file")
    p.set_defaults(run=cmd_upload)

    p = commands.add_parser("ls", parents=[common, worker_choice],
                            help="list the worker's mounts, or one of its directories (directories first)")
    p.add_argument("path", nargs="?", help="a directory on the worker (default: list the mounts)")
    p.set_defaults(run=cmd_ls)

    p = commands.add_parser("browse", parents=[common, worker_choice],
                            help="pick a file on the worker interactively; prints its path, so that "
                                 "$(python client.py browse) works in scripts")
    p.add_argument("path", nargs="?", help="where to start (default: the mounts)")
    p.add_argument("--filter", metavar="GLOB", help="show only files matching GLOB, e.g. '*.yaml' (editable)")
    p.set_defaults(run=cmd_browse)

    p = commands.add_parser("download", parents=[common, worker_choice], help="fetch a file from the worker")
    p.add_argument("path", help="path on the worker (inside its mounts, uploads or job directories)")
    p.add_argument("--download", default=".", metavar="DIR", help="local directory (default: current)")
    p.set_defaults(run=cmd_download)

    job_output = argparse.ArgumentParser(add_help=False)
    job_output.add_argument("--worker-id", default=argparse.SUPPRESS,
                            help="run on this worker (it must still accept the job); by default "
                                 "every fitting worker is asked and the one that can start soonest is chosen")
    job_output.add_argument("--min-gpu-memory", type=int, default=0, metavar="MB",
                            help="only workers with at least this much GPU memory")
    job_output.add_argument("--detach", action="store_true",
                            help="return once the worker accepted the job; reattach with logs/status/fetch")
    job_output.add_argument("--log-dir", default="sleap-rtc-jobs", metavar="DIR",
                            help="where the job's local log, progress events and loss plot go (default ./sleap-rtc-jobs)")
    job_output.add_argument("--upload", action="store_true",
                            help="send the given paths that are files on this machine to the worker first (only "
                                 "what it does not hold yet) and run on those copies: no shared filesystem needed")
    job_output.add_argument("--pkg-path", metavar="PKG.zip",
                            help="deprecated: a SLEAP training job package on this machine (Export Training Job "
                                 "Package...); it is uploaded and runs as exported")
    job_output.add_argument("--worker-pkg-path", metavar="PATH",
                            help="deprecated: a SLEAP training job package already on the worker's shared storage; "
                                 "unpacked and run next to itself")
    job_output.add_argument("--download", default=".", metavar="DIR",
                            help="where predictions go (default: current dir)")
    job_output.add_argument("--path-map", action="append", type=_path_map, metavar="OLD=NEW",
                            help="video paths inside labels files that start with OLD start with NEW on the worker "
                                 r"(repeatable; Windows paths such as D:\videos map too); sleap-nn reads a copy of "
                                 "the labels, the original is never changed")
    job_output.add_argument("--non-interactive", action="store_true",
                            help="when the worker rejects paths, print its candidates and exit with code "
                                 f"{PATH_REJECTED} instead of asking (the default without a terminal)")
    p = commands.add_parser("train", parents=[common, job_output],
                            help="train a model on the worker (paths are paths on the worker), or run a package")
    p.add_argument("--config", help="sleap-nn training config (YAML) on the worker (with --upload: or here)")
    p.add_argument("--labels", help="training labels (.slp), overriding the config")
    p.add_argument("--val-labels", help="validation labels (.slp)")
    p.add_argument("--max-epochs", type=int, help="1-10000")
    p.add_argument("--batch-size", type=int, help="1-1024, for training and validation")
    p.add_argument("--learning-rate", type=float, help="> 0 and <= 1")
    p.add_argument("--run-name", help="name of the model directory")
    p.add_argument("--resume", metavar="CKPT", help="checkpoint to resume from")
    p.add_argument("--no-progress", action="store_true", help="logs only, no live loss (skips sleap-nn's ZMQ)")
    p.add_argument("--verbose", action="store_true", help="print sleap-nn's output as it comes")
    p.set_defaults(run=cmd_train)

    p = commands.add_parser("track", parents=[common, job_output],
                            help="run inference on the worker and download the predictions")
    p.add_argument("--data-path", help="video or labels on the worker (with --upload: or here)")
    p.add_argument("--model-paths", action="append", help="model directory on the worker (repeatable)")
    p.add_argument("--output", help="predictions path on the worker (default: in the job directory)")
    p.add_argument("--batch-size", type=int, help="1-1024")
    p.add_argument("--peak-threshold", type=float, help="0-1")
    p.add_argument("--frames", help='frame ranges, e.g. "0-100,500-600"')
    p.add_argument("--only-suggested-frames", action="store_true", help="the same as --frame-filter suggested")
    p.add_argument("--frame-filter", choices=list(P.FRAME_FILTERS),
                   help="of a labels file, predict only the suggested, user-labeled or already predicted frames")
    p.add_argument("--video-index", type=int, metavar="N", help="of a labels file, only its video N (from 0)")
    p.add_argument("--exclude-user-labeled", action="store_true", help="skip frames a person labeled")
    p.add_argument("--no-progress", action="store_true", help="a package's training without live loss (no ZMQ)")
    p.add_argument("--verbose", action="store_true", help="print sleap-nn's output as it comes")
    p.set_defaults(run=cmd_track)

    p = commands.add_parser("run", parents=[common],
                            help="run a command the worker's admin allowed (worker --allow-command NAME=EXECUTABLE)")
    p.add_argument("name", help="the allowed command's name, e.g. convert")
    p.add_argument("args", nargs=argparse.REMAINDER, help="-- then its arguments, passed as they are (no shell); "
                   "a path must lie in the worker's mounts or the job's directory")
    p.add_argument("--worker-id", default=argparse.SUPPRESS,
                   help="run on this worker (by default the best that offers the command)")
    p.add_argument("--detach", action="store_true", help="return once the worker accepted the job")
    p.add_argument("--log-dir", default="sleap-rtc-jobs", metavar="DIR", help="local job logs (default: %(default)s)")
    p.add_argument("--non-interactive", action="store_true", help="never prompt")
    p.set_defaults(run=cmd_run, min_gpu_memory=0, verbose=True, download=".")

    p = commands.add_parser("files", parents=[common],
                            help="the worker's upload store: `files ls`, or `files rm SHA256...` (a prune job)")
    p.add_argument("action", choices=["ls", "rm"])
    p.add_argument("sha256", nargs="*", help="rm: the uploads to remove, by SHA-256 or its first 6+ digits")
    p.add_argument("--dry-run", action="store_true", help="rm: only say what would go")
    p.add_argument("--json", action="store_true", help="ls: one JSON document (fields in the README)")
    p.add_argument("--worker-id", default=argparse.SUPPRESS, help="the worker (default: the first available)")
    p.add_argument("--log-dir", default="sleap-rtc-jobs", metavar="DIR", help="local job logs (default: %(default)s)")
    p.set_defaults(run=cmd_files, min_gpu_memory=0, verbose=True, download=".", detach=False, non_interactive=True)

    p = commands.add_parser("replicate", parents=[common],
                            help="copy a finished job's model or predictions to another worker in the room")
    p.add_argument("job_id", metavar="JOB")
    p.add_argument("--to", required=True, metavar="WORKER", help="the worker that gets them")
    p.add_argument("--log-dir", default="sleap-rtc-jobs", metavar="DIR", help="local job logs (default: %(default)s)")
    p.set_defaults(run=cmd_replicate, min_gpu_memory=0, verbose=True, download=".", detach=False,
                   non_interactive=True)

    p = commands.add_parser("prune", parents=[common],
                            help="remove the files of old finished jobs and unused uploads (the ledger keeps "
                                 "every record)")
    p.add_argument("--older-than", type=_duration, default=30 * 86400.0, metavar="AGE",
                   help="jobs finished, and uploads last used, longer ago than this: 30d (default), 12h, 90m")
    p.add_argument("--keep-failed", action="store_true", help="keep failed jobs' files whatever their age")
    p.add_argument("--dry-run", action="store_true", help="only say what would go")
    p.add_argument("--worker-id", default=argparse.SUPPRESS,
                   help="prune this worker (default: every worker in the room, in turn)")
    p.add_argument("--log-dir", default="sleap-rtc-jobs", metavar="DIR", help="local job logs (default: %(default)s)")
    p.set_defaults(run=cmd_prune, min_gpu_memory=0, verbose=True, download=".", detach=False,
                   non_interactive=True)

    job_holder = argparse.ArgumentParser(add_help=False)
    job_holder.add_argument("job_id", metavar="JOB")
    job_holder.add_argument("--worker-id", default=argparse.SUPPRESS,
                            help="the worker holding the job (default: the one remembered "
                                                "in ~/.sleap-rtc/jobs/, else every worker in the room is asked)")
    p = commands.add_parser("jobs", parents=[common], help="list the jobs of every worker in the room")
    p.add_argument("--worker-id", default=argparse.SUPPRESS, help="only this worker's jobs")
    p.add_argument("--state", choices=P.JOB_STATES, help="only jobs in this state")
    p.add_argument("--sql", metavar="SELECT", help="a read-only query over each worker's ledger (table jobs), "
                   "rows merged; e.g. \"SELECT submitter, SUM(duration_s)/3600 AS hours FROM jobs GROUP BY submitter\"")
    p.add_argument("--json", action="store_true", help="one JSON document (fields in the README); with --sql, "
                                                       "the rows as a JSON list")
    p.set_defaults(run=cmd_jobs)
    p = commands.add_parser("status", parents=[common, job_holder], help="everything the worker recorded of a job")
    p.add_argument("--json", action="store_true", help="one JSON document (fields in the README)")
    p.set_defaults(run=cmd_status)
    p = commands.add_parser("logs", parents=[common, job_holder], help="a job's full log from its first line")
    p.add_argument("--follow", action="store_true", help="then keep printing until the job ends")
    p.set_defaults(run=cmd_logs)
    p = commands.add_parser("fetch", parents=[common, job_holder],
                            help="download a completed job's results (model files or predictions), checked")
    p.add_argument("--download", default=".", metavar="DIR", help="files go to DIR/JOB (default: current dir)")
    p.set_defaults(run=cmd_fetch)
    for action, text in (("stop", "stop a training early; the model is kept"),
                         ("cancel", "cancel a job; a queued one leaves the queue at once")):
        p = commands.add_parser(action, parents=[common, job_holder], help=text)
        p.set_defaults(run=cmd_control)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.no_direct:
        os.environ[P.ENV_NO_DIRECT] = "1"  # where the link reads it
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s")
    try:
        return args.run(args)
    except P.SleapRTCError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def exit_now(code: int) -> None:
    """End the process with `code` once its output is flushed, without tearing down the
    interpreter: with aiortc's loop and matplotlib loaded that takes a quarter second, after
    everything was closed. It exits the normal way instead while a thread that is no daemon
    still runs (a normal exit waits for it), or when the output cannot be flushed."""
    if not isinstance(code, int) or any(t.is_alive() and not t.daemon for t in threading.enumerate()
                                        if t is not threading.main_thread()):
        raise SystemExit(code)
    logging.shutdown()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):  # e.g. a closed pipe: Python's own exit reports it
        raise SystemExit(code) from None
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
