"""The sleap-rtc worker: joins a room as a GPU worker and serves clients over WebRTC.

    python worker.py --room R --token T [--server URL] [--http URL] [--name N] [--mount PATH[:LABEL]]...
                     [--working-dir DIR] [--gpu N] [--slots N] [--advertise-gpu-memory MB]
                     [--sleap-nn PATH] [--reservation-timeout S] [--stop-grace S]
                     [--follower-backlog MB] [--upload-cache-gb GB] [--maintenance]
                     [--min-free-gb GB] [--keep-days N] [--allow-command NAME=EXECUTABLE]...
                     [--allow-env NAME]... [--no-direct] [--require-room-secret]
                     [--admin USER]... [--run-as USER] [--slurm [--slurm-partition P ...]] [-v]

Jobs beyond --slots wait in a queue. Every job is kept in WORKING_DIR/jobs.sqlite, with
its log under WORKING_DIR/jobs/JOB/, across restarts. What clients upload is kept by
content in WORKING_DIR/uploads/ (SLEAP training packages among it). Besides train and
track, a worker runs prune and replicate jobs, and the commands its admin allowed; with
--slurm, every step is a SLURM batch job. `worker.py slurm-step`, `prune-step` and
`replicate-step` are the worker's own steps, started by it, not by hand. Unmodified
sleap-rtc 0.0.7 clients (CLI and Python API) are served too, in their own dialect.

With no --server and nothing listening on ws://127.0.0.1:8080, the worker starts the
signaling server in-process (signaling.py beside this file), creates a room and prints
what a client needs.

This file and protocol.py alone, next to an installed sleap-nn, are a whole worker.
packages.py, replicas.py, slurm.py and upstream.py beside them add what their names say
(see "Optional capabilities"). Read top to bottom, the sections follow a job's path:

1. constants and the data model (mounts, paths refused);
2. optional capabilities; what this machine offers; the embedded signaling server;
3. `Worker`: registration, dispatching signaling frames, answering job requests; `Status`;
4. `Session`: one client link, its reader and its one writer (`Outbox`), for a `Member`;
5. `Ledger` and `Scheduler`: every job's record, slots and the queue;
6. `Job` and `JobLog`: one job's steps, its output and its state;
7. executors (`LocalExecutor`; slurm.py's), then each step's sleap-nn argument list;
8. command jobs;
9. validation at acceptance: paths and the config, checkpoints, videos, file listings;
10. the upload store; pruning; the command line.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import glob
import importlib.metadata
import importlib.util
import json
import logging
import os
import queue
import re
import secrets
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Protocol

import protocol as P

log = logging.getLogger("sleap_rtc.worker")

# ---------------------------------------------------------------------------------------
# Constants and data model
# ---------------------------------------------------------------------------------------

WORKER_ROLE = "worker"
WORKER_TAGS = ["sleap-rtc", *P.JOB_TYPE_TAGS.values()]
DEFAULT_WORKING_DIR = "sleap-rtc-worker"
EMBEDDED_STATE_FILE = "signaling-state.json"
ROOM_ENV_FILE = "room.env"
WORKER_ID_FILE = "worker-id"
WORKER_KEY_FILE = "worker-key"
UPLOADS_DIR = "uploads"
JOBS_DIR = "jobs"
CONFIG_FILE = "config.yaml"  # the validated copy of a training config, in the job's directory
# Defaults of the worker's options (see build_parser).
STOP_GRACE_S = 120.0  # after this long without train_end, a stop becomes SIGINT (once)
CANCEL_GRACE_S = 10.0  # after SIGTERM, SIGKILL
RESERVATION_TIMEOUT_S = 30.0  # how long an assigned slot waits for its job's spec, by default
MIN_FREE_GB = 2.0  # below this much free space in its working dir, a worker takes no new jobs
# A follower with more than this much of one job's output waiting for its link is detached
# from that job (the job, its log and other followers are untouched).
FOLLOWER_BACKLOG_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class Mount:
    """A directory tree clients may name paths in, less `exclude` (the worker's own files
    where they lie inside it); `label` is what discovery shows."""

    path: Path
    label: str
    exclude: tuple[Path, ...] = ()

    def public(self) -> dict:
        return {"path": str(self.path), "label": self.label}

    def contains(self, resolved: Path) -> bool:
        return (resolved == self.path or resolved.is_relative_to(self.path)) and \
            not any(resolved == e or resolved.is_relative_to(e) for e in self.exclude)

    def without(self, private: list[Path]) -> "Mount":
        return dataclasses.replace(self, exclude=tuple(p for p in private if p.is_relative_to(self.path)))


def private_paths(working_dir: Path) -> list[Path]:
    """What of a worker's working directory no client may name through a mount that holds
    it: the ledger, the room's token, the embedded server's state (every room's token),
    the worker's key, and its jobs and uploads (readable through mounts of their own,
    never writable)."""
    names = [JOBS_DIR, UPLOADS_DIR, ROOM_ENV_FILE, WORKER_ID_FILE, WORKER_KEY_FILE, EMBEDDED_STATE_FILE,
             EMBEDDED_STATE_FILE + ".tmp", LEDGER_FILE, LEDGER_FILE + "-wal", LEDGER_FILE + "-shm",
             LEDGER_FILE + "-journal"]
    return [working_dir / name for name in names]


def parse_mount(text: str) -> Mount:
    """`PATH` or `PATH:LABEL`; the path must be an existing directory."""
    path, label = text.rsplit(":", 1) if ":" in text else (text, "")
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_dir():
        raise argparse.ArgumentTypeError(f"mount {path!r} is not an existing directory")
    return Mount(resolved, label or resolved.name or str(resolved))


MAX_PATH_CHARS = 4096


class JobSetupError(Exception):
    """A job cannot run as accepted (its paths changed, its package is missing or bad);
    the message says why. Nothing was started."""


class PathRefused(Exception):
    """A path from a peer that the worker will not use; `code` is the spec error code."""

    def __init__(self, message: str, code: str = "BAD_PATH"):
        super().__init__(message)
        self.code = code


def resolve_in_mounts(path: str, mounts: list[Mount], base: Optional[Path] = None) -> Path:
    """The real path of `path` (symlinks resolved) if it lies inside a mount.

    A relative path is taken relative to `base`, and refused when there is none. Raises
    PathRefused: BAD_PATH for what is not a usable path (NUL bytes, too long, unknown
    ~user), ACCESS_DENIED for a path outside the mounts.
    """
    shown = path if len(path) <= 200 else path[:200] + "..."
    if "\x00" in path:
        raise PathRefused(f"{shown!r} contains a NUL byte")
    if len(path) > MAX_PATH_CHARS:
        raise PathRefused(f"{shown} is longer than {MAX_PATH_CHARS} characters")
    try:
        candidate = Path(path).expanduser()
        if not candidate.is_absolute():
            if base is None:
                raise PathRefused(f"{shown} is not an absolute path on the worker")
            candidate = base / candidate
        resolved = candidate.resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # ~nosuchuser, too many links, name too long
        raise PathRefused(f"{shown} is not a usable path on the worker: {exc}") from None
    if not any(m.contains(resolved) for m in mounts):
        raise PathRefused(f"Access denied: {shown} is outside the worker's mounts", "ACCESS_DENIED")
    return resolved


# ---------------------------------------------------------------------------------------
# Optional capabilities: role files of their own, beside this one
# ---------------------------------------------------------------------------------------
# worker.py and protocol.py alone run structured train and track jobs, commands, prune
# and the ledger: the copy an HPC node needs. Each capability below is a file of
# its own, imported the first time it is needed; a worker without it says so at start-up,
# leaves it out of what it offers and refuses what needs it, naming the file.

OPTIONAL_FILES = {P.PACKAGE: "packages.py", P.REPLICATE: "replicas.py", "slurm": "slurm.py",
                  "upstream": "upstream.py"}
OPTIONAL_SERVES = {P.PACKAGE: "SLEAP training packages", P.REPLICATE: "replicas", "slurm": "SLURM (--slurm)",
                   "upstream": "sleap-rtc 0.0.7 clients"}


class CapabilityMissing(JobSetupError):
    """What was asked needs an optional role file this worker's directory lacks (a job
    that needs it cannot run: hence a JobSetupError)."""

    def __init__(self, name: str):
        super().__init__(missing_reason(name))

    def spec_error(self, field: str) -> dict:
        return P.spec_error(field, str(self), "UNSUPPORTED")


def missing_reason(name: str) -> str:
    """Why this worker refuses what needs capability `name`."""
    return f"this worker does not serve {OPTIONAL_SERVES[name]}: {OPTIONAL_FILES[name]} is not beside its worker.py"


def capabilities() -> list[str]:
    """The optional capabilities whose files lie beside this one."""
    here = Path(__file__).resolve().parent
    return [name for name, file in OPTIONAL_FILES.items() if (here / file).is_file()]


def optional(name: str):
    """The optional role file of capability `name`: imported from beside this file the
    first time, the same module after (even if the file went since). CapabilityMissing
    names the file when it is not there."""
    module_name = Path(OPTIONAL_FILES[name]).stem
    if module_name in sys.modules:
        return sys.modules[module_name]
    path = Path(__file__).resolve().parent / OPTIONAL_FILES[name]
    if not path.is_file():
        raise CapabilityMissing(name)
    # By its path: a module of the same name elsewhere on sys.path is never taken for it.
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


# ---------------------------------------------------------------------------------------
# What this machine offers
# ---------------------------------------------------------------------------------------


def gpu_facts(gpu_index: int, probe_torch: bool = True) -> dict:
    """GPU memory, model and CUDA version: from torch (unless `probe_torch` is False: it
    takes seconds to import), else nvidia-smi, else CPU fallbacks."""
    try:
        if probe_torch:
            import torch

            if torch.cuda.is_available() and gpu_index < torch.cuda.device_count():
                props = torch.cuda.get_device_properties(gpu_index)
                return {"gpu_memory_mb": props.total_memory // 2**20, "gpu_model": props.name,
                        "cuda_version": torch.version.cuda or "N/A"}
    except Exception as exc:  # a broken CUDA install must not stop the worker
        log.info("torch did not report a GPU (%s)", exc)
    try:
        name, memory = _nvidia_smi(gpu_index, "name,memory.total", timeout=10)
        header = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=10).stdout
        cuda = re.search(r"CUDA Version:\s*([\d.]+)", header)
        return {"gpu_memory_mb": int(float(memory)), "gpu_model": name,
                "cuda_version": cuda.group(1) if cuda else "N/A"}
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return {"gpu_memory_mb": 0, "gpu_model": "CPU", "cuda_version": "N/A"}


GPU_SAMPLE_S = 2.0  # how often the GPU load in job responses is refreshed


def gpu_load(gpu_index: int) -> tuple[Optional[int], Optional[int]]:
    """Utilization in percent and free memory in MB now, from nvidia-smi; (None, None) without one."""
    try:
        utilization, free = _nvidia_smi(gpu_index, "utilization.gpu,memory.free", timeout=5)
        return int(float(utilization)), int(float(free))
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None, None


def _nvidia_smi(gpu_index: int, fields: str, timeout: float) -> list[str]:
    """The values of `fields` (nvidia-smi --query-gpu) for one GPU."""
    query = subprocess.run(
        ["nvidia-smi", f"--id={gpu_index}", f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
        capture_output=True, text=True, timeout=timeout, check=True)
    return [part.strip() for part in query.stdout.strip().splitlines()[0].split(",")]


def sleap_nn_version() -> str:
    try:
        return importlib.metadata.version("sleap-nn")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def sleap_nn_executable() -> str:
    """sleap-nn from this Python's environment (a venv need not be activated), else from PATH."""
    beside = Path(sys.executable).parent / "sleap-nn"
    return str(beside) if beside.exists() else (shutil.which("sleap-nn") or "sleap-nn")


def worker_peer_id(working_dir: Path, name: str) -> tuple[str, str]:
    """A peer id and its key, kept in the working directory: a restarted worker is the same
    peer, and the key claims the id in its room (nobody else registers it, and the worker
    takes it back from a connection of its own that still lingers)."""
    id_file, key_file = working_dir / WORKER_ID_FILE, working_dir / WORKER_KEY_FILE
    if not id_file.exists():
        safe = re.sub(r"[^A-Za-z0-9._-]", "-", name)[:60]
        id_file.write_text(f"worker-{safe}-{secrets.token_hex(3)}\n")
    if not key_file.exists():
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(P.new_secret(32) + "\n")
    return id_file.read_text().strip(), key_file.read_text().strip()


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
# The worker
# ---------------------------------------------------------------------------------------


@dataclass
class WorkerConfig:
    """What the worker's command line decides (see build_parser for each option)."""

    server_url: str
    room_id: str
    token: str
    working_dir: Path
    name: str
    mounts: list[Mount]
    gpu_index: int
    sleap_nn: str  # the sleap-nn executable
    slots: int = 1
    advertise_gpu_memory: Optional[int] = None  # MB; None: what torch says
    maintenance: bool = False
    reservation_timeout: float = RESERVATION_TIMEOUT_S
    stop_grace: float = STOP_GRACE_S
    follower_backlog: int = FOLLOWER_BACKLOG_BYTES
    upload_cap: Optional[int] = None  # bytes
    allowed_commands: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> executable
    allowed_env: set[str] = dataclasses.field(default_factory=set)  # secret-looking variables commands still see
    min_free_gb: float = MIN_FREE_GB
    keep_days: Optional[float] = None  # prune finished jobs older than this, daily
    # sleap-rtc 0.0.7 clients must answer AUTH_CHALLENGE with the room secret's HMAC
    # (without it, AUTH_RESPONSE::missing passes: the room let them in already).
    require_room_secret: bool = False
    admins: set[str] = dataclasses.field(default_factory=set)  # users who may change every member's jobs


class Worker:
    """Registers in a room and answers offers; owns its sessions and the embedded server.

    The main thread runs `serve()`, which dispatches signaling frames and never waits on
    a peer, until `stop()`. Each session has its own threads; "status-publisher" (Status)
    sends status changes to the server, "gpu-sampler" (where nvidia-smi exists) keeps the
    GPU load fresh and "pruner" (with --keep-days) prunes daily; `stop()` ends them all.
    """

    def __init__(self, config: WorkerConfig, executor: Optional[Executor] = None, embedded=None):
        working_dir, mounts, name = config.working_dir, config.mounts, config.name
        self.server_url = config.server_url
        self.room_id = config.room_id
        self.token = config.token  # for the steps that join the room themselves (replicate), and 0.0.7 clients
        self.require_room_secret = config.require_room_secret
        self.admins = config.admins
        self.working_dir = working_dir
        # Where jobs may write: the admin's mounts, less the worker's own files in them.
        self.mounts = [m.without(private_paths(working_dir)) for m in mounts]
        # Besides the mounts, clients read what they uploaded and what their jobs made.
        self.stores = [Mount(working_dir / UPLOADS_DIR, "uploads"), Mount(working_dir / JOBS_DIR, "jobs")]
        self.readable_mounts = self.mounts + self.stores
        self.allowed_commands = config.allowed_commands
        self.allowed_env = config.allowed_env
        self._queries = threading.BoundedSemaphore(SQL_AT_ONCE)  # ledger queries running now
        min_free_bytes = int(config.min_free_gb * 1e9)
        self.uploads = UploadStore(working_dir / UPLOADS_DIR, config.upload_cap, self.needed_uploads, min_free_bytes)
        self.capabilities = capabilities()
        self.job_types = [P.TRAIN, P.TRACK, P.PRUNE, *(c for c in (P.REPLICATE, P.PACKAGE) if c in self.capabilities),
                          *(f"{P.COMMAND}:{name}" for name in sorted(self.allowed_commands))]
        self.embedded = embedded
        self.gpu_index = gpu_index = config.gpu_index
        self.follower_backlog = config.follower_backlog
        self.peer_id, peer_key = worker_peer_id(working_dir, name)
        self.stopping = threading.Event()
        # Guards sessions, the live client links by peer id.
        self._sessions_lock = threading.Lock()
        self.sessions: dict[str, Session] = {}
        # Utilization % and free MB, replaced whole by "gpu-sampler" and read by the dispatcher.
        self.gpu_now: tuple[Optional[int], Optional[int]] = (None, None)
        executor = executor or LocalExecutor()
        self.scheduler = Scheduler(working_dir, config.slots, config.sleap_nn, lambda job: self.status.changed(),
                                   config.reservation_timeout, config.stop_grace, Planner(self).plan, executor)
        self.status = Status(self.scheduler, working_dir, min_free_bytes, config.maintenance)
        self._threads: list[threading.Thread] = []
        self.keep_days = config.keep_days
        if self.keep_days is not None:
            self._threads.append(threading.Thread(target=P.guarded(self._prune_forever), name="pruner", daemon=True))
        if shutil.which("nvidia-smi"):
            self.gpu_now = gpu_load(gpu_index)
            self._threads.append(threading.Thread(target=P.guarded(self._sample_gpu_forever), name="gpu-sampler",
                                                 daemon=True))
        facts = gpu_facts(gpu_index, probe_torch=config.advertise_gpu_memory is None)
        if config.advertise_gpu_memory is not None:
            facts["gpu_memory_mb"] = config.advertise_gpu_memory
        self.metadata = {
            "tags": list(WORKER_TAGS),
            "properties": {
                **facts,
                **executor.describe(),
                "sleap_nn_version": sleap_nn_version(),
                "hostname": socket.gethostname(),
                "worker_name": name,
                "max_concurrent_jobs": config.slots,
                "supported_job_types": ["training", "inference"],  # as sleap-rtc 0.0.7 workers say it
                "job_types": self.job_types,
                "capabilities": self.capabilities,
                "mounts": [m.public() for m in mounts],
                **self.status.now(),
            },
        }
        self.signaling = P.SignalingClient(config.server_url, config.room_id, config.token, self.peer_id, WORKER_ROLE,
                                           self.metadata, peer_key=peer_key)
        self.status.signaling = self.signaling

    def serve(self) -> None:
        self.scheduler.start()
        self.signaling.connect()
        self.status.start()
        for thread in self._threads:
            thread.start()
        props = self.metadata["properties"]
        lines = [f"worker: registered as {self.peer_id} in room {self.room_id} "
                 f"({props['gpu_model']}, {props['gpu_memory_mb']} MB)"]
        missing = [f"{OPTIONAL_SERVES[c]} (no {OPTIONAL_FILES[c]})" for c in OPTIONAL_FILES
                   if c not in self.capabilities]
        lines.append(f"worker: serves structured train and track jobs, commands, prune"
                     f"{''.join(f', {OPTIONAL_SERVES[c]}' for c in self.capabilities)}"
                     f"{'; not ' + ', '.join(missing) if missing else ''}")
        if "upstream" in self.capabilities:
            session_string = optional("upstream").upstream_session_string(self.room_id, self.token, self.peer_id)
            lines.append(f"worker: sleap-rtc 0.0.7 clients: --session-string {session_string}")
        print("\n".join(lines), flush=True)
        handlers = {
            P.OFFER: self._start_session,
            P.PEER_MESSAGE: self._on_peer_message,
            P.ERROR: lambda frame: log.warning("signaling error: %s %s", frame.get("code"), frame.get("message")),
        }
        while not self.stopping.is_set():
            # Polls: `stopping` is set from a signal handler, which must take no lock to wake this.
            frame = self.signaling.next(timeout=0.5)
            handler = handlers.get(frame.get("type")) if frame is not None else None
            if handler is None:
                continue
            try:
                handler(frame)
            except Exception:  # one peer's odd frame must not stop the worker serving the rest
                log.exception("could not handle a %s frame from %s", frame.get("type"),
                              frame.get("sender") or frame.get("from_peer_id"))

    def _start_session(self, offer: dict) -> None:
        with self._sessions_lock:
            if self.stopping.is_set():
                return
            session = Session(self, offer, replaces=self.sessions.get(offer["sender"]))
            self.sessions[session.peer_id] = session
        session.thread.start()

    def session_ended(self, session: Session) -> None:
        with self._sessions_lock:
            if self.sessions.get(session.peer_id) is session:
                del self.sessions[session.peer_id]

    # -- choosing a worker and asking about jobs, over signaling --------------------------

    def _on_peer_message(self, frame: dict) -> None:
        """Answer an app message over signaling; each handler gives the reply, or None
        when it answers on its own."""
        payload, sender = frame.get("payload"), frame.get("from_peer_id")
        kind = payload.get(P.APP_MESSAGE_TYPE) if isinstance(payload, dict) else None
        if not isinstance(kind, str):  # a member's odd payload is ignored, not a traceback in the log
            log.debug("ignored a peer message from %s: %.200s", sender, payload)
            return
        handler = {P.APP_JOB_REQUEST: self._job_response, P.APP_JOB_ASSIGNMENT: self._assign,
                   P.APP_JOBS_QUERY: self._jobs_query}.get(kind)
        if handler is None:
            log.debug("ignored a peer message from %s: %.200s", sender, payload)
            return
        reply = handler(sender, payload)
        if reply is None:
            return
        try:
            self.signaling.send_to_peer(sender, reply)
        except P.SignalingError as exc:
            log.info("could not answer %s: %s", sender, exc)

    def _assign(self, sender: str, payload: dict) -> dict:
        """A client chose this worker for a job: keep a slot for it while its spec comes."""
        job_id = P.job_id_in(payload)
        position = self.scheduler.reserve(job_id)
        log.info("assigned job %s by %s: %s", job_id, sender,
                 "slot reserved" if position == 0 else f"it will queue at position {position}")
        return P.app_job_assigned(job_id, position)

    def _jobs_query(self, sender: str, payload: dict) -> Optional[dict]:
        query = P.JobsQuery.read(payload)
        if query.sql is not None:
            self._query_ledger(sender, query)  # answers from a thread of its own
            return None
        return self._jobs_list(query)

    def _query_ledger(self, sender: str, query: P.JobsQuery) -> None:
        """Answer a ledger query on a thread of its own ("ledger-query"), so that a slow one
        never holds up the dispatcher; at most SQL_AT_ONCE run at a time."""
        if not self._queries.acquire(blocking=False):
            self.signaling.send_to_peer(sender, P.app_jobs_list(query.request_id,
                                                                error="busy with other queries; ask again"))
            return

        def run() -> None:
            try:
                answer = query_ledger(self.working_dir / LEDGER_FILE, query.sql)
                log.info("ledger query from %s: %s", sender, answer.get("error") or f"{len(answer['rows'])} rows")
                self.signaling.send_to_peer(sender, P.app_jobs_list(query.request_id, **answer))
            except P.SignalingError as exc:
                log.info("could not answer %s: %s", sender, exc)
            finally:
                self._queries.release()

        threading.Thread(target=P.guarded(run), name="ledger-query", daemon=True).start()

    def _job_response(self, sender: str, payload: dict) -> dict:
        """Accept (with queue position and estimates) or refuse with a reason."""
        props, request = self.metadata["properties"], P.JobRequest.read(payload)
        wanted, need = request.wanted, request.min_gpu_memory_mb
        reply = P.app_job_response(request.job_id, False, self._worker_info())
        refused = self.status.refusal(request.job_type)
        if refused:
            reply.update(reason=refused[0], message=refused[1])
        elif wanted not in self.job_types:
            why = missing_reason(wanted) if wanted in OPTIONAL_FILES and wanted not in self.capabilities \
                else f"this worker does not offer {P.echo(wanted)}"
            reply.update(reason="incompatible", message=f"{why}; it offers {', '.join(self.job_types)}")
        elif request.problem:
            reply.update(reason="bad_request", message=request.problem)
        elif need > props["gpu_memory_mb"]:
            reply.update(reason="insufficient_gpu_memory",
                         message=f"the job needs {need} MB of GPU memory; this worker has {props['gpu_memory_mb']} MB")
        else:
            reply.update(accepted=True, reason=None, **self.scheduler.estimate(request.job_type))
        return reply

    def _worker_info(self) -> dict:
        utilization, free = self.gpu_now
        advertised = self.metadata["properties"]["gpu_memory_mb"]
        return {"gpu_utilization": utilization,
                "available_memory_mb": advertised if free is None else min(free, advertised)}

    def _jobs_list(self, query: P.JobsQuery) -> dict:
        """One job's full record (`job_id`), or a summary of every job (optionally of one state)."""
        reply = P.app_jobs_list(query.request_id, jobs=[])
        if query.job_id:
            record = self.scheduler.record(query.job_id)
            reply["jobs"] = [record] if record else []
        elif query.state not in (None, *P.JOB_STATES):
            reply["error"] = f"unknown state {P.echo(query.state)}; one of {', '.join(P.JOB_STATES)}"
        else:
            reply["jobs"] = [{k: r[k] for k in JOB_SUMMARY_FIELDS}
                             for r in self.scheduler.ledger.select(state=query.state)]
        return reply

    config_file = CONFIG_FILE  # where a training's checked config lies in its job's directory

    def validate(self, spec: dict, job_dir: Path) -> tuple[list[dict], dict]:
        """A train or track spec checked against this worker's mounts (see validate_job)."""
        return validate_job(spec, self.readable_mounts, self.mounts, job_dir, self.uploads.directory,
                            self.scheduler.ledger.model_digests)

    def store_listing(self) -> list[dict]:
        """The upload store as `client.py files ls` shows it."""
        return self.uploads.listing(self.scheduler.ledger.select(limit=-1), self.needed_uploads())

    def store_problem(self, spec: dict) -> Optional[str]:
        """Why a path the job names in the upload store must not be used (its bytes changed
        since they were stored), or None."""
        for path in _named_paths(spec):
            problem = self.uploads.verify(path)
            if problem:
                return problem
        return None

    def needed_uploads(self) -> set[str]:
        """The hashes in the upload store that queued or running jobs name."""
        return {self.uploads.content_of(text) for spec in self.scheduler.live_specs()
                for text in _named_paths(spec)} - {None}

    def _prune_forever(self) -> None:
        """Thread "pruner" (worker --keep-days): submit a prune job at start and every day after."""
        spec = {"type": P.PRUNE, "older_than_s": self.keep_days * 86400.0, "_resolved": {}, "_scope": {"all": True}}
        while not self.stopping.is_set():
            job_id = P.new_job_id()
            _, errors = self.scheduler.submit(job_id, spec, "worker --keep-days", lambda name, payload: None)
            log.info("prune job %s (--keep-days %g)%s", job_id, self.keep_days,
                     f" not submitted: {errors[0]['message']}" if errors else " submitted")
            self.stopping.wait(PRUNE_EVERY_S)

    def _sample_gpu_forever(self) -> None:
        """Thread "gpu-sampler" (only where nvidia-smi exists): keep the GPU load fresh, so
        that answering a job request never waits for nvidia-smi."""
        while not self.stopping.wait(GPU_SAMPLE_S):
            self.gpu_now = gpu_load(self.gpu_index)

    def stop(self) -> None:
        """Cancel running jobs (queued ones stay queued), close every link, deregister,
        stop the embedded server."""
        with self._sessions_lock:  # no session starts after this
            self.stopping.set()
        self.status.stop()
        self.scheduler.stop()  # first: a client following a cancelled job hears why before its link closes
        with self._sessions_lock:
            sessions = list(self.sessions.values())
        for session in sessions:
            session.end()
        for session in sessions:
            session.thread.join(timeout=SESSION_JOIN_S)
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout=5)
        self.signaling.close()
        if self.embedded is not None:
            self.embedded.stop()


class Status:
    """What discovery shows of this worker's state, and the thread that keeps the
    server's copy fresh.

    Thread "status-publisher" (`start`, `stop`) sends the status whenever `changed()` was
    called, and looks at the free disk space every DISK_CHECK_S. Scheduler and job
    threads call `changed()`, which never waits.
    """

    def __init__(self, scheduler: "Scheduler", working_dir: Path, min_free_bytes: int, maintenance: bool):
        self.scheduler = scheduler
        self.working_dir = working_dir
        self.min_free_bytes = min_free_bytes
        self.maintenance = maintenance
        self.low_disk = self.disk_problem()  # why new jobs are refused for lack of space, or None
        self.signaling: Optional[P.SignalingClient] = None  # set before the first publish
        # Guards _published, the status last sent to the server: updates go one at a time, in order.
        self._publish_lock = threading.Lock()
        self._published: Optional[dict] = None
        self._changed = threading.Event()  # set by changed() and stop(): wakes the publisher
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=P.guarded(self._publish_forever), name="status-publisher", daemon=True)

    def start(self) -> None:
        """Publish the status now, then whenever it changes (`signaling` set)."""
        self.publish()
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._changed.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def now(self) -> dict:
        status = self.scheduler.status()
        if self.maintenance:
            return {**status, "status": P.MAINTENANCE}
        if self.low_disk:
            return {**status, "status": P.LOW_DISK, "refusing": self.low_disk}
        return {**status, "refusing": None}

    def disk_problem(self) -> Optional[str]:
        """Why this worker must take no new job for lack of disk space, or None."""
        try:
            free = shutil.disk_usage(self.working_dir).free
        except OSError as exc:
            return f"cannot tell the free space in {self.working_dir}: {exc}"
        if free >= self.min_free_bytes:
            return None
        return (f"only {free / 1e9:.1f} GB free in {self.working_dir}; this worker keeps "
                f"{self.min_free_bytes / 1e9:g} GB free (--min-free-gb). Its old jobs can be pruned "
                "(`client.py prune`)")

    def refusal(self, job_type: Optional[str], check_disk: bool = True) -> Optional[tuple[str, str]]:
        """Why this worker takes no new job of `job_type` now, as (reason, message), or
        None. The disk is looked at now, not at the last check: a job accepted onto a full
        disk fails later. A prune is taken on a full disk: it frees it."""
        if self.maintenance:
            return "maintenance", MAINTENANCE_MESSAGE
        problem = self.disk_problem() if check_disk and job_type != P.PRUNE else None
        return ("low_disk", problem) if problem else None

    def changed(self) -> None:
        """The status may have changed: wake the publisher, never wait for it."""
        self._changed.set()

    def publish(self) -> None:
        with self._publish_lock:
            status = self.now()
            if status == self._published:
                return
            try:
                self.signaling.update_metadata({"properties": status})
                self._published = status
            except P.SignalingError as exc:  # kept locally; sent again on re-registration
                log.warning("could not publish status %s: %s", status["status"], exc)

    def _publish_forever(self) -> None:
        checked = time.monotonic()
        while not self._stopping.is_set():
            if time.monotonic() - checked >= DISK_CHECK_S:
                checked = time.monotonic()
                problem = self.disk_problem()
                if problem != self.low_disk:
                    self.low_disk = problem
                    log.warning("%s", problem or "enough free disk space again; taking new jobs")
                    self._changed.set()
            if self._changed.wait(max(0.0, checked + DISK_CHECK_S - time.monotonic())) \
                    and not self._stopping.is_set():
                self._changed.clear()
                self.publish()


# ---------------------------------------------------------------------------------------
# Sessions: one per client link
# ---------------------------------------------------------------------------------------

# Waiting JOB_LOG batches of one job merge into messages of up to this size.
COALESCE_BYTES = 192 * 1024
SESSION_JOIN_S = P.CLOSE_ACK_TIMEOUT_S + 5


class Outbox:
    """Everything one session sends, in order, for its writer thread to take.

    Producers (the session's reader thread, job threads) never block: `put` appends
    under the lock and returns. Items are messages (name, payload) or actions, callables
    that the writer runs with the link (file transfers, log replays). While a job is held
    (`hold`), its items wait aside, so that JOB_ACCEPTED or a replay can go first. Waiting
    JOB_LOG batches of one job merge; once more than `backlog_limit` bytes of one job
    wait (worker --follower-backlog), that job's items are dropped for a single
    JOB_DETACHED, and `put` refuses the job from then on.
    """

    def __init__(self, backlog_limit: int = FOLLOWER_BACKLOG_BYTES):
        self.backlog_limit = backlog_limit
        # Guards every field below; notified when an item arrives or the box closes.
        self._cond = threading.Condition()
        self._items: collections.deque = collections.deque()  # [job_id | None, item, size]
        self._held: dict[str, list] = {}
        self._backlog: dict[str, int] = {}  # job id -> bytes of its items waiting
        self._dropped: set[str] = set()
        self._closed = False

    def put(self, item, job_id: Optional[str] = None, size: int = 0) -> bool:
        """Queue a message (name, payload) or an action; False once the box is closed or
        has dropped this job."""
        with self._cond:
            if self._closed or job_id in self._dropped:
                return False
            if job_id is not None:
                self._backlog[job_id] = self._backlog.get(job_id, 0) + size
                if self._backlog[job_id] > self.backlog_limit:
                    self._drop(job_id)
                    return False
            entry = [job_id, item, size]
            target = self._held.get(job_id) if job_id is not None else None
            if target is None:
                target = self._items
            if not (target and self._merged(target[-1], entry)):
                target.append(entry)
            self._cond.notify()
            return True

    @staticmethod
    def _merged(last: list, entry: list) -> bool:
        """Fold a JOB_LOG batch into the one waiting before it when both are the same job's."""
        if last[0] != entry[0] or not (isinstance(last[1], tuple) and isinstance(entry[1], tuple)):
            return False
        (name, old), (new_name, new) = last[1], entry[1]
        if name != P.JOB_LOG or new_name != P.JOB_LOG or last[2] + entry[2] > COALESCE_BYTES:
            return False
        last[1] = P.job_log(old["job_id"], old["lines"] + new["lines"],
                            new["progress"] if new["progress"] is not None else old["progress"], new.get("offset"))
        last[2] += entry[2]
        return True

    def _drop(self, job_id: str) -> None:  # the caller holds _cond
        behind = self._backlog.pop(job_id, 0)
        self._dropped.add(job_id)
        self._items = collections.deque(e for e in self._items if e[0] != job_id)
        self._held.pop(job_id, None)
        reason = (f"this client fell {behind / 2**20:.1f} MB behind job {job_id}'s output, so the worker stopped "
                  f"sending it here; the job runs on. Reattach with `python client.py logs {job_id} --follow`")
        self._items.append([None, P.job_detached(job_id, reason), 0])
        self._cond.notify()

    def hold(self, job_id: str) -> None:
        with self._cond:
            self._held.setdefault(job_id, [])

    def release(self, job_id: str, first: list) -> None:
        """Queue `first` (items of no job), then what waited for the held job."""
        with self._cond:
            held = self._held.pop(job_id, [])
            self._items.extend([None, item, 0] for item in first)
            self._items.extend(held)
            self._cond.notify()

    def take(self, timeout: Optional[float] = None):
        """The next item, None after `timeout` (or a spurious wake-up); raises LinkClosed
        once closed and empty."""
        with self._cond:
            if not self._items and not self._closed:
                self._cond.wait(timeout)
            if not self._items:
                if self._closed:
                    raise P.LinkClosed("the session ended")
                return None
            job_id, item, size = self._items.popleft()
            if job_id in self._backlog:
                self._backlog[job_id] -= size
            return item

    def close(self) -> None:
        """Take no more items; the writer sends what is queued, then ends."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()


@dataclass(frozen=True)
class Member:
    """Who a session speaks for, and what that lets it change."""

    peer_id: str
    # The signed-in user behind the peer, as the signaling server vouched ("" if none):
    # who owns the jobs the session submits, and whether it is one of the worker's admins.
    user: str
    admin: bool

    @classmethod
    def of(cls, offer: dict, admins: set[str]) -> "Member":
        user = offer.get(P.FROM_USER) or ""
        return cls(offer["sender"], user, bool(user) and user in admins)

    @property
    def sender(self) -> str:
        """Who sends the session's uploads, as the store keeps it: users and peer ids apart,
        so that a peer named like a user is not taken for that user."""
        return uploader(self.user) if self.user else f"peer:{self.peer_id}"

    def not_yours(self, record: dict) -> Optional[str]:
        """Why this member may not stop, cancel or prune a job, or None: its owner (the
        signed-in user who submitted it) and the worker's admins may; a job with no owner,
        only the very peer that sent it (a peer id alone proves nothing later: anyone may
        register one that is free)."""
        owner = record.get("owner")
        if self.admin or (self.user and owner == self.user) or (not owner and record["submitter"] == self.peer_id):
            return None
        return (f"job {record['job_id']} is {record.get('owner') or record['submitter']}'s: only the member who "
                "submitted it, or one of this worker's admins (worker.py --admin USER), may change it")

    def may_prune(self) -> list[dict]:
        if self.user or self.admin:
            return []
        return [P.spec_error("worker", "a prune removes only its sender's jobs, and this link carries no sign-in "
                             "(client.py signs in on its own)", "NOT_SIGNED_IN")]

    def prune_scope(self) -> dict:
        """What a prune from this member may remove: everything for an admin, else its
        own jobs and the uploads only it sent."""
        return {"all": True} if self.admin else {"owner": self.user}


class Session:
    """One client's WebRTC link.

    Two threads, both ended when the link ends: "session-PEER" opens the link, reads
    requests and answers them by queueing into `outbox`; "session-PEER-out" is the only
    thread that writes to the link: it sends what the outbox holds and, at the end,
    closes the link. Jobs this session follows only queue into the outbox, so a slow or
    stopped client delays nobody but itself. A link a sleap-rtc 0.0.7 client opened gets
    an UpstreamAdapter, which reads its frames and writes our messages in its dialect.
    """

    def __init__(self, worker: "Worker", offer: dict, replaces: Optional["Session"] = None):
        self.worker = worker
        self.offer = offer
        self.peer_id = offer["sender"]
        self.member = Member.of(offer, worker.admins)
        self.replaces = replaces
        self.link: Optional[P.Link] = None
        self.outbox = Outbox(worker.follower_backlog)
        self.ending = threading.Event()
        # Guards _following: job id -> this session's listener on that job.
        self._following_lock = threading.Lock()
        self._following: dict[str, Callable[[str, dict], None]] = {}
        # Replicas arriving from another worker (replicas.py), or None without that file.
        self.replicas = optional(P.REPLICATE).ReplicaReceiver(self) if P.REPLICATE in worker.capabilities else None
        self.handlers = self._handlers()
        self.upstream = None  # an UpstreamAdapter (upstream.py)  # set before the writer starts, for an upstream link
        self.thread = threading.Thread(target=P.guarded(self._run), name=f"session-{self.peer_id}", daemon=True)
        self.writer = threading.Thread(target=P.guarded(self._write), name=f"session-{self.peer_id}-out", daemon=True)

    def end(self) -> None:
        """Ask the session to close its link and stop; its reader wakes at once."""
        self.ending.set()  # before reading `link`: a reader not yet reading sees the flag
        link = self.link
        if link is not None:
            link.wake()

    def _run(self) -> None:
        if self.replaces is not None:  # the client reconnected: its old link is stale
            self.replaces.end()
            self.replaces.thread.join(timeout=SESSION_JOIN_S)
        try:
            self.link = P.accept_link(self.worker.signaling, self.offer, None,
                                      UploadsFrom(self.worker.uploads, self.member.sender))
        except (P.SleapRTCError, OSError) as exc:
            log.warning("link with %s failed to open: %s", self.peer_id, exc)
            self.worker.session_ended(self)
            return
        if self.link.upstream:
            try:
                self.upstream = optional("upstream").UpstreamAdapter(self)
            except CapabilityMissing as exc:
                log.warning("%s opened a sleap-rtc 0.0.7 link: %s", self.peer_id, exc)
                self.link.send_raw(f"{exc}\n")
                self.link.close()
                self.worker.session_ended(self)
                return
        log.info("link open with %s%s", self.peer_id, " (a sleap-rtc 0.0.7 client)" if self.upstream else "")
        self.writer.start()
        try:
            while not self.ending.is_set():
                item = self.link.recv()  # None: end() woke it
                if item is not None:
                    try:
                        self._handle(item)
                    except Exception:  # one bad request must not end the client's session
                        log.exception("session %s: could not handle %s", self.peer_id, _describe(item))
                        self.send(*P.link_error(f"the worker failed on {_describe(item)}; see its log"))
        except P.LinkClosed as exc:
            log.info("link with %s ended: %s", self.peer_id, exc)
        finally:
            if self.replicas is not None:
                self.replicas.abandon()
            with self._following_lock:
                followed = list(self._following)
            for job_id in followed:
                self._unfollow(job_id)
            self.outbox.close()
            self.writer.join(timeout=SESSION_JOIN_S)
            self.worker.session_ended(self)

    def _write(self) -> None:
        """Send what the outbox holds until it closes or the link ends, then close the link."""
        try:
            while True:
                item = self.outbox.take()  # close() wakes it
                if item is None:
                    continue
                if callable(item):
                    item(self.link)
                elif self.upstream is not None:
                    self.upstream.deliver(self.link, *item)
                else:
                    self.link.send(*item)
        except P.LinkClosed:
            pass  # the link or the session ended; the reader thread sees it too
        except Exception:  # a bug here must still close the link, or the client waits for nothing
            log.exception("session %s: the writer failed", self.peer_id)
        finally:
            self.ending.set()
            self.link.close()

    def send(self, name: str, payload: dict) -> None:
        self.outbox.put((name, payload))

    def _handlers(self) -> dict[str, Callable[[dict], None]]:
        """What the reader does with each message a client may send, by name."""
        return {
            P.LINK_PING: lambda payload: self.send(*P.link_pong(payload)),
            P.LINK_ERROR: lambda payload: log.warning("%s reports: %s", self.peer_id, P.peer_error_text(payload)),
            P.UPLOAD_QUERY: lambda payload: self.send(*self.worker.uploads.status(payload, self.member.sender)),
            P.STORE_LIST: lambda payload: self.send(*P.store_listing(P.request_id_in(payload),
                                                                    self.worker.store_listing())),
            P.FILE_REQUEST: self._send_requested_file,
            P.FS_LIST: lambda payload: self.send(*files_answer(P.FS_LIST, payload, self.worker)),
            P.FS_SEARCH: lambda payload: self.send(*files_answer(P.FS_SEARCH, payload, self.worker)),
            P.JOB_SUBMIT: self._submit,
            P.ZMQ_CTRL: lambda payload: self.control(P.ZMQ_CTRL, payload),
            P.JOB_CANCEL: lambda payload: self.control(P.JOB_CANCEL, payload),
            P.JOB_ATTACH: self._attach,
            P.JOB_FETCH: self._fetch,
            P.REPLICA_BEGIN: self.replicas.begin if self.replicas else lambda payload: self.send(
                *P.replica_ready(P.request_id_in(payload), error=missing_reason(P.REPLICATE))),
            P.REPLICA_END: self.replicas.end if self.replicas else lambda payload: self.send(
                *P.replica_done(P.replica_id_in(payload), [], missing_reason(P.REPLICATE))),
        }

    def _handle(self, item: P.Received) -> None:
        if self.upstream is not None:
            self.upstream.handle(item)
        elif isinstance(item, P.FileReceived):
            log.info("received %s from %s (%d bytes, sha256 %s)", item.path, self.peer_id, item.size, item.sha256[:12])
            self.worker.uploads.stored(item.path, self.member.sender)
            self.worker.uploads.settle()
        elif isinstance(item, P.TransferFailed):
            log.warning("upload from %s failed: %s", self.peer_id, item.error)
            self.worker.uploads.settle()  # what it left counts toward the store's cap
        elif isinstance(item, P.Message) and item.name in self.handlers:
            self.handlers[item.name](item.payload)
        else:
            self.send(*P.link_error(f"this worker does not understand {_describe(item)[:40]}"))

    # -- following jobs -------------------------------------------------------------------

    def _listener(self, job_id: str, submitted: bool) -> Callable[[str, dict], None]:
        """The callback a job's threads call: it only queues. The submitter of a track job
        gets the predictions before JOB_COMPLETE."""

        def listener(name: str, payload: dict) -> None:
            item, size = (name, payload), 0
            if name == P.JOB_LOG:
                size = sum(len(line) + 8 for _, line in payload["lines"]) + 32
            elif name == P.JOB_COMPLETE and submitted:
                predictions = [Path(o["path"]) for o in payload.get("outputs", []) if o["kind"] == "predictions"]
                if predictions:  # the outcome goes unchanged
                    send_then = self.upstream.files_then if self.upstream is not None else _send_files_then
                    item = send_then(predictions, (name, payload))
            if not self.outbox.put(item, job_id, size):
                self._unfollow(job_id)

        with self._following_lock:
            self._following[job_id] = listener
        return listener

    def _unfollow(self, job_id: str) -> None:
        """Forget this session's listener on a job, and take it off the job if it is on it."""
        with self._following_lock:
            listener = self._following.pop(job_id, None)
        job = self.worker.scheduler.get(job_id)
        if listener is not None and job is not None and job.log.unsubscribe(listener):
            log.info("client %s no longer follows job %s", self.peer_id, job_id)

    # -- requests -------------------------------------------------------------------------

    def _submit(self, payload: dict) -> None:
        submitted = P.Submitted.read(payload)
        job_id, spec = submitted.job_id, submitted.spec
        if submitted.problem:
            self.send(*P.job_rejected(job_id, [P.spec_error("job_id", submitted.problem, "BAD_FORMAT")]))
            return
        job_dir = self.worker.scheduler.jobs_dir / job_id
        if isinstance(spec, dict) and spec.get("type") == P.COMMAND:
            errors, command, inputs = validate_command(spec, self.worker.allowed_commands, self.worker.mounts,
                                                       self.worker.stores, job_dir)
            plan = {"paths": {}, "command": command, **({"inputs": inputs} if inputs else {})}
        elif isinstance(spec, dict) and spec.get("type") == P.PRUNE:  # no paths: it plans when it starts
            errors = P.check_spec(spec) or self.member.may_prune()
            plan = {"paths": {}, "scope": self.member.prune_scope()}
        elif isinstance(spec, dict) and spec.get("type") == P.REPLICATE:
            errors, plan = P.check_spec(spec) or self._replicable(spec), {"paths": {}}
        else:
            errors, plan = self.worker.validate(spec, job_dir)
        files = {CONFIG_FILE: plan["config_text"]} if "config_text" in plan else {}
        accepted = {**spec, "_resolved": plan.get("paths", {}),
                    **{f"_{name}": plan[name] for name in ("package", "relabel", "command", "scope", "checkpoints",
                                                            "inputs", "epochs")
                       if name in plan}} \
            if isinstance(spec, dict) else {}
        self.admit(job_id, errors, accepted, files)

    def admit(self, job_id: str, errors: list[dict], accepted: dict, files: dict[str, str]) -> bool:
        """Queue a checked job (`accepted`: the spec with what validation resolved, `files`
        to write into its directory) and answer JOB_ACCEPTED, or answer JOB_REJECTED with
        `errors` or the worker's own reason (maintenance, low disk)."""
        refused = self.worker.status.refusal(accepted.get("type"), check_disk=bool(accepted))
        changed = self.worker.store_problem(accepted) if accepted and not errors else None
        if refused:
            errors = [P.spec_error("worker", refused[1], refused[0].upper())]
        elif changed:
            errors = [P.spec_error("upload", changed, "UPLOAD_CHANGED")]
        job = None
        if not errors:
            self.outbox.hold(job_id)  # the job's output waits until JOB_ACCEPTED is queued ahead of it
            job, errors = self.worker.scheduler.submit(job_id, accepted, self.peer_id, self._listener(job_id, True),
                                                       files, owner=self.member.user)
        if errors:
            self.worker.scheduler.release(job_id)  # a rejected job gives back the slot kept for it
            self._unfollow(job_id)
            self.outbox.release(job_id, [])
            log.info("rejected job %s from %s: %s", job_id, self.peer_id, "; ".join(e["message"] for e in errors))
            self.send(*P.job_rejected(job_id, errors))
            return False
        position = self.worker.scheduler.position(job)
        log.info("accepted job %s from %s: %s", job_id, self.peer_id,
                 "starts now" if position == 0 else f"queued at position {position}")
        self.outbox.release(job_id, [P.job_accepted(job_id, str(job.dir), position)])
        return True

    def _replicable(self, spec: dict) -> list[dict]:
        """Why a replicate spec cannot run here ([] when it can)."""
        try:
            return optional(P.REPLICATE).replicable(self.worker, spec)
        except CapabilityMissing as exc:
            return [exc.spec_error("type")]

    def control(self, name: str, payload: dict) -> None:
        job_id = P.job_id_in(payload)
        action = "stop" if name == P.ZMQ_CTRL else "cancel"
        record = self.worker.scheduler.record(job_id)
        refusal = self.member.not_yours(record) if record is not None else None
        if refusal:
            log.info("%s of job %s by %s refused: not theirs", action, job_id, self.peer_id)
            self.send(*P.job_control(job_id, action, False, refusal))
            return
        ok, message = self.worker.scheduler.control(job_id, action)
        log.info("%s of job %s by %s: %s", action, job_id, self.peer_id, message)
        self.send(*P.job_control(job_id, action, ok, message))

    def _attach(self, payload: dict) -> None:
        """The job's log from its first line; with `follow`, then everything live until it ends."""
        attach = P.Attach.read(payload)
        job_id, since = attach.job_id, attach.since
        # The live job first: once it is gone, the ledger already holds its final state.
        job = self.worker.scheduler.get(job_id)
        record = self.worker.scheduler.record(job_id)
        if record is None:
            self.send(*P.job_attached(job_id, error=f"no job {job_id} on this worker"))
            return
        log_path = Path(record["log_path"])
        if record.get("pruned") and not log_path.is_file():
            self.send(*P.job_attached(job_id, error=f"job {job_id} is {record['state']}; its log and files were "
                                                    f"pruned {pruned_note(record['pruned'])}"))
            return
        if job is None:  # it ended before this worker process started
            size = log_path.stat().st_size if log_path.is_file() else 0
            self.outbox.put(_replay(job_id, log_path, size, since))
            self.send(*P.job_attached(job_id, record["state"]))
            return
        self._unfollow(job_id)  # attaching twice replays again, and follows once
        self.outbox.hold(job_id)  # live output waits behind the replay
        listener = self._listener(job_id, False) if attach.follow else None
        offset, live = job.log.attach(listener)
        following = live and listener is not None
        if listener is not None and not following:
            self._unfollow(job_id)
        # Live, it is running (its state may be final a moment before it stops taking attaches).
        state = (job.state if job.state == P.PENDING else P.RUNNING) if live else job.outcome.state
        self.outbox.release(job_id, [_replay(job_id, log_path, offset, since),
                                     P.job_attached(job_id, state, following)])

    def _fetch(self, payload: dict) -> None:
        """Send a completed job's result files; JOB_FETCHED lists what was sent."""
        job_id = P.job_id_in(payload)
        paths, error = result_files(job_id, self.worker.scheduler.record(job_id), self.worker.mounts)
        if error and not paths:
            self.send(*P.job_fetched(job_id, [], error))
        else:
            self.outbox.put(_send_files_then(paths, lambda sent, failed: P.job_fetched(job_id, sent, error or failed)))

    def _send_requested_file(self, payload: dict) -> None:
        requested = P.requested_path(payload)
        try:
            path = resolve_in_mounts(requested, self.worker.readable_mounts)
            if not path.is_file():
                raise PathRefused(f"{requested} is not a file on the worker", "NOT_FOUND")
        except PathRefused as exc:
            self.send(*P.link_error(str(exc), path=requested[:200]))
            return
        self.outbox.put(_send_files_then([path]))


def _send_files_then(paths: list[Path],
                     then: Optional[P.Outgoing | Callable[[list[str], Optional[str]], P.Outgoing]] = None
                     ) -> Callable[[P.Link], None]:
    """A writer action: send each file, then the message `then`: a (name, payload), or
    built by `then(files sent, why the rest was not)`. A file that cannot be sent ends
    the list."""

    def action(link: P.Link) -> None:
        sent, error = [], None
        for path in paths:
            try:
                link.send_file(path, exact=True)  # a job may swap its files for links in the meantime
            except (OSError, P.TransferError) as exc:
                log.warning("sending %s to %s failed: %s", path, link.peer_id, exc)
                error = f"{path} could not be sent: {exc}"
                break
            sent.append(str(path))
            log.info("sent %s to %s", path, link.peer_id)
        if then is not None:
            link.send(*(then(sent, error) if callable(then) else then))

    return action


def _replay(job_id: str, log_path: Path, size: int, since: int = 0) -> Callable[[P.Link], None]:
    """A writer action: send bytes `since` to `size` of a job's log, read as it is sent,
    each batch with the offset it reaches."""

    def action(link: P.Link) -> None:
        try:
            log_file = open(log_path, "rb")
        except OSError:
            return  # not started yet: no log
        with log_file:
            start = min(since, size)
            log_file.seek(start)
            left, pending, sent = size - start, b"", start
            while left > 0:
                chunk = log_file.read(min(LOG_BATCH_BYTES, left))
                if not chunk:
                    break
                left -= len(chunk)
                pending += chunk
                *complete, pending = pending.split(b"\n")
                if complete:
                    sent += sum(len(line) + 1 for line in complete)
                    lines = [["o", line.decode("utf-8", "replace")] for line in complete]
                    link.send(*P.job_log(job_id, lines, None, sent))

    return action


def _describe(item) -> str:
    return item.name[:40] if isinstance(item, P.Message) else type(item).__name__


# ---------------------------------------------------------------------------------------
# The ledger and the scheduler
# ---------------------------------------------------------------------------------------

LEDGER_FILE = "jobs.sqlite"
RESTARTED_ERROR = "worker restarted during the job"
MAINTENANCE_MESSAGE = "this worker is in maintenance: it finishes its queue but takes no new jobs"
DISK_CHECK_S = 5.0
LEDGER_LIMIT = 1000  # most jobs one listing returns, newest first
_JSON_COLUMNS = {"spec", "outputs", "stderr_tail", "command", "steps", "slurm", "pruned"}


class Ledger:
    """Every job this worker accepted, one row each in a SQLite file in its working dir.

    Each write commits at once, so a worker killed at any moment loses no accepted job.
    Column names in the SQL come from this file only, never from a peer.
    """

    SCHEMA = """CREATE TABLE IF NOT EXISTS jobs (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT UNIQUE NOT NULL, type TEXT NOT NULL,
        spec TEXT NOT NULL, submitter TEXT, state TEXT NOT NULL, submitted_at REAL NOT NULL,
        started_at REAL, finished_at REAL, exit_code INTEGER, duration_s REAL, stopped_early INTEGER,
        outputs TEXT, warning TEXT, error TEXT, stderr_tail TEXT, log_path TEXT, job_dir TEXT,
        command TEXT, pid INTEGER, steps TEXT, slurm TEXT, pruned TEXT, owner TEXT)"""
    # Columns newer than a ledger may be, added when it opens. slurm: the running step's
    # SLURM job {job_id, step, state, reason, node, problem}.
    # pruned: {at, by (the prune job), path} once a prune removed the job's directory.
    # owner: the signed-in user who submitted the job, as the signaling server vouched ("" if none).
    ADDED_COLUMNS = {"steps": "TEXT", "slurm": "TEXT", "pruned": "TEXT", "owner": "TEXT"}

    def __init__(self, path: Path):
        import sqlite3

        self.path = path
        # Guards the connection, which the session, scheduler and job threads all use.
        self._lock = threading.Lock()
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))  # the owner's alone; its WAL files follow
        os.chmod(path, 0o600)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(self.SCHEMA)
            present = {row["name"] for row in self._db.execute("PRAGMA table_info(jobs)")}
            for name, kind in self.ADDED_COLUMNS.items():
                if name not in present:
                    self._db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")

    def add(self, job: Job, **fields) -> None:
        """A new job's record; `fields`, more of its columns."""
        columns = {"job_id": job.job_id, "type": job.kind, "spec": job.spec, "submitter": job.submitter,
                   "owner": job.owner, "state": job.state, "submitted_at": job.submitted_at,
                   "log_path": str(job.log_path), "job_dir": str(job.dir), **fields}
        values = [json.dumps(v) if name in _JSON_COLUMNS else v for name, v in columns.items()]
        self._write(f"INSERT INTO jobs ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})", tuple(values))

    def update(self, job_id: str, **fields) -> None:
        assignments = ", ".join(f"{name} = ?" for name in fields)
        values = [json.dumps(v) if name in _JSON_COLUMNS else v for name, v in fields.items()]
        self._write(f"UPDATE jobs SET {assignments} WHERE job_id = ?", (*values, job_id))

    def get(self, job_id: str) -> Optional[dict]:
        rows = self._read("SELECT * FROM jobs WHERE job_id = ?", (job_id,))
        return rows[0] if rows else None

    def select(self, state: Optional[str] = None, oldest_first: bool = False, limit: int = LEDGER_LIMIT) -> list[dict]:
        where, args = ("WHERE state = ?", (state,)) if state else ("", ())
        order = "ASC" if oldest_first else "DESC"
        return self._read(f"SELECT * FROM jobs {where} ORDER BY seq {order} LIMIT ?", (*args, limit))

    def model_digests(self) -> set[str]:
        """The SHA-256 of every model file this worker's own trainings made: checkpoints it
        may load as they are (a replica from another worker is not among them)."""
        rows = self._read("SELECT * FROM jobs WHERE type = ? AND state = ? AND outputs IS NOT NULL",
                          (P.TRAIN, P.COMPLETED))
        return {f["sha256"] for row in rows for o in row["outputs"] or [] if o.get("kind") == "model"
                for f in o.get("files", [])}

    def recent_durations(self, job_type: str, count: int = 10) -> list[float]:
        rows = self._read("SELECT * FROM jobs WHERE type = ? AND state = ? AND duration_s IS NOT NULL "
                          "ORDER BY seq DESC LIMIT ?", (job_type, P.COMPLETED, count))
        return [row["duration_s"] for row in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _write(self, sql: str, args: tuple) -> None:
        with self._lock:
            self._db.execute(sql, args)

    def _read(self, sql: str, args: tuple) -> list[dict]:
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        records = []
        for row in rows:
            record = {k: (json.loads(row[k]) if k in _JSON_COLUMNS and row[k] is not None else row[k])
                      for k in row.keys() if k != "seq"}
            record["stopped_early"] = bool(record["stopped_early"])
            records.append(record)
        return records


# Ledger queries from clients (`client.py jobs --sql`): read-only, the jobs table only,
# bounded in time, rows and reply size (a signaling frame holds at most 1 MiB), and in
# memory: no value longer than SQL_VALUE_BYTES, at most SQL_COLUMNS columns, only the
# functions listed, sorts and temporary tables spilled to disk past a small cache, and
# rows read one at a time until the reply budget is spent. A worker answering the worst
# of them grows by a few MB (tests/test_member_limits.py measures it).
SQL_MAX_CHARS = 10_000
SQL_TIME_S = 2.0
SQL_ROW_LIMIT = 1000
SQL_REPLY_BYTES = 512 * 1024
SQL_VALUE_BYTES = 64 * 1024
SQL_COLUMNS = 64
SQL_CACHE_KB = 4096  # SQLite's page cache for one query; sorts past it go to temporary files
SQL_AT_ONCE = 2  # queries running at once; more are answered "busy"
# Functions a query may call: arithmetic, text, dates, JSON and aggregates. Not zeroblob,
# randomblob, fts3_tokenizer (a pointer), load_extension or anything else.
SQL_FUNCTIONS = frozenset({
    "abs", "avg", "char", "coalesce", "count", "date", "datetime", "format", "glob", "group_concat", "hex", "ifnull",
    "iif", "instr", "json", "json_array", "json_array_length", "json_extract", "json_group_array",
    "json_group_object", "json_object", "json_type", "json_valid", "julianday", "length", "like", "lower", "ltrim",
    "max", "min", "nullif", "printf", "quote", "replace", "round", "rtrim", "strftime", "substr", "substring", "sum",
    "time", "total", "trim", "typeof", "unicode", "unixepoch", "upper", "->", "->>", "row_number", "rank",
    "dense_rank", "lag", "lead", "first_value", "last_value", "ntile", "percent_rank", "cume_dist"})


def query_ledger(path: Path, sql: Any) -> dict:
    """Run a client's query against the ledger: {columns, rows, truncated} or {error}.

    The database is opened read-only, and an authorizer allows nothing but SELECT,
    reading the jobs table (and the query's own CTEs), the listed functions and
    recursion: writes, ATTACH, PRAGMA, the schema and every other table are refused by
    SQLite itself. A query that runs past SQL_TIME_S is interrupted."""
    import sqlite3

    if not isinstance(sql, str) or not sql.strip() or len(sql) > SQL_MAX_CHARS:
        return {"error": f"sql must be one SELECT statement of at most {SQL_MAX_CHARS} characters"}
    allowed = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_RECURSIVE}
    deadline = time.monotonic() + SQL_TIME_S
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    rows, budget, truncated, refused = [], SQL_REPLY_BYTES, False, []
    try:
        db.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, SQL_VALUE_BYTES)
        db.setlimit(sqlite3.SQLITE_LIMIT_COLUMN, SQL_COLUMNS)
        db.setlimit(sqlite3.SQLITE_LIMIT_SQL_LENGTH, SQL_MAX_CHARS * 4)
        db.execute(f"PRAGMA cache_size = -{SQL_CACHE_KB}")
        db.execute("PRAGMA temp_store = FILE")
        # Every real table but jobs is off limits; any other name a query reads is its own CTE.
        hidden = {row[0] for row in db.execute("SELECT name FROM sqlite_master")} - {"jobs"}
        hidden |= {"sqlite_master", "sqlite_schema", "sqlite_temp_master", "sqlite_temp_schema"}

        def authorize(action, table, name, _database, _trigger):
            if action in allowed or (action == sqlite3.SQLITE_READ and table not in hidden):
                return sqlite3.SQLITE_OK
            if action == sqlite3.SQLITE_FUNCTION and str(name).lower() in SQL_FUNCTIONS:
                return sqlite3.SQLITE_OK
            if action == sqlite3.SQLITE_FUNCTION:
                refused.append(str(name))
            return sqlite3.SQLITE_DENY

        db.set_authorizer(authorize)
        db.set_progress_handler(lambda: time.monotonic() > deadline, 10_000)
        cursor = db.execute(sql)
        columns = [d[0] for d in cursor.description or []]
        while (row := cursor.fetchone()) is not None:
            row = [v.hex() if isinstance(v, bytes) else v for v in row]
            budget -= len(json.dumps(row)) + 2
            if budget < 0 or len(rows) == SQL_ROW_LIMIT:
                truncated = True
                break
            rows.append(row)
    except sqlite3.OperationalError as exc:
        if str(exc) == "interrupted":
            return {"error": f"the query ran longer than {SQL_TIME_S:.0f} s and was stopped"}
        if refused:
            return {"error": f"refused: {refused[0][:40]}() is not one of the functions a query may call (count, "
                             "sum, min, max, json_extract, strftime and the other arithmetic, text, date, JSON and "
                             "window functions)"}
        return {"error": f"refused: {exc} (only SELECT on the jobs table)"}
    except (sqlite3.Error, ValueError, OverflowError, MemoryError) as exc:  # several statements, a value too big, ...
        return {"error": f"refused: {exc}"}
    finally:
        db.close()
    return {"columns": columns, "rows": rows, "truncated": truncated}


def kill_orphan(record: dict) -> None:
    """Kill the process group of a run that outlived its worker, if it is still that run."""
    pid, command = record.get("pid"), record.get("command") or []
    if not pid or not command:
        return
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode("utf-8", "replace")
    except OSError:
        return  # gone, or no /proc here
    if Path(command[0]).name in cmdline:
        try:
            os.killpg(pid, signal.SIGKILL)
            log.warning("killed the leftover process group %d of job %s", pid, record["job_id"])
        except (ProcessLookupError, PermissionError):
            pass


class Scheduler:
    """The worker's jobs: `slots` run at once; accepted jobs beyond that wait, first in
    first out, and start when a slot frees.

    The ledger is the record; the Job objects of queued and running jobs live in `queue`
    and `running` (a finished job is answered from the ledger). The thread "scheduler"
    starts pending jobs into free, unreserved slots and lets reservations expire; `stop()`
    ends it. `plan(job)` gives a starting job its steps (see Job.start); `on_change(job
    or None)` is called whenever status, queue or a job's state may have changed.
    """

    def __init__(self, working_dir: Path, slots: int, executable: str,
                 on_change: Callable[[Optional[Job]], None], reservation_timeout: float = RESERVATION_TIMEOUT_S,
                 stop_grace: float = STOP_GRACE_S,
                 plan: Optional[Callable[[Job], tuple[list[Step], list[str]]]] = None,
                 executor: Optional[Executor] = None):
        self.jobs_dir = working_dir / JOBS_DIR
        self.executor = executor or LocalExecutor()
        self.plan = plan or (lambda job: (structured_steps(executable, job), []))
        self.stop_grace = stop_grace
        self.slots = slots
        self.reservation_timeout = reservation_timeout
        self.executable = executable
        self.on_change = on_change
        self.ledger = Ledger(working_dir / LEDGER_FILE)
        # Guards queue, running and reservations; notified whenever one changes.
        self._cond = threading.Condition()
        self.queue: list[Job] = []  # pending jobs, the next to run first
        self.running: dict[str, Job] = {}
        self.reservations: dict[str, float] = {}  # job id -> monotonic deadline for its spec
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=P.guarded(self._run), name="scheduler", daemon=True)

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        self.executor.start()
        self._recover()
        self._thread.start()

    def _recover(self) -> None:
        """After a restart: a job that was running failed with it (its process group is
        killed if it outlived the worker), unless it runs in SLURM, which kept it: then
        it is followed again. Pending jobs queue again in their order."""
        for record in self.ledger.select(state=P.RUNNING):
            if self._follow_again(record):
                continue
            kill_orphan(record)
            self._job(record).lost(RESTARTED_ERROR)
            log.warning("job %s was running when the worker stopped; marked failed", record["job_id"])
        for record in self.ledger.select(state=P.PENDING, oldest_first=True):
            self.queue.append(self._job(record))
        if self.queue:
            log.info("%d queued job(s) from before the restart will run", len(self.queue))

    def _job(self, record: dict) -> Job:
        """The live Job of a ledger record."""
        job = Job(record["job_id"], record["spec"], Path(record["job_dir"]), record["submitter"],
                  record["submitted_at"], self.stop_grace, self.executor, record.get("owner") or "", self.ledger)
        job.started_at = record.get("started_at")
        return job

    def _follow_again(self, record: dict) -> bool:
        """Follow a running job's run again (a SLURM job); False when there is none to follow."""
        reattach = self.executor.follow_again(record)
        if reattach is None:
            return False
        job = self._job(record)
        job.reattach = reattach
        job.results = [r for r in (record.get("steps") or []) if r.get("state") != "not run"][:reattach["step"]]
        self.running[job.job_id] = job
        self._start(job)
        log.info("job %s: %s", job.job_id, reattach["note"])
        return True

    def stop(self, timeout: float = CANCEL_GRACE_S + 5) -> None:
        """Stop starting jobs, cancel the running ones and wait for their records; queued
        jobs stay queued in the ledger for the next start. SLURM jobs run on: the next
        start follows them again."""
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        if self.executor.outlives_worker:
            self.executor.stop()
            with self._cond:
                if self.running:
                    log.info("%d job(s) keep running in SLURM; the next start follows them again", len(self.running))
            return  # their threads may still write: the ledger closes with the process
        with self._cond:
            running = list(self.running.values())
        for job in running:
            job.cancel("the worker was stopped")
        with self._cond:  # each finished job notifies
            self._cond.wait_for(lambda: not self.running, timeout)
        self.ledger.close()

    # -- submitting and asking ----------------------------------------------------------

    def submit(self, job_id: str, spec: dict, submitter: str, listener,
               files: Optional[dict[str, str]] = None, owner: str = "") -> tuple[Optional[Job], list[dict]]:
        """Queue a job (it starts at once when a slot is free), or say why not. `files`
        (name: text) are written into the job's directory first."""
        with self._cond:
            if self.ledger.get(job_id) is not None:
                return None, [P.spec_error("job_id", f"job {job_id} exists already", "DUPLICATE")]
            job = Job(job_id, spec, self.jobs_dir / job_id, submitter, stop_grace=self.stop_grace,
                      executor=self.executor, owner=owner, ledger=self.ledger)
            try:
                job.dir.mkdir(parents=True, exist_ok=True)
                for name, text in (files or {}).items():
                    (job.dir / name).write_text(text, encoding="utf-8")
            except OSError as exc:
                return None, [P.spec_error("worker", f"cannot write the job's directory: {exc}", "WORKER_ERROR")]
            job.log.subscribe(listener)
            job.recorded()
            if self.reservations.pop(job_id, None) is not None:
                self.queue.insert(0, job)  # its slot was kept for it
            else:
                self.queue.append(job)
            self._cond.notify_all()
        self.on_change(job)
        return job, []

    def release(self, job_id: str) -> None:
        """Free the slot kept for a job that will not come (it was rejected)."""
        with self._cond:
            released = self.reservations.pop(job_id, None) is not None
            self._cond.notify_all()
        if released:
            self.on_change(None)

    def reserve(self, job_id: str) -> int:
        """Keep a free slot for `job_id` until its spec arrives; the queue position the job
        will have (0: it starts at once)."""
        with self._cond:
            if job_id in self.reservations:
                return 0
            position = self._position(len(self.queue))
            if position == 0:
                self.reservations[job_id] = time.monotonic() + self.reservation_timeout
                self._cond.notify_all()  # the scheduler thread waits for the earliest deadline
        self.on_change(None)
        return position

    def position(self, job: Job) -> int:
        """0 when the job runs or is about to (an UNSLOTTED one always is), else its place in the queue from 1."""
        with self._cond:
            return self._position(self.queue.index(job)) if job in self.queue and job.kind not in UNSLOTTED else 0

    def _free_slots(self) -> int:  # the caller holds _cond
        """Slots neither running a job nor promised to one (queued jobs not counted). A
        job of an UNSLOTTED type needs none."""
        busy = sum(job.kind not in UNSLOTTED for job in self.running.values())
        return self.slots - busy - len(self.reservations)

    def _position(self, index: int) -> int:  # the caller holds _cond
        return max(0, index + 1 - max(0, self._free_slots()))

    def status(self) -> dict:
        """What discovery should see: available while a new job would start at once,
        reserved while the last free slot is promised to an assigned job, else busy. A
        queued job counts against the slots from the moment it is accepted, before the
        scheduler thread has started it."""
        with self._cond:
            free = self._free_slots() - len(self.queue)
            status = P.AVAILABLE if free > 0 else P.RESERVED if self.reservations else P.BUSY
            return {"status": status, "queue_length": len(self.queue), "running_jobs": len(self.running),
                    "pending_job_id": next(reversed(self.reservations), None)}

    def estimate(self, job_type: str) -> dict:
        """Queue position and a rough start time and duration for a new job, from this
        worker's recent completed jobs of the type (None without history)."""
        durations = self.ledger.recent_durations(job_type)
        typical = statistics.median(durations) if durations else None
        now = time.time()
        with self._cond:
            position = self._position(len(self.queue))
            soonest = min((max(0.0, typical - (now - (j.started_at or now))) for j in self.running.values()),
                          default=0.0) if typical is not None else None
        start = 0 if position == 0 else None if typical is None else \
            round(soonest + (position - 1) * typical / self.slots)
        return {"queue_position": position, "estimated_start_time_sec": start,
                "estimated_duration_minutes": None if typical is None else round(typical / 60, 2)}

    def get(self, job_id: str) -> Optional[Job]:
        """The live Job of a queued or running job; None once it has finished (see `record`)."""
        with self._cond:
            return self.running.get(job_id) or next((j for j in self.queue if j.job_id == job_id), None)

    def record(self, job_id: str) -> Optional[dict]:
        """The ledger's row for a job, with its queue position while pending."""
        record = self.ledger.get(job_id)
        if record is not None and record["state"] == P.PENDING:
            job = self.get(job_id)
            record["queue_position"] = self.position(job) if job is not None else None
        return record

    def control(self, job_id: str, action: str) -> tuple[bool, str]:
        """Stop or cancel a job: a queued one leaves the queue at once, a running one is
        signalled. (ok, what happened)."""
        job = self.get(job_id)
        with self._cond:
            queued = job is not None and job in self.queue
            position = self._position(self.queue.index(job)) if queued else 0
            if queued and action == "cancel":
                self.queue.remove(job)
        if job is None:
            record = self.ledger.get(job_id)
            if record is None:
                return False, f"no job {job_id} on this worker"
            return False, f"job {job_id} is {record['state']}; nothing to {action}"
        if queued and action == "stop":
            return False, f"job {job_id} is still queued (position {position}); cancel removes it"
        if queued:
            job.finish(P.CANCELLED, "cancelled while queued; it never ran", self._finished)
            return True, "removed from the queue; it never ran"
        if job.outcome is not None:
            return False, f"job {job_id} is {job.outcome.state}; nothing to {action}"
        # Running, or taken from the queue and starting: a step not yet started sees the
        # cancel (Job._run_step), and a stop reaches sleap-nn through the step's ProgressChannel.
        if action == "stop":
            return True, job.request_stop()
        job.cancel()
        return True, "cancel sent; sleap-nn is being terminated"

    # -- running ------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._schedule_once()
            except Exception:  # e.g. a ledger write failed: log it and keep scheduling the others
                log.exception("scheduler: starting queued jobs failed")
                self._stopping.wait(1)

    def _schedule_once(self) -> None:
        """Expire reservations and start what fits into free slots; when there is nothing to
        do, wait for a change or the earliest reservation's deadline."""
        to_start, expired = [], []
        with self._cond:
            if self._stopping.is_set():  # checked under the lock stop() notifies under: no lost wake-up
                return
            now = time.monotonic()
            for job_id, deadline in list(self.reservations.items()):
                if deadline <= now:
                    del self.reservations[job_id]
                    expired.append(job_id)
            while True:
                job = next((j for j in self.queue if j.kind in UNSLOTTED), None) or \
                    (self.queue[0] if self.queue and self._free_slots() > 0 else None)
                if job is None:
                    break
                self.queue.remove(job)
                self.running[job.job_id] = job
                to_start.append(job)
            if not to_start and not expired:  # reserve, submit, release, a finished job and stop notify
                self._cond.wait(min(self.reservations.values()) - now if self.reservations else None)
                return
        for job_id in expired:
            log.info("the slot kept for job %s is free again: its spec did not come in %.0f s",
                     job_id, self.reservation_timeout)
        for job in to_start:
            self._start(job)
        self._announce_positions()
        self.on_change(None)

    def live_specs(self) -> list[dict]:
        """The specs of the queued and running jobs."""
        with self._cond:
            return [job.spec for job in [*self.queue, *self.running.values()]]

    def _start(self, job: Job) -> None:
        job.on_record = self._run_changed
        try:
            job.start(self.plan, self.on_change, self._step_started, self._finished)
        except Exception as exc:  # a bug or a full disk must fail this job, not keep its slot taken forever
            log.exception("job %s could not start", job.job_id)
            job.finish(P.FAILED, f"the worker could not start the job: {exc!r}", self._finished)

    def _step_started(self, job: Job) -> None:
        """Each step's command and process group or SLURM job, and the steps done before
        it, so that a restarted worker can end it or follow it again."""
        self.ledger.update(job.job_id, started_at=job.started_at, command=job.command, steps=job.results,
                           **job.run.record)
        log.info("job %s from %s: %s started: %s", job.job_id, job.submitter, job.step.name,
                 " ".join(shlex.quote(word) for word in job.command))

    def _run_changed(self, job: Job, record: dict) -> None:
        self.ledger.update(job.job_id, **record)

    def _announce_positions(self) -> None:
        with self._cond:
            waiting = [(job, self._position(i)) for i, job in enumerate(self.queue)]
        for job, position in waiting:
            job.log.emit(*P.job_queued(job.job_id, position))

    def _finished(self, job: Job) -> None:
        """The job recorded its outcome: note what a prune took, free its slot, tell its listeners."""
        outcome = job.outcome
        if job.kind == P.PRUNE and outcome.state == P.COMPLETED:
            note_pruned(self.ledger, job)
        with self._cond:
            self.running.pop(job.job_id, None)
            self._cond.notify_all()
        job.log.emit(*outcome.message())
        log.info("job %s %s (exit code %s, %.1f s)", job.job_id, job.state, job.exit_code, outcome.duration_s)
        self.on_change(job)


# ---------------------------------------------------------------------------------------
# Jobs: one job's run, its log and its state
# ---------------------------------------------------------------------------------------


class _CancelledBeforeStart(Exception):
    """Job.start found the job cancelled before sleap-nn was started."""


@dataclass(frozen=True)
class _Say:
    """An item for the relay: a message to listeners, sent after the lines before it."""

    name: str
    payload: dict


class JobLog:
    """A job's output on its way into its log file and to the clients following it.

    Threads queue lines and messages (`line`, `say`, `say_line`); the thread "job-ID-relay"
    (`start` starts it, `end` ends it after the last item) takes them in order: lines are
    batched into the file and to listeners every LOG_BATCH_S or LOG_BATCH_BYTES, and each
    message follows the lines before it. `watch(stream, line)` sees each line on the relay
    thread. A client attaching mid-run replays the file up to an offset and gets exactly
    the batches after it (`attach`); once `close`d, no one attaches any more.
    """

    def __init__(self, job_id: str, path: Path, watch: Callable[[str, str], None] = lambda stream, line: None):
        self.job_id = job_id
        self.path = path
        self._watch = watch
        self._items: "queue.Queue" = queue.Queue()
        self._relay: Optional[threading.Thread] = None
        # Guards _listeners, the callbacks (message name, payload) of attached clients.
        self._listeners_lock = threading.Lock()
        self._listeners: list[Callable[[str, dict], None]] = []
        # Guards _size (bytes of the file written so far), `closed`, and which listeners
        # each batch goes to.
        self._lock = threading.Lock()
        self._size = 0
        self.closed = False

    # -- listeners ------------------------------------------------------------------------

    def subscribe(self, listener: Callable[[str, dict], None]) -> None:
        with self._listeners_lock:
            self._listeners.append(listener)

    def unsubscribe(self, listener: Callable[[str, dict], None]) -> bool:
        """Take a listener off; False when it was not on."""
        with self._listeners_lock:
            if listener not in self._listeners:
                return False
            self._listeners.remove(listener)
            return True

    def emit(self, name: str, payload: dict, listeners: Optional[list] = None) -> None:
        """Hand a message to every listener (or to `listeners`, a snapshot) now. Listeners
        only queue; one that raises is logged and dropped, and the others still get it."""
        if listeners is None:
            with self._listeners_lock:
                listeners = list(self._listeners)
        message = {"job_id": self.job_id, **payload}
        for listener in listeners:
            try:
                listener(name, message)
            except Exception:  # a listener's bug must not end the job's thread or reach other clients
                log.exception("job %s: a listener failed on %s and was dropped", self.job_id, name)
                self.unsubscribe(listener)

    def attach(self, listener: Optional[Callable[[str, dict], None]]) -> tuple[int, bool]:
        """Subscribe `listener` (when given) for what follows the file's first `offset` bytes.

        Returns (offset, live): the caller replays the file up to `offset`, outside any
        lock, and gets no line twice and none missed; live is False when the job has
        finished already (nothing was subscribed).
        """
        with self._lock:
            if self.closed:
                return self._size, False
            if listener is not None:
                self.subscribe(listener)
            return self._size, True

    def close(self, then: Callable[[], None]) -> None:
        """No one attaches from now on; `then` runs first, under the same lock (the job's
        outcome is set there, so an attacher sees it either live or finished)."""
        with self._lock:
            then()
            self.closed = True

    # -- the relay ------------------------------------------------------------------------

    def read(self, chunks: Iterator[bytes], stream: str) -> None:
        """Queue a process's output ("o", "e"), split into complete lines and
        carriage-return progress updates (a job's "job-ID-stdout"/"-stderr" threads)."""
        pending = b""
        for chunk in chunks:
            pending += chunk
            parts = re.split(rb"(\r\n|\n|\r)", pending)
            pending = parts.pop()
            for text, end in zip(parts[0::2], parts[1::2]):
                self.line(stream, text.decode("utf-8", "replace"), end == b"\r")
        if pending:
            self.line(stream, pending.decode("utf-8", "replace"))

    def line(self, stream: str, text: str, is_progress: bool = False) -> None:
        """A line of output ("o", "e"), or a carriage-return progress update."""
        self._items.put((stream, text, is_progress))

    def say_line(self, text: str) -> None:
        """A line from the worker itself (stream "w")."""
        self._items.put(("w", f"[sleap-rtc worker] {text}", False))

    def say(self, name: str, payload: dict) -> None:
        """A message for the listeners, after the lines queued before it."""
        self._items.put(_Say(name, payload))

    def start(self) -> None:
        self._relay = threading.Thread(target=P.guarded(self._relay_forever), name=f"job-{self.job_id}-relay",
                                       daemon=True)
        self._relay.start()

    def end(self) -> None:
        """Relay what is queued, then stop the relay."""
        self._items.put(None)
        if self._relay is not None:
            self._relay.join()

    def _relay_forever(self) -> None:
        """Batch lines into the file and to listeners: every LOG_BATCH_S or
        LOG_BATCH_BYTES, and before each message, which follows its lines (and is noted
        in the file). Ends at the None `end` puts last.

        The batch is written and its listeners chosen under the lock; it is handed to
        them after the lock is released."""
        with open(self.path, "ab") as log_file:
            with self._lock:
                self._size = log_file.tell()
            done = False
            while not done:
                batch, progress, size, say = [], None, 0, None
                deadline = time.monotonic() + LOG_BATCH_S
                while size < LOG_BATCH_BYTES:
                    try:
                        item = self._items.get(timeout=max(0.0, deadline - time.monotonic()))
                    except queue.Empty:
                        break
                    if item is None:
                        done = True
                        break
                    if isinstance(item, _Say):
                        say = item
                        name = item.payload.get("name")
                        # "m": a marker in the file; the message itself follows it
                        batch.append(["m", f"[sleap-rtc worker] {item.name}{f' {name}' if name else ''}"])
                        break
                    stream, line, is_progress = item
                    if is_progress:
                        progress = line
                        continue
                    batch.append([stream, line])
                    size += len(line)
                    self._watch(stream, line)
                if batch or progress is not None:
                    data = "".join(line + "\n" for _, line in batch).encode("utf-8", "replace")
                    with self._lock:
                        try:
                            log_file.write(data)
                            log_file.flush()
                            self._size += len(data)
                        except OSError as exc:  # e.g. a full disk: keep reading, or sleap-nn blocks on its pipe
                            log.error("job %s: writing its log failed: %s", self.job_id, exc)
                            with contextlib.suppress(OSError):  # what did reach the file counts: offsets stay true
                                self._size = os.fstat(log_file.fileno()).st_size
                        offset = self._size
                        with self._listeners_lock:
                            listeners = list(self._listeners)
                    self.emit(*P.job_log(self.job_id, batch, progress, offset), listeners)
                if say is not None:
                    self.emit(say.name, say.payload)


class Job:
    """One job: its steps (sleap-nn runs, one after the other) and everything known about it.

    Threads, all ended by the process ending: "job-ID-run" has the steps planned (paths
    checked again, a package unpacked), runs them in order and reports the outcome; while
    a step runs, "job-ID-stdout" / "job-ID-stderr" read its output into `log` (a JobLog,
    whose relay thread writes the file and tells the listeners) and "job-ID-zmq"
    (a training step's ProgressChannel) forwards sleap-nn's events and sends stop. `_set_state` is
    the one place the job's state changes, in memory and in the ledger together.
    """

    def __init__(self, job_id: str, spec: dict, job_dir: Path, submitter: str, submitted_at: Optional[float] = None,
                 stop_grace: float = STOP_GRACE_S, executor: Optional[Executor] = None, owner: str = "",
                 ledger: Optional["Ledger"] = None):
        self.job_id = job_id
        self.ledger = ledger  # where its state is recorded (None: nowhere, as in a unit test)
        self.spec = spec
        self.dir = job_dir
        self.submitter = submitter  # the peer id it came from
        self.owner = owner  # the signed-in user behind that peer ("" if none)
        self.log_path = job_dir / "job.log"
        self.log = JobLog(job_id, self.log_path, self._watch_line)
        self.state = P.PENDING
        self.submitted_at = submitted_at or time.time()
        self.started_at: Optional[float] = None
        self.finished_at: Optional[float] = None
        self.exit_code: Optional[int] = None
        self.stop_requested = threading.Event()
        self.cancel_requested = threading.Event()
        self.cancel_reason = ""
        self.outcome: Optional[P.Outcome] = None
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self.steps: list[Step] = []
        self.results: list[dict] = []  # per step that ran: name, kind, state, exit_code, stopped_early
        self.step: Optional[Step] = None  # the step running now
        self.command: list[str] = []
        self.inference_failure: Optional[str] = None  # why the inference after training failed, if it did
        self.executor = executor or LocalExecutor()
        self.run: Optional[Run] = None  # the running step's process or batch job
        # A run to follow again instead of starting, after a worker restart (see
        # Executor.follow_again): {"step": index, "saved": ..., "note": ...}; the steps
        # before it are in `results`.
        self.reattach: Optional[dict] = None
        # Called with columns for the ledger when the running step's run reports a change.
        self.on_record: Callable[["Job", dict], None] = lambda job, record: None
        self.stop_grace = stop_grace
        # Guards `run` being started against `cancel_requested`: a cancel that comes
        # between the scheduler taking the job and a step starting is never lost.
        self._start_lock = threading.Lock()

    @property
    def kind(self) -> str:
        return self.spec["type"]

    # -- running ------------------------------------------------------------------------

    def start(self, plan: Callable[["Job"], tuple[list[Step], list[str]]], on_started: Callable[["Job"], None],
              on_step: Callable[["Job"], None], on_finished: Callable[["Job"], None]) -> None:
        """Start the job's thread. It has `plan(job)` give the steps (and notes for the
        log; JobSetupError when the job cannot run), calls `on_started` once, `on_step`
        as each step's process starts, and `on_finished` once the outcome is known."""
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "spec.json").write_text(json.dumps(self.spec, indent=2))
        self._set_state(P.RUNNING)  # started_at waits for the first sleap-nn process
        on_started(self)
        threading.Thread(target=P.guarded(self._run), args=(plan, on_step, on_finished),
                         name=f"job-{self.job_id}-run", daemon=True).start()

    def _run(self, plan, on_step, on_finished) -> None:
        try:
            self.steps, notes = ((load_steps(self.dir), [f"the worker restarted; {self.reattach['note']}"])
                                 if self.reattach else plan(self))
            if self.executor.outlives_worker and not self.reattach:
                save_steps(self.dir, self.steps)
        except JobSetupError as exc:
            self.finish(P.FAILED, str(exc), on_finished)
            return
        except Exception as exc:  # a bug must fail this job, not keep its slot taken forever
            log.exception("job %s: planning its steps failed", self.job_id)
            self.finish(P.FAILED, f"the worker could not prepare the job: {exc!r}", on_finished)
            return
        self.log.start()
        for note in notes:
            self.log.say_line(note)
        error = None
        try:
            for index, step in enumerate(self.steps):
                if index < len(self.results):  # ran before the worker restarted
                    continue
                first_inference = step.kind == P.TRACK and (index == 0 or self.steps[index - 1].kind != P.TRACK)
                after_training = first_inference and "_infer_after" in self.spec
                if after_training:  # with the models the trainings did make
                    made = [_model_dir(s, self.started_at or 0) for s in self.steps[:index]]
                    step = self.steps[index] = after_training_step(
                        step.args[0], self.spec["_infer_after"], [str(m) for m in made if m], self.dir)
                    save_steps(self.dir, self.steps)
                if first_inference and ("package" in self.spec or after_training):
                    self.log.say(*P.inference_start(self.job_id))
                error = self._run_step(index, step, on_step)
                if error and after_training and not self.cancel_requested.is_set():
                    # The models are what was asked for; the inference after them is a bonus.
                    self.inference_failure, error = error, None
                if error or self.cancel_requested.is_set():
                    break
        except Exception as exc:  # a bug must fail this job and free its slot, not leave it running forever
            log.exception("job %s: running its steps failed", self.job_id)
            error = f"the worker failed while running the job: {exc!r}"
        finally:
            self.log.end()
        self.finish(*self._verdict(error), on_finished)

    def _run_step(self, index: int, step: Step, on_step) -> Optional[str]:
        """Run one step to its end; why the job cannot go on, or None."""
        saved = self.reattach["saved"] if self.reattach and self.reattach["step"] == index else None
        self.reattach = None
        channel = ports = None
        if step.kind == P.TRAIN and self.spec.get("gui", True):
            prefer = tuple(saved["ports"]) if saved and saved.get("ports") else None
            channel = ProgressChannel(self, self.executor.zmq_host, prefer)
            ports = channel.ports
            if prefer and ports != prefer:
                self.log.say_line(f"the progress ports {prefer} are taken; live progress of this step is lost")
        result = {"name": step.name, "kind": step.kind, "exit_code": None, "stopped_early": False}
        with self._start_lock:
            try:
                if self.cancel_requested.is_set() and saved is None:
                    raise _CancelledBeforeStart()
                executor = LocalExecutor() if step.kind in UNSLOTTED else self.executor  # they work here
                run = executor.attach(self, index, saved) if saved else executor.launch(self, index, step, ports)
            except (OSError, JobSetupError, _CancelledBeforeStart) as exc:
                if channel is not None:
                    channel.close()
                if isinstance(exc, _CancelledBeforeStart):
                    return None
                return str(exc) if isinstance(exc, JobSetupError) else f"cannot start {step.args[0]}: {exc}"
            self.run, self.step, self.command = run, step, run.command
            self.started_at = self.started_at or time.time()
        on_step(self)
        if saved is None:
            start = {P.TRAIN: P.TRAIN_JOB_START, P.TRACK: P.INFERENCE_JOB_START}.get(step.kind, P.COMMAND_START)
            self.log.say(start, {"name": step.name, "command": run.command})
        readers = [threading.Thread(target=P.guarded(self.log.read), args=(chunks, stream),
                                    name=f"job-{self.job_id}-{label}", daemon=True)
                   for stream, label, chunks in run.outputs()]
        if channel is not None:
            readers.append(threading.Thread(target=P.guarded(channel.forward), args=(run,),
                                            name=f"job-{self.job_id}-zmq", daemon=True))
        for thread in readers:
            thread.start()
        while True:
            self.exit_code = run.wait(timeout=CANCEL_GRACE_S if self.cancel_requested.is_set() else 1)
            if self.exit_code is not None:
                break
            if self.cancel_requested.is_set():
                run.signal(signal.SIGKILL)
        for thread in readers:
            thread.join()
        failure = run.failure()
        result["exit_code"] = self.exit_code
        if self.cancel_requested.is_set():
            result["state"] = P.CANCELLED
        elif self.exit_code != 0 or failure:
            result["state"] = P.FAILED
        else:
            result["state"] = P.COMPLETED
            result["stopped_early"] = step.kind == P.TRAIN and self.stop_requested.is_set()
        self.results.append(result)
        if step.kind == P.TRAIN:
            if result["state"] == P.COMPLETED:
                model_dir = _model_dir(step, self.started_at or 0)
                self.log.say(*P.train_job_end(self.job_id, step.name, result["stopped_early"],
                                              str(model_dir) if model_dir else None))
            else:
                self.log.say(*P.train_job_error(self.job_id, step.name, self.exit_code))
            self.stop_requested.clear()  # a stop ends this model; the next one trains in full
        if result["state"] == P.FAILED:
            program = step.name if step.kind == P.COMMAND else "sleap-nn"
            return failure or f"{program} exited with code {self.exit_code}"
        return None

    def run_changed(self, note: Optional[str], record: dict) -> None:
        """The running step's run changed (e.g. its SLURM state): `note` into the log,
        `record` (ledger columns) to the ledger."""
        if note:
            self.log.say_line(note)
        self.on_record(self, record)

    def _watch_line(self, stream: str, line: str) -> None:
        """Each line on its way into the log: stderr's tail is kept for the outcome, and an
        inference step's JSON progress lines become JOB_PROGRESS."""
        if stream == "e":
            self.stderr_tail.append(line)
        if stream == "o" and self.step is not None and self.step.kind == P.TRACK and line.startswith("{"):
            self._inference_progress(line)

    def _inference_progress(self, line: str) -> None:
        try:
            report = json.loads(line)
        except ValueError:
            return
        if isinstance(report, dict) and "n_processed" in report:
            self.log.emit(*P.job_inference_progress(self.job_id, report))

    def request_stop(self) -> str:
        step = self.step
        training = step.kind == P.TRAIN if step is not None else self.kind == P.TRAIN
        if not training or not self.spec.get("gui", True):
            self.cancel()
            return "this job has no progress channel now, so stop cancels it"
        self.stop_requested.set()
        if len(self.steps) > 1:
            return (f"stop sent; model {step.name if step else 'the first'} ends after the current batch and "
                    "keeps its weights, then the package goes on")
        return "stop sent; training ends after the current batch and keeps its model"

    def cancel(self, reason: str = "cancelled on request") -> None:
        """Terminate the run; before sleap-nn has started, keep it from starting."""
        with self._start_lock:
            self.cancel_reason = reason
            self.cancel_requested.set()
        self._signal(signal.SIGTERM)

    def _signal(self, sig: int) -> None:
        if self.run is not None:
            self.run.signal(sig)

    def finish(self, state: str, error: Optional[str], on_finished: Callable[["Job"], None]) -> None:
        """End the job, run or not (cancelled while queued): its outcome recorded, then its
        log closed, then `on_finished`."""
        self.finished_at = time.time()
        outputs, warnings = job_outputs(self)
        if self.inference_failure:
            warnings.append(f"the models trained; the inference after them failed: {self.inference_failure}")
        steps = self.results + [{"name": s.name, "kind": s.kind, "state": "not run"}
                                for s in self.steps[len(self.results):]]
        outcome = P.Outcome(state, self.exit_code, self._seconds_to(self.finished_at),
                            state == P.COMPLETED and any(r.get("stopped_early") for r in self.results), outputs,
                            "; ".join(warnings) or None, error,
                            list(self.stderr_tail) if state != P.COMPLETED else [], str(self.log_path), steps)
        # Recorded first, so that whoever hears of the outcome finds it in the ledger.
        self._set_state(state, finished_at=self.finished_at, exit_code=outcome.exit_code,
                        duration_s=outcome.duration_s, stopped_early=int(outcome.stopped_early),
                        outputs=outputs, warning=outcome.warning, error=error,
                        stderr_tail=outcome.stderr_tail, steps=steps)
        self.log.close(lambda: setattr(self, "outcome", outcome))
        on_finished(self)

    def _set_state(self, state: str, new: bool = False, **fields) -> None:
        """The one place a job's state changes: here and in the ledger (with `fields`,
        more of its columns), together; `new` adds the job's record."""
        self.state = state
        if self.ledger is None:
            return
        if new:
            self.ledger.add(self, **fields)
        else:
            self.ledger.update(self.job_id, state=state, **fields)

    def recorded(self) -> None:
        """The job was accepted: its first record, pending."""
        self._set_state(P.PENDING, new=True)

    def lost(self, why: str) -> None:
        """A job that was running when the worker stopped, and did not survive it: failed,
        with a last line in its log."""
        try:
            with open(self.log_path, "a", encoding="utf-8") as log_file:
                log_file.write(f"[sleap-rtc worker] {why}; this run was lost\n")
        except OSError:
            pass
        now = time.time()
        self._set_state(P.FAILED, finished_at=now, error=why, duration_s=self._seconds_to(now))

    def arriving(self) -> None:
        """A replica's files start arriving from another worker (see ReplicaReceiver): its
        first record, running."""
        self.started_at = time.time()
        self._set_state(P.RUNNING, new=True, started_at=self.started_at)

    def arrived(self, problem: Optional[str], outputs: list[dict]) -> None:
        """A replica's files were all checked (`problem` None) or were not."""
        self.finished_at = time.time()
        self._set_state(P.FAILED if problem else P.COMPLETED, finished_at=self.finished_at, outputs=outputs,
                        error=problem, duration_s=self._seconds_to(self.finished_at))

    def _seconds_to(self, finished_at: float) -> float:
        """Its duration: 0 for a job that never started."""
        return round(finished_at - (self.started_at or finished_at), 2)

    def _verdict(self, error: Optional[str]) -> tuple[str, Optional[str]]:
        """State and error of the run; SIGTERM exits 0 in sleap-nn, so a cancel is known by our own flag."""
        if self.cancel_requested.is_set():
            if not self.results:
                return P.CANCELLED, f"{self.cancel_reason} before sleap-nn started; it never ran"
            return P.CANCELLED, self.cancel_reason
        if error and len(self.steps) > 1:
            skipped = [s.name for s in self.steps[len(self.results):]]
            return P.FAILED, (f"{self.results[-1]['name'] if self.results else self.steps[0].name}: {error}"
                              + (f"; not run: {', '.join(skipped)}" if skipped else ""))
        return (P.FAILED, error) if error else (P.COMPLETED, None)



class ProgressChannel:
    """A training step's ZMQ sockets: sleap-nn's progress events in, stop-early out.

    Bound before the step starts (its ports go on sleap-nn's command line). Thread
    "job-ID-zmq" (`forward`) turns each event into JOB_PROGRESS and PROGRESS_REPORT for
    the job's listeners and, while the job wants a stop, repeats it until train_end,
    with SIGINT once if none comes within the job's stop grace; then it closes the sockets.
    """

    def __init__(self, job: Job, host: str, prefer: Optional[tuple[int, int]]):
        import zmq

        self.job = job
        self.context = zmq.Context()
        self.sub, self.pub, self.ports = bind_zmq_pair(self.context, host, prefer)
        self.train_ended = False  # the forwarding thread's own

    def close(self) -> None:
        self.sub.close()
        self.pub.close()
        self.context.term()

    def forward(self, run: Run) -> None:
        """Forward sleap-nn's progress until the run has ended and nothing is left to read."""
        import zmq

        job = self.job
        first_stop = last_stop = None
        interrupted = False
        try:
            while run.poll() is None or self.sub.poll(0):
                if self.sub.poll(ZMQ_POLL_MS, zmq.POLLIN):
                    self._on_report(self.sub.recv_string())
                if job.stop_requested.is_set() and not self.train_ended:
                    now = time.monotonic()
                    if last_stop is None or now - last_stop >= STOP_REPEAT_S:
                        self.pub.send_string(json.dumps({"command": "stop"}))
                        first_stop, last_stop = first_stop or now, now
                    if not interrupted and now - first_stop > job.stop_grace:
                        log.warning("job %s: no train_end %.0f s after stop; sending SIGINT", job.job_id,
                                    job.stop_grace)
                        run.signal(signal.SIGINT)
                        interrupted = True
        finally:
            self.close()

    def _on_report(self, text: str) -> None:
        step = self.job.step
        self.job.log.emit(*P.progress_report(self.job.job_id, text))
        try:
            report = json.loads(text)
        except ValueError:
            return
        event = report.get("event")
        logs = report.get("logs") or {}
        if event == "train_end":
            self.train_ended = True
        if event in ("train_begin", "epoch_begin", "epoch_end", "train_end"):
            self.job.log.emit(*P.job_epoch(self.job.job_id, event, report.get("epoch"), step.name if step else None,
                                           step.max_epochs if step else None,
                                           logs.get("train/loss", logs.get("loss")), logs.get("val/loss")))


def job_outputs(job: Job) -> tuple[list[dict], list[str]]:
    """Each model directory (every file in it, with its SHA-256) and predictions file
    the steps that ran made, and a warning for each completed step that made none."""
    outputs, warnings = [], []
    for step, result in zip(job.steps, job.results):
        if step.kind == P.TRAIN:
            model_dir = _model_dir(step, job.started_at or 0)
            if model_dir is None:
                if result["state"] == P.COMPLETED:
                    warnings.append(f"sleap-nn finished but no model appeared under {step.ckpt_dir}")
                continue
            files = [{"name": f.name, **dict(zip(("size", "sha256"), P.file_digest(f)))}
                     for f in sorted(model_dir.iterdir()) if f.is_file()]
            outputs.append({"kind": "model", "name": step.name, "path": str(model_dir), "files": files})
        elif step.kind == P.COMMAND:
            outputs += command_outputs(job.dir)
        elif step.kind == P.REPLICATE:
            outputs += optional(P.REPLICATE).replica_outputs(job.dir)
        elif step.kind != P.TRACK:
            continue
        elif step.output is not None and step.output.is_file():
            size, sha256 = P.file_digest(step.output)
            outputs.append({"kind": "predictions", "path": str(step.output), "size": size, "sha256": sha256})
            if result["state"] == P.COMPLETED and predicted_instances(step.output) == 0:
                warnings.append(f"sleap-nn predicted no instance on any frame ({step.output})")
        elif result["state"] == P.COMPLETED:
            warnings.append(f"sleap-nn finished but wrote no predictions file ({step.output})")
    package = job.spec.get("_package")
    if package and not package.get("uploaded"):
        base = Path(package["path"]).parent
        for output in outputs:
            output["relative"] = str(Path(output["path"]).relative_to(base))
    return outputs, warnings


def _model_dir(step: Step, since: float) -> Optional[Path]:
    """The model directory a training step made (since `since`): sleap-nn writes to
    RUN_NAME, or RUN_NAME-1, -2... when that already holds a model."""
    if step.ckpt_dir is None or not step.ckpt_dir.is_dir():
        return None
    candidates = [d for d in step.ckpt_dir.glob(f"{glob.escape(step.run_name)}*")
                  if (d / "training_config.yaml").exists() and d.stat().st_mtime >= since - 1]
    return max(candidates, key=lambda d: d.stat().st_mtime) if candidates else None


# ---------------------------------------------------------------------------------------
# Where steps run: children of this worker (or batch jobs on a SLURM cluster, slurm.py)
# ---------------------------------------------------------------------------------------
# A Job runs each step through its executor, which gives back a run: its output as chunks
# of bytes, poll/wait for the exit code, signals, `failure()` when something other than
# sleap-nn ended it, and `record`, what the ledger keeps of it. A run reports what changes
# while it runs (a line for the log, columns for the ledger) through Job.run_changed.
# LocalExecutor starts sleap-nn as a child; slurm.py's SlurmExecutor submits one batch job
# per step and follows its files. An executor whose runs outlive the worker
# (`outlives_worker`) has a restarted worker follow them again (`follow_again`, `attach`).

# The defaults of --slurm-poll and --slurm-patience (see slurm.py).
SLURM_POLL_S = 2.0  # how often one squeue call asks about every job the worker follows
SLURM_PATIENCE_S = 600.0  # SLURM silent this long about a job: the job fails rather than wait forever


def write_whole(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary name, so that a reader on this or another
    node (or a restarted worker) sees the old file or the new one, never half of one."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def _pipe_chunks(pipe) -> Iterator[bytes]:
    fd = pipe.fileno()
    try:
        while chunk := os.read(fd, 65536):
            yield chunk
    finally:
        pipe.close()


class Run(Protocol):
    """A step running: what a Job reads, waits for and signals (LocalRun, slurm.SlurmRun)."""

    command: list[str]
    record: dict  # what the ledger keeps of it: what a restarted worker ends or follows again

    def outputs(self) -> list[tuple[str, str, Iterator[bytes]]]: ...  # (stream, label, chunks) of each
    def poll(self) -> Optional[int]: ...
    def wait(self, timeout: float) -> Optional[int]: ...
    def signal(self, sig: int) -> None: ...
    def failure(self) -> Optional[str]: ...  # why it ended, when sleap-nn did not end it itself


class Executor(Protocol):
    """Where a Job's steps run (LocalExecutor, slurm.SlurmExecutor)."""

    name: str  # registration metadata's "executor"
    zmq_host: str  # the address sleap-nn's progress reaches the worker at
    outlives_worker: bool  # its runs go on when the worker stops; a restarted worker follows them

    def launch(self, job: "Job", index: int, step: "Step", ports: Optional[tuple[int, int]]) -> Run: ...
    def attach(self, job: "Job", index: int, saved: dict) -> Run: ...  # follow a run again
    def follow_again(self, record: dict) -> Optional[dict]: ...  # {step, saved, note} of a record's live run
    def describe(self) -> dict: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...


class LocalRun:
    """A step's sleap-nn as a child of this worker, in a process group of its own (as the
    user `run_as`, uid and gid, when the worker runs as root with --run-as)."""

    def __init__(self, command: list[str], cwd: Path, drop_env: list[str], extra_env: dict,
                 run_as: Optional[tuple[int, int]] = None):
        self.command = command
        env = {**{k: v for k, v in os.environ.items() if k not in drop_env}, **extra_env}
        identity: dict = {}
        if run_as is not None:
            identity = {"user": run_as[0], "group": run_as[1], "extra_groups": []}
            env["HOME"] = str(cwd)  # caches land in the job's directory, not root's home
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        stdin=subprocess.DEVNULL, cwd=cwd, env={**env, "PYTHONUNBUFFERED": "1"},
                                        start_new_session=True, **identity)
        self.record = {"pid": self.process.pid}  # for the ledger: what a restarted worker must end

    def outputs(self) -> list[tuple[str, str, Iterator[bytes]]]:
        return [("o", "stdout", _pipe_chunks(self.process.stdout)), ("e", "stderr", _pipe_chunks(self.process.stderr))]

    def poll(self) -> Optional[int]:
        return self.process.poll()

    def wait(self, timeout: float) -> Optional[int]:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def signal(self, sig: int) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                pass

    def failure(self) -> Optional[str]:
        return None


class LocalExecutor:
    """Steps run as children of the worker; a restart of the worker ends them. With
    `run_as` (uid, gid), they run as that user, who gets the job's directory."""

    name = "local"
    zmq_host = "127.0.0.1"
    outlives_worker = False

    def __init__(self, run_as: Optional[tuple[int, int]] = None):
        self.run_as = run_as

    def launch(self, job: "Job", index: int, step: "Step", ports: Optional[tuple[int, int]]) -> LocalRun:
        if self.run_as is not None and index == 0:
            # Once, before the user ran anything here: what lies in the directory now is
            # the worker's own (no link the user could have planted is followed).
            for path in [job.dir, *job.dir.rglob("*")]:
                os.chown(path, *self.run_as, follow_symlinks=False)
        return LocalRun(step.command(ports), step.cwd, step.drop_env, step.env, self.run_as)

    def attach(self, job: "Job", index: int, saved: dict) -> LocalRun:
        raise JobSetupError("a step of this worker's own ends with the worker; it cannot be followed again")

    def follow_again(self, record: dict) -> Optional[dict]:
        return None

    def describe(self) -> dict:
        return {"executor": self.name}

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


# ---------------------------------------------------------------------------------------
# Steps: the sleap-nn command of each, as an argument list
# ---------------------------------------------------------------------------------------

# Jobs that take no slot: a long training never holds up freeing the disk or copying results.
UNSLOTTED = (P.PRUNE, P.REPLICATE)
ZMQ_PUBLISH_PORT = 9001  # sleap-nn publishes progress here; the worker binds a SUB
ZMQ_CONTROL_PORT = 9000  # the worker binds a PUB here; sleap-nn subscribes for "stop"
LOG_BATCH_S = 0.05
LOG_BATCH_BYTES = 32 * 1024
STDERR_TAIL_LINES = 40
ZMQ_POLL_MS = 20  # also how late the poller sees sleap-nn exit, which holds the slot until then
STOP_REPEAT_S = 0.5
JOB_SUMMARY_FIELDS = ("job_id", "type", "state", "submitter", "submitted_at", "started_at", "finished_at",
                      "duration_s", "exit_code")
_HYDRA_ESCAPED_RE = re.compile(r"(\\*)('|\$\{|$)")


def hydra_value(text: str) -> str:
    """A string quoted for a Hydra override so that every character stays literal: '=', ','
    and spaces, quotes, and '${', which would otherwise be an interpolation. In Hydra's
    quoted strings a backslash is literal except before a quote, '${' or the end, where
    backslashes are doubled and the quote or '${' escaped."""
    def escape(match: re.Match) -> str:
        backslashes, what = match.groups()
        return backslashes * 2 + ("\\" + what if what else "")

    return "'" + _HYDRA_ESCAPED_RE.sub(escape, text) + "'"


def hydra_paths(value) -> str:
    """A resolved path, or a list of them, as a literal Hydra override value."""
    return f"[{','.join(hydra_value(v) for v in value)}]" if isinstance(value, list) else hydra_value(value)


def safe_run_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]", "_", name)[:100] or "run"


@dataclass
class Step:
    """One sleap-nn run of a job: the training of one model, or one inference."""

    kind: str  # P.TRAIN, P.TRACK, P.COMMAND, P.PRUNE or P.REPLICATE
    name: str  # the model's name, "inference", the command's name, or the step's kind
    args: list[str]  # the command, less the progress ports a training gets when it starts
    cwd: Path
    ckpt_dir: Optional[Path] = None  # training: the model goes to ckpt_dir/run_name (or run_name-1, ...)
    run_name: str = ""
    max_epochs: Optional[int] = None  # training: as the config or spec says, for progress
    output: Optional[Path] = None  # inference: the predictions file
    drop_env: list[str] = dataclasses.field(default_factory=list)  # variables the run does not get (secret-looking)
    env: dict = dataclasses.field(default_factory=dict)  # variables it gets besides (a replicate step's credentials)

    def command(self, zmq_ports: Optional[tuple[int, int]]) -> list[str]:
        return self.args + zmq_overrides(zmq_ports)


def save_steps(job_dir: Path, steps: list[Step]) -> None:
    """Keep a job's planned steps in its directory: a restarted worker follows the job's
    runs again with exactly these, without planning (or unpacking) anew."""
    saved = [{**step.__dict__, **{k: str(v) for k, v in step.__dict__.items() if isinstance(v, Path)}, "env": {}}
             for step in steps]  # env: a replicate step's credentials stay out of files
    write_whole(job_dir / "steps.json", json.dumps(saved, indent=1))  # a restart reads it whole or not at all


def load_steps(job_dir: Path) -> list[Step]:
    try:
        saved = json.loads((job_dir / "steps.json").read_text())
    except (OSError, ValueError) as exc:
        raise JobSetupError(f"cannot follow the job again: its steps.json is unreadable ({exc})") from None
    paths = {"cwd", "ckpt_dir", "output"}
    return [Step(**{k: Path(v) if k in paths and v is not None else v for k, v in s.items()}) for s in saved]


def zmq_overrides(ports: Optional[tuple[int, int]]) -> list[str]:
    """The overrides that have a training publish progress to ports[0] and take control
    from ports[1], both on 127.0.0.1 of the machine it runs on."""
    if not ports:
        return []
    return [f"++trainer_config.zmq.publish_port={ports[0]}", f"++trainer_config.zmq.controller_port={ports[1]}"]


def train_step(executable: str, spec: dict, job_dir: Path, config_file: str = CONFIG_FILE) -> Step:
    """The sleap-nn training of a structured job.

    It runs the config copy in the job's directory (`config_file`), and every path the
    config or spec names is passed as the real path resolved at acceptance
    (`spec["_resolved"]`)."""
    paths = spec["_resolved"]
    model = Path(spec["config"]).stem
    run_name = safe_run_name(spec.get("run_name") or f"{model}-{job_dir.name}")
    # sleap-nn resolves a relative ckpt_dir against its working directory, the job's.
    ckpt_dir = Path(paths.get("trainer_config.ckpt_dir") or job_dir / "models")
    args = [executable, "train", "--config-dir", str(job_dir), "--config-name", Path(config_file).stem]
    overrides = {"trainer_config.save_ckpt": "true", "trainer_config.ckpt_dir": hydra_value(str(ckpt_dir)),
                 "trainer_config.run_name": hydra_value(run_name)}
    for key, value in paths.items():
        if key != "trainer_config.ckpt_dir":
            overrides[key] = hydra_paths(value)
    if spec.get("max_epochs"):
        overrides["trainer_config.max_epochs"] = str(spec["max_epochs"])
    if spec.get("batch_size"):
        overrides["trainer_config.train_data_loader.batch_size"] = str(spec["batch_size"])
        overrides["trainer_config.val_data_loader.batch_size"] = str(spec["batch_size"])
    if spec.get("learning_rate"):
        overrides["trainer_config.optimizer.lr"] = repr(float(spec["learning_rate"]))
    # "++" sets a key whether or not the YAML has it.
    args += [f"++{key}={value}" for key, value in overrides.items()]
    return Step(P.TRAIN, model, args, job_dir, ckpt_dir, run_name, spec.get("max_epochs") or spec.get("_epochs"))


def job_stages(spec: dict) -> list[dict]:
    """A structured spec as the specs of its models: itself, then one per entry of
    `_more` (the further models of a sleap-rtc 0.0.7 multi-model train, each with its own
    config, run name, resolved paths and `_config_file`)."""
    return [spec, *({**spec, **more} for more in spec.get("_more", []))]


def track_step(executable: str, spec: dict, job_dir: Path) -> Step:
    """The sleap-nn inference of a structured job."""
    paths = spec["_resolved"]
    output = Path(paths["output"]) if paths.get("output") else \
        job_dir / f"{Path(spec['data_path']).name.split('.')[0]}.predictions.slp"
    args = [executable, "track", "--data_path", paths["data_path"]]
    for model in paths["model_paths"]:
        args += ["--model_paths", model]
    args += ["--output_path", str(output)]
    if spec.get("batch_size"):
        args += ["--batch_size", str(spec["batch_size"])]
    if spec.get("peak_threshold") is not None:
        args += ["--peak_threshold", str(float(spec["peak_threshold"]))]
    frame_filter = spec.get("frame_filter") or ("suggested" if spec.get("only_suggested_frames") else None)
    if frame_filter:
        args.append(P.FRAME_FILTERS[frame_filter])
    if spec.get("exclude_user_labeled"):
        args.append("--exclude_user_labeled")
    if spec.get("video_index") is not None:
        args += ["--video_index", str(spec["video_index"])]
    if spec.get("frames"):
        args += ["--frames", spec["frames"]]
    if spec.get("gui", True):
        args.append("--gui")
    return Step(P.TRACK, "inference", args, job_dir, output=output)


def after_training_step(executable: str, labels: str, models: list[str], job_dir: Path) -> Step:
    """Inference on the suggested frames of the training labels with the models just
    trained, into the job's directory: what a sleap-rtc client (and the SLEAP GUI) expects
    after a training whose spec names its labels (the job's `_infer_after`). Planned with
    the model directories the trainings should make, and made again with the ones they
    did make just before it runs (sleap-nn picks run_name-1 when run_name is taken)."""
    name = Path(labels).name
    stem = name[:-len(".pkg.slp")] if name.endswith(".pkg.slp") else name.rsplit(".", 1)[0]
    return track_step(executable, {"data_path": labels, "frame_filter": "suggested", "_resolved": {
        "data_path": labels, "model_paths": models, "output": str(job_dir / f"{stem}.predictions.slp")}}, job_dir)


def structured_steps(executable: str, job: "Job") -> list[Step]:
    """The steps of a train or track spec, paths as resolved at acceptance: one, or for a
    multi-model train (a sleap-rtc 0.0.7 client's, see job_stages) one per model, in
    order, then the inference after training when the spec asks for it."""
    if job.kind != P.TRAIN:
        return [track_step(executable, job.spec, job.dir)]
    steps = [train_step(executable, stage, job.dir, stage.get("_config_file", CONFIG_FILE))
             for stage in job_stages(job.spec)]
    if job.spec.get("_infer_after"):
        planned = [str(step.ckpt_dir / step.run_name) for step in steps]
        steps.append(after_training_step(executable, job.spec["_infer_after"], planned, job.dir))
    return steps


def bind_zmq_pair(context, host: str = "127.0.0.1", prefer: Optional[tuple[int, int]] = None):
    """A SUB for progress and a PUB for control on `host`: the `prefer`red ports (sleap-nn's
    defaults unless given) when free, else any free pair, so two workers never collide."""
    import zmq

    sub, pub = context.socket(zmq.SUB), context.socket(zmq.PUB)
    sub.setsockopt_string(zmq.SUBSCRIBE, "")
    for sock in (sub, pub):
        sock.setsockopt(zmq.LINGER, 0)
    ports = []
    for sock, default in zip((sub, pub), prefer or (ZMQ_PUBLISH_PORT, ZMQ_CONTROL_PORT)):
        try:
            sock.bind(f"tcp://{host}:{default}")
            ports.append(default)
        except zmq.ZMQError:
            ports.append(sock.bind_to_random_port(f"tcp://{host}"))
    return sub, pub, (ports[0], ports[1])


def predicted_instances(path: Path) -> Optional[int]:
    """How many predicted instances a predictions file holds (None when it cannot say)."""
    try:
        import sleap_io

        labels = sleap_io.load_slp(str(path), open_videos=False)
        return sum(len(frame.predicted_instances) for frame in labels.labeled_frames)
    except Exception as exc:  # sleap-io raises many types on a file it cannot read; the count is only a hint
        log.info("could not count the predictions in %s: %s", path, exc)
        return None


class Planner:
    """What a starting job runs: `plan(job)` (the scheduler's `plan`, called on the job's
    thread) gives its steps from the paths checked again, a package read again and
    unpacked, and notes for its log; JobSetupError says why it cannot run."""

    def __init__(self, worker: "Worker"):
        self.worker = worker

    def plan(self, job: Job) -> tuple[list[Step], list[str]]:
        """A starting job's steps, from paths checked again (a package is read again, and
        unpacked); JobSetupError says why it cannot run. Runs on the job's thread.

        A member's steps run without the worker's secrets (hidden_env); its sleap-nn steps
        with SLEAP_NN_ENV."""
        worker = self.worker
        if "_resolved" not in job.spec:
            raise JobSetupError("accepted by an older version of this worker, which did not resolve its paths; "
                                "submit it again")
        models = [m for stage in job_stages(job.spec) for m in stage.get("_resolved", {}).get("model_paths", [])]
        problem = worker.store_problem(job.spec) or recheck_checkpoints(
            job.spec.get("_checkpoints", {}), models, worker.scheduler.ledger.model_digests)
        if problem:
            raise JobSetupError(problem)
        steps, notes = self._steps_of(job)
        if job.kind not in UNSLOTTED:
            hidden = hidden_env(worker.allowed_env)
            for step in steps:
                step.drop_env = hidden
                if step.kind in (P.TRAIN, P.TRACK):
                    step.env.update(SLEAP_NN_ENV)
        return steps, notes

    def _steps_of(self, job: Job) -> tuple[list[Step], list[str]]:
        worker, scheduler = self.worker, self.worker.scheduler
        if job.kind == P.REPLICATE:
            return [optional(P.REPLICATE).replicate_step_of(self.worker, job)], []
        if job.kind == P.PRUNE:
            plan = prune_plan(scheduler.ledger.select(limit=-1), scheduler.jobs_dir, worker.uploads,
                              worker.needed_uploads(), job.spec, job.job_id)
            return [prune_step_of(job, plan, [scheduler.jobs_dir, worker.uploads.directory])], []
        if job.kind == P.COMMAND:  # its paths again, as they resolve now
            asked = {k: v for k, v in job.spec.items() if not k.startswith("_")}  # as the client sent it
            errors, command, inputs = validate_command(asked, worker.allowed_commands, worker.mounts, worker.stores,
                                                       job.dir)
            if errors or command != job.spec["_command"] or inputs != job.spec.get("_inputs", []):
                raise JobSetupError("; ".join(e["message"] for e in errors) or
                                    "a path argument resolves elsewhere than when the job was accepted")
            return [command_step(job.spec, job.dir)], []
        if "_package" not in job.spec:
            notes = []
            for relabel in job.spec.get("_relabel", []):  # before the recheck, which wants the copies to exist
                try:
                    Path(relabel["copy"]).parent.mkdir(parents=True, exist_ok=True)
                    write_labels_copy(relabel["source"], relabel["copy"], relabel["videos"])
                except Exception as exc:  # sleap-io raises many types on a file it cannot read or write
                    raise JobSetupError(f"writing {relabel['copy']} with the mapped video paths failed: {exc}") \
                        from None
                maps = ", ".join(f"{old}={new}" for old, new in relabel["map"])
                notes.append(f"{relabel['source']}: videos mapped with {maps}; sleap-nn reads the copy "
                             f"{relabel['copy']} (the original is unchanged)")
            for stage in job_stages(job.spec):
                problem = recheck_paths(stage["_resolved"], worker.readable_mounts, worker.mounts, job.dir)
                if problem:
                    raise JobSetupError(problem)
            return structured_steps(scheduler.executable, job), notes
        return optional(P.PACKAGE).prepare(job, worker.readable_mounts, worker.mounts, scheduler.executable,
                                scheduler.ledger.model_digests)


# ---------------------------------------------------------------------------------------
# Command jobs: executables the worker's admin allowed by name, never a shell
# ---------------------------------------------------------------------------------------
# A command job runs one allowed executable with the client's arguments, as an argument
# list, in the job's directory. Every place a path may start inside an argument is
# checked: the word itself, a --option=VALUE, what follows any '=' or ':', and in an
# option word every character after the dashes up to its first '/' (getopt takes the
# value of a short option glued to it: -o/x, -xfVALUE). Each must lie inside the mounts
# or the job's own directory, where the command may read and write; the word itself (or
# an option's =VALUE) is passed resolved. A file in the upload store or another job's
# directory, which no command may write, is read through a copy in the job's directory.
# Environment variables whose names or values look secret are not passed on.

SECRET_ENV_RE = re.compile(r"TOKEN|SECRET|PASSW|KEY|CREDENTIAL|AUTH|PRIVATE|COOKIE|SESSION", re.IGNORECASE)
# A value with credentials in it: scheme://user:password@host (a database URL and the like).
SECRET_VALUE_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@")
# Files of a job's directory that are the worker's own, not a command's output.
_OWN_FILE_RE = re.compile(r"(job\.log|spec\.json|steps\.json|config\.yaml|step-\d+\..*|\..*)")
COMMAND_INPUTS_DIR = "inputs"  # copies of the uploads and other jobs' files a command reads
MAX_COMMAND_OUTPUTS = 100


def parse_allowed_command(text: str) -> tuple[str, str]:
    """NAME=EXECUTABLE from --allow-command: the name and the executable's absolute path."""
    name, sep, executable = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
        raise argparse.ArgumentTypeError(f"want NAME=EXECUTABLE (NAME: letters, digits, '.', '_', '-'), not {text!r}")
    found = shutil.which(executable)
    if found is None:
        raise argparse.ArgumentTypeError(f"{executable!r} is not an executable here (for command {name})")
    return name, str(Path(found).resolve())


def _looks_like_path(text: str) -> bool:
    return text.startswith(("/", "./", "../", "~")) or "/" in text or text in (".", "..")


def _path_starts(word: str) -> list[str]:
    """Every tail of an argument word where a program may read a path, but the word itself:
    after a separator (=, :, a list's comma or semicolon, white space), and in an option
    word anywhere a glued value may start."""
    starts = {i + 1 for i, c in enumerate(word) if c in "=:,; \t\n"}
    if word.startswith("-"):
        dashes = len(word) - len(word.lstrip("-"))
        last = word.index("/") if "/" in word else len(word) - 1
        starts |= set(range(dashes, last + 1))
    return [word[i:] for i in sorted(starts) if 0 < i < len(word)]


def validate_command(spec: dict, allowed: dict[str, str], mounts: list[Mount], stores: list[Mount],
                     job_dir: Path) -> tuple[list[dict], list[str], list[dict]]:
    """Errors of a command spec on this worker, the argument list it will run, and the
    files it reads through copies ({source, copy}): those in `stores` (the upload store
    and the jobs' directories), which are read-only to commands."""
    errors = P.check_spec(spec)
    if errors:
        return errors, [], []
    name = spec["command"]
    if name not in allowed:
        offered = ", ".join(sorted(allowed)) or "none (its admin allows them with --allow-command NAME=EXECUTABLE)"
        return [P.spec_error("command", f"{name!r} is not a command this worker allows; it allows: {offered}",
                             "NOT_ALLOWED")], [], []
    places = mounts + [Mount(job_dir, "job")]
    command, inputs = [allowed[name]], []
    for index, arg in enumerate(spec.get("args") or []):
        where = f"argument {index + 1} ({P.echo(arg)})"
        option, sep, value = arg.partition("=") if arg.startswith("-") else ("", "", arg)
        try:
            if not _looks_like_path(value):
                command.append(arg)
            else:
                try:
                    resolved = resolve_in_mounts(value, places, job_dir)
                except PathRefused as refused:
                    try:
                        source = resolve_in_mounts(value, stores, job_dir)
                    except PathRefused:
                        raise refused from None
                    if not source.is_file():
                        raise PathRefused(f"{source} is in the upload store or another job's directory, which "
                                          "commands only read, through a copy of a file (not of a directory)",
                                          "ACCESS_DENIED") from None
                    resolved = job_dir / COMMAND_INPUTS_DIR / f"{index + 1}-{source.name}"
                    inputs.append({"source": str(source), "copy": str(resolved)})
                command.append(f"{option}{sep}{resolved}")
            for tail in _path_starts(arg):
                if tail != value and _looks_like_path(tail):
                    try:
                        resolve_in_mounts(tail, places, job_dir)
                    except PathRefused as exc:
                        raise PathRefused(f"the program may read {P.echo(tail)} in it as a path, and {exc}; give "
                                          "a path as an argument of its own (or --option=PATH)", exc.code) from None
        except PathRefused as exc:
            errors.append({**P.spec_error("args", f"{where}: {exc}", exc.code), "path": value[:MAX_PATH_CHARS]})
    return errors, command, inputs


def hidden_env(allowed_env: set[str]) -> list[str]:
    """The variables of the worker's environment a member's job does not get: those whose
    names or values look secret, unless the admin named them (--allow-env)."""
    return sorted(k for k, v in os.environ.items()
                  if (SECRET_ENV_RE.search(k) or SECRET_VALUE_RE.search(v)) and k not in allowed_env)


def command_step(spec: dict, job_dir: Path) -> Step:
    """The one step of an accepted command job; its input copies are made here."""
    for entry in spec.get("_inputs", []):
        Path(entry["copy"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(entry["source"], entry["copy"])
    return Step(P.COMMAND, spec["command"], list(spec["_command"]), job_dir)


def command_outputs(job_dir: Path) -> list[dict]:
    """The files a command left in its job's directory, with size and SHA-256."""
    outputs = []
    for path in sorted(job_dir.rglob("*")):
        if len(outputs) >= MAX_COMMAND_OUTPUTS:
            break
        if path.is_relative_to(job_dir / COMMAND_INPUTS_DIR):
            continue
        own = path.parent == job_dir and _OWN_FILE_RE.fullmatch(path.name)
        if path.is_file() and not path.is_symlink() and not own:
            size, sha256 = P.file_digest(path)
            outputs.append({"kind": "file", "path": str(path), "size": size, "sha256": sha256})
    return outputs


# ---------------------------------------------------------------------------------------
# Validating a job: every path and the config, once, at acceptance
# ---------------------------------------------------------------------------------------

MAX_CONFIG_BYTES = 1024 * 1024
MAX_CONFIG_NODES = 100_000  # values in a config once YAML aliases are expanded
# Keys of a sleap-nn config that name what a run reads, and where it writes.
CONFIG_READS = ("data_config.train_labels_path", "data_config.val_labels_path", "data_config.test_file_path",
                "trainer_config.resume_ckpt_path", "model_config.pretrained_backbone_weights",
                "model_config.pretrained_head_weights")
CONFIG_WRITES = ("trainer_config.ckpt_dir", "data_config.cache_img_path")
# Spec fields that replace a config key, and whether sleap-nn wants a list there.
SPEC_CONFIG_KEYS = {"labels": ("data_config.train_labels_path", True),
                    "val_labels": ("data_config.val_labels_path", True),
                    "resume": ("trainer_config.resume_ckpt_path", False)}
WRITES = set(CONFIG_WRITES) | {"output"}
# ${name:...} is an OmegaConf resolver (oc.env reads the worker's environment); ${a.b} is not.
RESOLVER_RE = re.compile(r"\$\{\s*[A-Za-z_][\w.-]*\s*:")


def validate_job(spec: dict, mounts: list[Mount], write_mounts: list[Mount], job_dir: Path,
                 store_dir: Optional[Path] = None,
                 trusted: Callable[[], set[str]] = set) -> tuple[list[dict], dict]:
    """All problems of a spec on this worker, one per field, and what the run will use.

    A package job is checked by `validate_package` (`store_dir` holds uploads).
    Every checkpoint it names must be data (see check_checkpoint; `trusted` gives the
    SHA-256 of the models this worker trained itself); plan["checkpoints"] keeps the
    identity of each, to recheck when the job starts.

    Every path, from the spec or inside the config, is resolved once, here: reads must
    exist inside `mounts`, writes must fall inside `write_mounts` or the job's directory.
    The plan holds the resolved real paths (`paths`, by spec field or config key) and for
    training the config's text (`config_text`: parsed once; resolvers, Hydra settings,
    aliases that expand too far and files over MAX_CONFIG_BYTES are refused).
    """
    errors = P.check_spec(spec)
    if errors and errors[0]["field"] == "type":
        return errors, {}
    if "package" in spec:
        if errors:
            return errors, {}
        try:
            packages = optional(P.PACKAGE)
        except CapabilityMissing as exc:
            return [exc.spec_error("package")], {}
        return packages.validate_package(spec, mounts, write_mounts, job_dir, store_dir, trusted)
    bad = {e["field"] for e in errors}
    writable = write_mounts + [Mount(job_dir, "job")]
    plan: dict = {"paths": {}}
    fields: dict[str, str] = {}  # plan key -> the spec field it came from

    def take(field: str, key: str, value, writes: bool = False, in_config: bool = False) -> None:
        """Resolve `value` (a path or a list of them) into plan["paths"][key], or add an
        error for `field` that names the path and key, for the client to offer fixes."""
        resolved = []
        for text in value if isinstance(value, list) else [value]:
            try:
                resolved.append(resolve_path(text, writable if writes else mounts, job_dir if in_config else None,
                                              must_exist=not writes, in_config=in_config))
            except PathRefused as exc:
                errors.append({**P.spec_error(field, f"{key}: {exc}" if in_config else str(exc), exc.code),
                               "path": str(text)[:MAX_PATH_CHARS], "key": key})
                return
        plan["paths"][key] = resolved if isinstance(value, list) else resolved[0]
        fields[key] = field

    if spec["type"] == P.TRACK:
        for field in ("data_path", "model_paths"):
            if field not in bad:
                take(field, field, spec[field])
        if spec.get("output"):
            take("output", "output", spec["output"], writes=True)
            if "output" in plan["paths"] and not Path(plan["paths"]["output"]).parent.is_dir():
                errors.append(P.spec_error("output", f"directory {Path(plan['paths']['output']).parent} does not "
                                           "exist on the worker", "NOT_FOUND"))
        _check_labels(spec, plan, fields, errors, mounts, write_mounts, job_dir)
        _check_checkpoints(plan, fields, errors, trusted)
        return errors, plan
    for field, (key, as_list) in SPEC_CONFIG_KEYS.items():
        if spec.get(field) and field not in bad:
            take(field, key, [spec[field]] if as_list else spec[field])
    if "config" in bad:
        return errors, plan
    try:
        config_path = Path(resolve_path(spec["config"], mounts))
    except PathRefused as exc:
        errors.append({**P.spec_error("config", str(exc), exc.code), "path": spec["config"], "key": "config"})
        return errors, plan
    config, text, problem = _read_config(config_path)
    if problem:
        errors.append(P.spec_error("config", problem, "BAD_CONFIG"))
        return errors, plan
    plan["config_text"] = text
    epochs = spec.get("max_epochs") or config_value(config, "trainer_config.max_epochs")
    if isinstance(epochs, int) and not isinstance(epochs, bool) and epochs > 0:
        plan["epochs"] = epochs  # what the client shows as epoch 3/50, whoever set it
    for key in CONFIG_READS + CONFIG_WRITES:
        value = config_value(config, key)
        if key not in plan["paths"] and value not in (None, "", [], "."):  # "." is ckpt_dir's default: the job's
            take("config", key, value, writes=key in CONFIG_WRITES, in_config=True)
    _check_labels(spec, plan, fields, errors, mounts, write_mounts, job_dir)
    _check_checkpoints(plan, fields, errors, trusted)
    return errors, plan


def _check_labels(spec: dict, plan: dict, fields: dict, errors: list, mounts: list[Mount],
                  write_mounts: list[Mount], job_dir: Path) -> None:
    """Check the videos of every labels file the job reads (see check_videos), after the
    spec's path_map. A labels file whose videos the map moved is run as a copy, written
    when the job starts: next to the original when that directory is writable, else in
    the job's directory (plan["relabel"])."""
    path_map = spec.get("path_map") or []
    for old, new in path_map:
        try:
            resolve_in_mounts(new, mounts)
        except PathRefused as exc:
            errors.append(P.spec_error("path_map", f"{old}={new}: {exc}", exc.code))
    if any(e["field"] == "path_map" for e in errors):
        return
    for key in LABELS_KEYS:
        value = plan["paths"].get(key)
        if value is None or (key == "data_path" and not str(value).endswith(".slp")):
            continue
        used = []
        for path in value if isinstance(value, list) else [value]:
            problems, rewrite = check_videos(path, mounts, path_map, write_mounts)
            for problem in problems:
                message, code = problem.pop("message"), problem.pop("code")
                errors.append({**P.spec_error(fields[key], message, code), **problem, "key": key})
            if rewrite:
                source = Path(path)
                try:
                    resolve_in_mounts(str(source.parent), write_mounts)
                    copy = source.with_name(f"{source.stem}.resolved-{job_dir.name}.slp")
                except PathRefused:
                    copy = job_dir / f"{source.stem}.resolved.slp"
                plan.setdefault("relabel", []).append({"key": key, "source": path, "copy": str(copy), "map": path_map,
                                                       "videos": {str(i): n for i, n in rewrite.items()}})
                path = str(copy)
            used.append(path)
        plan["paths"][key] = used if isinstance(value, list) else used[0]


def resolve_path(text, mounts: list[Mount], base: Optional[Path] = None, must_exist: bool = True,
                  in_config: bool = False) -> str:
    """A path from a peer, resolved inside `mounts` (a relative one against `base`);
    PathRefused says why not. A config's own value may not interpolate: OmegaConf would
    read it differently from the worker."""
    if not isinstance(text, str) or not text:
        raise PathRefused(f"expected a path, not {P.echo(text)}")
    if in_config and "${" in text:
        raise PathRefused(f"{text[:80]} uses an interpolation; write the path out")
    path = resolve_in_mounts(text, mounts, base)
    if must_exist and not path.exists():
        raise PathRefused(f"{path} does not exist on the worker", "NOT_FOUND")
    return str(path)


def _read_config(path: Path) -> tuple[dict, str, Optional[str]]:
    """(config, its text, None), or (_, _, what is wrong with it)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        return {}, "", f"{path} is not readable: {exc}"
    return parse_config(data, str(path))


def parse_config(data: bytes, path: str) -> tuple[dict, str, Optional[str]]:
    """The config in `data` (read from `path`), as `_read_config` answers."""
    import yaml

    if len(data) > MAX_CONFIG_BYTES:
        return {}, "", f"{path} is larger than {MAX_CONFIG_BYTES // 1024} KiB; a sleap-nn config is a few KiB"
    try:
        text = data.decode("utf-8")
        config = yaml.safe_load(text)
    except (UnicodeDecodeError, yaml.YAMLError, RecursionError) as exc:
        return {}, "", f"{path} is not readable YAML: {str(exc)[:300]}"
    if not isinstance(config, dict):
        return {}, "", f"{path} is not a YAML mapping of sleap-nn settings"
    problem = _config_problem(config)
    return config, text, (f"{path}: {problem}" if problem else None)


def _config_problem(config: dict) -> Optional[str]:
    """What in a parsed config the worker refuses to hand to sleap-nn, or None."""
    for key in ("defaults", "hydra"):
        if key in config:
            return f"the top-level key '{key}' changes how Hydra runs; it is the worker's to set"
    nodes, stack = 0, [config]
    while stack:
        node = stack.pop()
        nodes += 1
        if nodes > MAX_CONFIG_NODES:
            return (f"expands to more than {MAX_CONFIG_NODES} values (YAML aliases repeated inside each other?); "
                    "a sleap-nn config has a few hundred")
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, str) and RESOLVER_RE.search(node):
            return (f"{node[:80]!r} calls an OmegaConf resolver; resolvers (oc.env and the like) can read the "
                    "worker's environment and are refused. Plain ${a.b} references are fine")
    return internet_problem(config)


def internet_problem(settings: dict) -> Optional[str]:
    """What in sleap-nn settings (a config, or a package's overrides as {dotted key:
    value}) would have the job reach the internet, or None: no job does on a member's
    say-so. Weights & Biases uploads the run; an ImageNet-pretrained ConvNeXt or Swin
    backbone downloads its weights from torchvision; an external HuggingFace backbone
    downloads model, weights and possibly code."""
    def value(key: str):
        return settings[key] if key in settings else config_value(settings, key)

    if value("trainer_config.use_wandb") not in (None, False, "false", "False", 0):
        return ("trainer_config.use_wandb: true would upload the run to Weights & Biases; this worker runs no job "
                "that reaches the internet (set it to false; the worker streams loss and logs to you)")
    backbones = value("model_config.backbone_config")
    for name, backbone in (backbones.items() if isinstance(backbones, dict) else []):
        key = f"model_config.backbone_config.{name}"
        if name == "pretrained" and backbone is not None:
            return (f"{key}: an external HuggingFace backbone is downloaded from the internet, which no job on this "
                    "worker does (use a unet, convnext or swint backbone)")
        if isinstance(backbone, dict) and backbone.get("pre_trained_weights") not in (None, "", "null"):
            return (f"{key}.pre_trained_weights: {P.echo(backbone['pre_trained_weights'])} is downloaded from the "
                    "internet, which no job on this worker does (set it to null, or start from a checkpoint with "
                    "model_config.pretrained_backbone_weights)")
    for key, setting in settings.items():  # a package's overrides
        if key.startswith("model_config.backbone_config.") and (
                (key.endswith(".pre_trained_weights") and setting not in (None, "", "null"))
                or key.split(".")[2] == "pretrained"):
            return f"{key}: downloads from the internet, which no job on this worker does"
    return None


def config_value(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def recheck_paths(paths: dict, mounts: list[Mount], write_mounts: list[Mount], job_dir: Path) -> Optional[str]:
    """Resolve a job's paths again when it starts: None when each still resolves to itself
    inside the mounts (and each read still exists), else why the job must not run."""
    writable = write_mounts + [Mount(job_dir, "job")]
    for key, value in paths.items():
        for text in value if isinstance(value, list) else [value]:
            try:
                now = resolve_path(text, writable if key in WRITES else mounts, must_exist=key not in WRITES)
            except PathRefused as exc:
                return f"{key}: {exc} (it changed after the job was accepted)"
            if now != text:
                return f"{key}: {text} now leads to {now} (a link changed after the job was accepted)"
    return None


# ---------------------------------------------------------------------------------------
# Checkpoints: data, never code
# ---------------------------------------------------------------------------------------
# This file never unpickles anything: its one torch.load (probe_checkpoint_step) passes
# weights_only=True, in a child process. sleap-nn, though, loads checkpoints with full
# unpickling (its own torch.load calls, not ours), so a file a member names as one
# (resume, pretrained weights, a track job's model) could run code as the worker. One is
# accepted only if it is a model this worker trained itself (its SHA-256 is in the
# ledger), or if torch loads it with weights_only=True in a child process bounded in time
# and memory (`worker.py probe-checkpoint`); sleap-nn's own checkpoints need no extra
# allowed globals. And every sleap-nn step runs with TORCH_FORCE_WEIGHTS_ONLY_LOAD=1
# besides (SLEAP_NN_ENV), under which sleap-nn 0.3.5 trains, resumes, starts from
# pretrained weights and tracks.

# Config keys whose file sleap-nn unpickles; with a track job's model_paths.
CHECKPOINT_KEYS = ("trainer_config.resume_ckpt_path", "model_config.pretrained_backbone_weights",
                   "model_config.pretrained_head_weights")
MAX_MODEL_CHECKPOINTS = 16  # *.ckpt files looked at in one model directory
CHECKPOINT_PROBE_S = 120.0
CHECKPOINT_PROBE_MEMORY = 6 * 2**30  # address space for torch itself; plus three times the file's size
# What every sleap-nn step runs with: torch refuses to unpickle anything but weights, and
# nothing in sleap-nn reaches the internet.
SLEAP_NN_ENV = {"TORCH_FORCE_WEIGHTS_ONLY_LOAD": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1"}


def checkpoint_files(path: str) -> list[Path]:
    """The files sleap-nn may unpickle for a path: itself, or the checkpoints of a model
    directory (a track job's model_paths)."""
    if not Path(path).is_dir():
        return [Path(path)]
    found = sorted(Path(path).glob("*.ckpt"))
    if len(found) > MAX_MODEL_CHECKPOINTS:
        raise PathRefused(f"{path} holds {len(found)} checkpoints; a model directory has one or two", "BAD_MODEL")
    return found


def file_identity(path: Path) -> list[int]:
    info = path.stat()
    return [info.st_size, info.st_mtime_ns, info.st_ino]


def check_checkpoint(path: Path, trusted: set[str]) -> tuple[Optional[dict], Optional[str]]:
    """({identity, sha256} of a checkpoint that is data, None), or (None, why it is refused)."""
    identity = file_identity(path)
    _, sha256 = P.file_digest(path)
    if sha256 in trusted:
        return {"identity": identity, "sha256": sha256}, None
    why = probe_checkpoint(path)
    if why:
        return None, (f"{path} is refused: checkpoints are unpickled, so this worker takes only models it trained "
                      f"itself and files torch loads as plain weights, and torch refuses this one ({why})")
    return {"identity": identity, "sha256": sha256}, None


def probe_checkpoint(path: Path) -> Optional[str]:
    """Why torch will not load `path` as weights only (None when it does), asked of a
    child with CHECKPOINT_PROBE_S and an address-space limit, without the worker's secrets."""
    limit = CHECKPOINT_PROBE_MEMORY + 3 * path.stat().st_size
    hidden = set(hidden_env(set()))
    env = {k: v for k, v in os.environ.items() if k not in hidden}
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", **SLEAP_NN_ENV)
    try:
        probe = subprocess.run([sys.executable, str(Path(__file__).resolve()), "probe-checkpoint", str(limit),
                                str(path)], capture_output=True, text=True, timeout=CHECKPOINT_PROBE_S, env=env,
                               stdin=subprocess.DEVNULL, cwd=path.parent)
    except subprocess.TimeoutExpired:
        return f"loading it took longer than {CHECKPOINT_PROBE_S:.0f} s"
    except OSError as exc:
        return f"the worker could not start its checker: {exc}"
    if probe.returncode == 0:
        return None
    lines = [line for line in probe.stderr.splitlines() if line.strip()]
    return (lines[-1] if lines else f"the checker exited with {probe.returncode}")[:300]


def probe_checkpoint_step(argv: list[str]) -> int:
    """`worker.py probe-checkpoint LIMIT PATH`: exit 0 when torch loads PATH with
    weights_only=True within LIMIT bytes of address space, else say why on stderr."""
    import resource

    limit, path = int(argv[0]), argv[1]
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        import torch

        torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        print(f"it needs more than {limit // 2**20} MB to load", file=sys.stderr)
        return 1
    except Exception as exc:  # torch raises many types on a file it will not load; each means no
        print(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", file=sys.stderr)
        return 1
    return 0


def _check_checkpoints(plan: dict, fields: dict, errors: list, trusted: Callable[[], set[str]]) -> None:
    """A field error for each checkpoint in plan["paths"] that is not data; the identity
    of each that is, in plan["checkpoints"]."""
    known: Optional[set[str]] = None
    for key in (*CHECKPOINT_KEYS, "model_paths"):
        values = plan["paths"].get(key)
        for path in values if isinstance(values, list) else [values] if values else []:
            try:
                files = checkpoint_files(path)
            except PathRefused as exc:
                errors.append({**P.spec_error(fields[key], f"{key}: {exc}", exc.code), "key": key})
                continue
            for file in files:
                known = trusted() if known is None else known
                checked, why = check_checkpoint(file, known)
                if why:
                    message = f"{key}: {why}" if fields[key] == "config" else why
                    errors.append({**P.spec_error(fields[key], message, "UNSAFE_CHECKPOINT"), "key": key})
                else:
                    plan.setdefault("checkpoints", {})[str(file)] = checked


def recheck_checkpoints(checkpoints: dict, models: list[str], trusted: Callable[[], set[str]]) -> Optional[str]:
    """When a job starts: why one of its checkpoints must not be used (changed since it
    was accepted, or new in one of its `models` directories, and not data), or None."""
    try:
        found = [str(f) for model in models for f in checkpoint_files(model)]
    except PathRefused as exc:
        return str(exc)
    for path in dict.fromkeys([*checkpoints, *found]):
        try:
            if path in checkpoints and file_identity(Path(path)) == checkpoints[path]["identity"]:
                continue
            _, why = check_checkpoint(Path(path), trusted())
        except OSError as exc:
            return f"{path}: {exc.strerror} (it changed after the job was accepted)"
        if why:
            return f"{why} (it changed after the job was accepted)"
    return None


# ---------------------------------------------------------------------------------------
# Videos a labels file points at: checked at acceptance, mapped to this worker's paths
# ---------------------------------------------------------------------------------------

# The labels files of a job, by plan key.
LABELS_KEYS = ("data_config.train_labels_path", "data_config.val_labels_path", "data_config.test_file_path",
               "data_path")
PROPOSED_CANDIDATES = 5


def path_parts(path: str) -> list[str]:
    """A path from any machine as its parts (backslashes and drive letters too)."""
    return [part for part in re.split(r"[\\/]+", path) if part]


def map_path(path: str, path_map: list) -> Optional[str]:
    """`path` with the first matching [old prefix, new prefix] of `path_map` applied, or None."""
    parts = path_parts(path)
    for old, new in path_map:
        prefix = path_parts(old)
        if prefix and parts[:len(prefix)] == prefix:
            return str(Path(new, *parts[len(prefix):]))
    return None


def _prefix_maps(old: str, new: str) -> list[tuple[str, str]]:
    """Every pair of prefixes that turns `old` into `new`, keeping at least the file name:
    /a/b/x.mp4 and /c/b/x.mp4 give (/a/b, /c/b) and (/a, /c)."""
    a, b = path_parts(old), path_parts(new)
    maps = []
    for same in range(1, min(len(a), len(b))):
        if a[-same] != b[-same]:
            break
        prefix = a[:len(a) - same]
        text = "\\".join(prefix) if "\\" in old and "/" not in old else "/".join(prefix)
        maps.append(("/" + text if old.startswith("/") else text, str(Path("/", *b[:len(b) - same]))))
    return maps


def check_videos(labels_path: str, mounts: list[Mount], path_map: list,
                 search_mounts: Optional[list[Mount]] = None) -> tuple[list[dict], Optional[dict]]:
    """Every video a labels file names must exist inside the mounts, after `path_map`.

    Returns (problems, rewrite): a problem per missing video, with candidates found by
    its file name in `search_mounts` (default: the mounts) and a proposed prefix
    mapping; rewrite, when the mapping changed a
    video, is {index: new file name(s)} for a copy of the labels. Embedded frames need
    no video. Without sleap-io (a worker that cannot read labels) nothing is checked."""
    try:
        import sleap_io
    except ImportError:
        return [], None
    try:
        labels = sleap_io.load_slp(labels_path, open_videos=False)
    except Exception as exc:  # sleap-io raises many types on a file it cannot read
        return [{"message": f"{labels_path} is not a readable SLEAP labels file: {str(exc)[:200]}",
                 "code": "BAD_LABELS"}], None
    problems, rewrite = [], {}
    for index, video in enumerate(labels.videos):
        if (getattr(video, "backend_metadata", None) or {}).get("has_embedded_images"):
            continue
        names = video.filename if isinstance(video.filename, list) else [video.filename]
        mapped = [map_path(str(n), path_map) for n in names]
        missing = []
        for original, new in zip(names, mapped):
            try:
                if not resolve_in_mounts(new or str(original), mounts).exists():
                    missing.append(str(original))
            except PathRefused as exc:
                if new is not None:
                    problems.append({"message": f"{labels_path}: video {index} maps to {new}, which is outside the "
                                     f"worker's mounts ({exc})", "code": "ACCESS_DENIED", "path": str(original)})
                    break
                missing.append(str(original))
        else:
            if missing:
                shown = missing[0] if len(names) == 1 else f"{len(missing)} of the {len(names)} images of {names[0]}"
                problems.append({"message": f"{labels_path}: video {index} {shown} does not exist on the worker",
                                 "code": "VIDEO_NOT_FOUND", "path": missing[0], "video": True})
            elif any(mapped):
                new_names = [m or str(n) for m, n in zip(mapped, names)]
                rewrite[index] = new_names if isinstance(video.filename, list) else new_names[0]
    missing_videos = [p for p in problems if p.get("video")]
    if missing_videos:
        _propose(missing_videos, mounts, search_mounts or mounts)
    return problems, rewrite or None


def _propose(problems: list[dict], mounts: list[Mount], search_mounts: list[Mount]) -> None:
    """Candidates by file name for each missing video (one walk of `search_mounts`), and
    the prefix mapping that resolves the most of them inside `mounts`."""
    wanted = {path_parts(p["path"])[-1]: p for p in problems}
    found: dict[str, list[str]] = {name: [] for name in wanted}
    for entry in _walk_files(search_mounts, time.monotonic() + SEARCH_SECONDS):
        if entry.name in found and len(found[entry.name]) < PROPOSED_CANDIDATES:
            found[entry.name].append(entry.path)
    mappings = {m for name, p in wanted.items() for c in found[name] for m in _prefix_maps(p["path"], c)}
    best, resolved = None, 0
    for old, new in sorted(mappings, key=lambda m: -len(path_parts(m[0]))):  # the most specific wins a tie
        count = 0
        for problem in problems:
            target = map_path(problem["path"], [[old, new]])
            try:
                count += bool(target) and resolve_in_mounts(target, mounts).exists()
            except PathRefused:
                pass
        if count > resolved:
            best, resolved = (old, new), count
    for name, problem in wanted.items():
        problem["candidates"] = found[name]
    for problem in problems:
        problem.setdefault("candidates", [])
        if best:
            problem["proposal"] = {"old": best[0], "new": best[1], "resolves": resolved, "of": len(problems)}


def write_labels_copy(source: str, copy: str, rewrite: dict) -> None:
    """A copy of a labels file whose videos are renamed by `rewrite` (index: new name);
    the original is only read. Written beside its final name, then renamed."""
    import sleap_io

    labels = sleap_io.load_slp(source, open_videos=False)
    names = [rewrite.get(str(i), rewrite.get(i, video.filename)) for i, video in enumerate(labels.videos)]
    labels.replace_filenames(new_filenames=names, open_videos=False)
    partial = Path(copy).with_name(f".part-{Path(copy).name}")  # sleap-io picks the format by the .slp ending
    labels.save(str(partial), embed=False)
    os.replace(partial, copy)


# ---------------------------------------------------------------------------------------
# Looking at the worker's files: listings and a bounded search, inside the mounts only
# ---------------------------------------------------------------------------------------

LIST_PAGE = 500  # entries in one FS_LISTING
SEARCH_DEPTH = 5  # directories below a mount that a search descends
SEARCH_SECONDS = 10.0
SEARCH_RESULTS = 20
SEARCH_MIN_CHARS = 3  # of a search pattern that are not wildcards
SEARCH_MIN_SCORE = 0.75  # name similarity (0-1) below which a file is no candidate
_GLOB_CHARS = re.compile(r"[*?\[\]]")


def _inside(path: Path, mounts: list[Mount]) -> bool:
    return any(m.contains(path) for m in mounts)


def list_directory(path: Optional[str], mounts: list[Mount], offset: int = 0, nearest: bool = False) -> dict:
    """One page of a directory inside the mounts (directories first, then files, by name),
    or the mounts when no path is given. With `nearest`, the deepest existing directory
    on the way to `path`. Entries that are links leading out of the mounts are left out."""
    if not path:
        return {"mounts": [m.public() for m in mounts], "entries": [], "total": 0, "offset": 0}
    directory = _nearest_directory(path, mounts) if nearest else resolve_in_mounts(path, mounts)
    if not directory.is_dir():
        raise PathRefused(f"{directory} is not a directory on the worker", "NOT_FOUND")
    entries = []
    try:
        with os.scandir(directory) as scan:
            for entry in scan:
                try:
                    if not _inside(Path(entry.path).resolve() if entry.is_symlink() else Path(entry.path), mounts):
                        continue  # a link leading out, or the worker's own files
                    info = entry.stat()
                    kind = "dir" if entry.is_dir() else "file"
                except OSError:  # vanished, or a dangling link
                    continue
                entries.append({"name": entry.name, "kind": kind, "size": info.st_size if kind == "file" else None,
                                "mtime": info.st_mtime})
    except OSError as exc:
        raise PathRefused(f"{directory} cannot be read: {exc.strerror}", "NOT_FOUND") from None
    entries.sort(key=lambda e: (e["kind"] != "dir", e["name"].lower()))
    offset = max(0, offset)
    return {"path": str(directory), "entries": entries[offset:offset + LIST_PAGE], "total": len(entries),
            "offset": offset}


def _nearest_directory(path: str, mounts: list[Mount]) -> Path:
    """The deepest existing directory inside a mount on the way to `path` (the first mount
    when none is)."""
    candidate = Path(path)
    for folder in [candidate, *candidate.parents]:
        try:
            resolved = resolve_in_mounts(str(folder), mounts)
        except PathRefused:
            continue
        if resolved.is_dir():
            return resolved
    return mounts[0].path


def _walk_files(mounts: list[Mount], deadline: float):
    """The DirEntry of every file inside the mounts, breadth first, never through a link,
    down to SEARCH_DEPTH; stops at `deadline` (time.monotonic)."""
    seen: set[Path] = set()
    pending = collections.deque((m.path, 0) for m in mounts)
    while pending and time.monotonic() < deadline:
        directory, level = pending.popleft()
        if directory in seen:
            continue
        seen.add(directory)
        try:
            with os.scandir(directory) as scan:
                entries = list(scan)
        except OSError:
            continue
        for entry in entries:
            if entry.is_symlink() or not _inside(Path(entry.path), mounts):
                continue
            if entry.is_dir(follow_symlinks=False):
                if level < SEARCH_DEPTH:
                    pending.append((Path(entry.path), level + 1))
            elif entry.is_file(follow_symlinks=False):
                yield entry


def search_files(pattern: str, mounts: list[Mount], size: Optional[int] = None,
                 seconds: float = SEARCH_SECONDS) -> dict:
    """Files inside the mounts whose name is like `pattern` (a file name, or a glob):
    the exact name first, then by name similarity, the same size (when given) and recency;
    bounded in depth, time and results. A short name (under SEARCH_MIN_CHARS before its
    extension) is looked for exactly, as cheap as any search; a short glob, which would
    match nearly everything, raises PathRefused."""
    import difflib
    import fnmatch

    name = re.split(r"[\\/]", str(pattern))[-1].lower()
    globbed = bool(_GLOB_CHARS.search(name))
    exact_only = len(_GLOB_CHARS.sub("", name.rsplit(".", 1)[0] if "." in name else name)) < SEARCH_MIN_CHARS
    if exact_only and (globbed or not name.strip(".")):
        raise PathRefused(f"{str(pattern)[:80]!r} is too broad to search for; give at least {SEARCH_MIN_CHARS} "
                          "characters of the file name before its extension (a whole file name of any length "
                          "is found as it is)", "TOO_BROAD")
    started = time.monotonic()
    deadline = started + seconds
    matcher = difflib.SequenceMatcher(b=name, autojunk=False)
    found, scanned = [], 0
    for entry in _walk_files(mounts, deadline):
        scanned += 1
        lowered = entry.name.lower()
        if globbed:
            score = 1.0 if fnmatch.fnmatchcase(lowered, name) else 0.0
        elif exact_only:
            score = 1.0 if lowered == name else 0.0
        else:
            matcher.set_seq1(lowered)
            # real_quick_ratio and quick_ratio are cheap upper bounds of ratio: most names stop there.
            score = 1.0 if lowered == name else matcher.ratio() if (
                matcher.real_quick_ratio() >= SEARCH_MIN_SCORE and matcher.quick_ratio() >= SEARCH_MIN_SCORE) else 0
        if score < SEARCH_MIN_SCORE:
            continue
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        found.append({"path": entry.path, "size": info.st_size, "mtime": info.st_mtime, "score": round(score, 3)})
    complete = time.monotonic() < deadline
    newest = max((f["mtime"] for f in found), default=0)
    # The name as typed first; then the same size is strong evidence; recency breaks near ties.
    for candidate in found:
        rank = (2.0 if not globbed and os.path.basename(candidate["path"]).lower() == name else 0) + \
            candidate["score"] + (0.5 if size is not None and candidate["size"] == size else 0)
        candidate["rank"] = rank - min(0.1, (newest - candidate["mtime"]) / 86400 / 365)
    found.sort(key=lambda c: -c.pop("rank"))
    return {"candidates": found[:SEARCH_RESULTS], "complete": complete, "scanned": scanned,
            "seconds": round(time.monotonic() - started, 3)}


def files_answer(name: str, payload: dict, worker: "Worker") -> tuple[str, dict]:
    """The answer to FS_LIST or FS_SEARCH: a listing or a search of the worker's files,
    inside the mounts a client may read. A search takes up to SEARCH_SECONDS of the
    asking session's thread: it delays only that client."""
    reply: dict = {}
    query = P.FilesQuery.read(name, payload)
    try:
        if query.problem:
            raise PathRefused(query.problem)
        if name == P.FS_LIST:
            reply.update(list_directory(query.path, worker.readable_mounts, query.offset, query.nearest))
        else:  # the admin's mounts only: copies in job directories would crowd out the originals
            reply.update(search_files(query.name, worker.mounts, query.size))
    except PathRefused as exc:
        reply.update(error=str(exc), code=exc.code)
    return P.fs_answer(name, query.request_id, reply)


def result_files(job_id: str, record: Optional[dict], mounts: list[Mount]) -> tuple[list[Path], Optional[str]]:
    """The files a JOB_FETCH sends (a completed job's outputs, each checked when served:
    a file replaced by a link since the job ended is not followed out), and why there is
    nothing, or not everything, to send."""
    if record is None:
        return [], f"no job {job_id} on this worker"
    if record["state"] != P.COMPLETED:
        return [], f"job {job_id} is {record['state']}; only a completed job has results"
    if record.get("pruned"):
        return [], f"the files of job {job_id} were pruned {pruned_note(record['pruned'])}"
    paths, error = [], None
    allowed = mounts + [Mount(Path(record["job_dir"]), "job")]
    for output in record["outputs"] or []:
        named = [Path(output["path"])] if output["kind"] in ("predictions", "file") else \
            [Path(output["path"]) / f["name"] for f in output.get("files", [])]
        for path in named:
            try:
                paths.append(resolve_in_mounts(str(path), allowed))
            except PathRefused as exc:
                error = f"{path} is not served: {exc}"
    return paths, error


# ---------------------------------------------------------------------------------------
# The upload store: what clients sent, by content
# ---------------------------------------------------------------------------------------

UPLOAD_CACHE_GB = 50.0
# Beside an upload's names: who sent it, and the file's identity when its hash was last
# checked. Hidden, so never a name a client sees.
UPLOAD_META_FILE = ".meta.json"
PART_TTL_S = 86400.0  # a cut-off upload nobody resumed for this long is removed


def uploader(user: str) -> str:
    """How the upload store names a signed-in user among the senders of an upload."""
    return f"user:{user}"


class UploadsFrom:
    """The upload store as one member's link writes into it: each upload knows its sender."""

    def __init__(self, store: "UploadStore", sender: str):
        self.store, self.sender = store, sender

    def incoming(self, transfer_id: str, name: str, size: int, sha256: str, offset: int) -> P.Incoming:
        return self.store.incoming(transfer_id, name, size, sha256, offset, self.sender)


class UploadStore:
    """Uploaded files by SHA-256: DIRECTORY/<sha256>/<name>, so that the same bytes are
    never sent twice and a file keeps the name (and extension) sleap-nn looks at.

    An upload arrives through DIRECTORY/.<sha256>.part and is renamed only once its hash
    checks; a cut-off one keeps its part, and the next attempt resumes from the bytes
    held. What is stored is read-only to jobs (mode 0444, and no job may name it for a
    write); a hit is trusted only while the file's identity (size, mtime, inode) is what
    it was when its hash was checked, else it is hashed again, and removed if it no
    longer matches its name. Parts count toward `cap` and expire after PART_TTL_S. Past
    `cap` bytes, the least recently used content (or part) that no queued or running job
    needs (`needed()` gives those hashes) is removed. No upload starts that would leave
    less than `min_free` bytes free.
    """

    def __init__(self, directory: Path, cap: Optional[int], needed: Callable[[], set[str]], min_free: int = 0):
        self.directory = directory
        self.cap = cap
        self.needed = needed
        self.min_free = min_free
        directory.mkdir(parents=True, exist_ok=True)
        # Guards _active (hash -> (the upload in progress, its sender)) and every read-modify-
        # write of a meta file. The link that started an upload may still be open when its
        # sender reconnects and resumes on a new one.
        self._lock = threading.Lock()
        self._active: dict[str, tuple[P.Incoming, str]] = {}
        # Guarded by _lock too: who last wrote to each cut-off upload, so that only it resumes
        # it (forgotten on restart: then the first to resume takes it over).
        self._writers: dict[str, str] = {}

    # -- what is held ---------------------------------------------------------------------

    def contents(self) -> list[Path]:
        """The directory of each stored content, by hash."""
        return sorted(c for c in self.directory.iterdir() if c.is_dir() and P.SHA256_RE.fullmatch(c.name))

    @staticmethod
    def names(content: Path) -> list[Path]:
        """The names (hard links to the same bytes) a content is known by."""
        return sorted(f for f in content.iterdir() if f.is_file() and not f.name.startswith("."))

    def _meta(self, content: Path) -> dict:
        try:
            meta = json.loads((content / UPLOAD_META_FILE).read_text())
            return meta if isinstance(meta, dict) else {}
        except (OSError, ValueError):
            return {}

    def uploaders(self, sha256: str) -> set[str]:
        return set(self._meta(self.directory / sha256).get("uploaders", []))

    def stored(self, path: Path, sender: str) -> None:
        """An upload arrived at `path` (its hash checked on the way in): read-only from now
        on, its identity and sender noted."""
        with self._lock:
            if path.is_file():
                path.chmod(0o444)
                self._note(path.parent, path, sender)

    def _note(self, content: Path, held: Path, sender: Optional[str]) -> None:  # the caller holds _lock
        meta = self._meta(content)
        meta["identity"] = file_identity(held)
        if sender:
            meta["uploaders"] = sorted(set(meta.get("uploaders", [])) | {sender})
        write_whole(content / UPLOAD_META_FILE, json.dumps(meta))

    def held(self, sha256: str, sender: Optional[str] = None) -> Optional[Path]:
        """One name of a stored content whose bytes still hash to `sha256`, or None: a file
        whose identity changed since its hash was checked is hashed again, and a content
        that no longer matches its name is removed."""
        content = self.directory / sha256
        with self._lock:
            names = self.names(content) if content.is_dir() else []
            if not names:
                return None
            if self._meta(content).get("identity") != file_identity(names[0]):
                if P.file_digest(names[0])[1] != sha256:
                    log.warning("upload store: %s no longer holds the bytes its name says (changed on disk); "
                                "removed", content)
                    shutil.rmtree(content, ignore_errors=True)
                    return None
                names[0].chmod(0o444)
            self._note(content, names[0], sender)
        return names[0]

    def verify(self, path: str) -> Optional[str]:
        """Why a path a job names inside the store must not be used (its content changed
        since it was stored), or None (also for any path outside the store)."""
        sha = self.content_of(path)
        if sha is not None and self.held(sha) is None:
            return f"{path}: the upload store no longer holds those bytes (changed on disk); upload it again"
        return None

    def status(self, payload: dict, sender: str) -> P.Outgoing:
        """The answer to UPLOAD_QUERY: the content's path when held, else the bytes of it held."""
        query = P.UploadQuery.read(payload)
        if query.problem:
            return P.upload_status(query.sha256, error=query.problem)
        sha256, size, name = query.sha256, query.size, query.name
        held = self.held(sha256, sender)
        if held is not None and held.stat().st_size == size:
            named = held.parent / name
            if not named.exists():
                os.link(held, named)  # the same bytes under the name this client knows them by
            os.utime(held.parent)  # recently used
            return P.upload_status(sha256, have=True, path=str(named))
        part = self._part(sha256)
        return P.upload_status(sha256, offset=min(part.stat().st_size, size) if part.exists() else 0)

    # -- arriving -------------------------------------------------------------------------

    def incoming(self, transfer_id: str, name: str, size: int, sha256: str, offset: int,
                 sender: str) -> P.Incoming:
        """The receiving end of an upload (called by a link's receive thread); raises
        TransferError. An upload of content another member is sending now, a fresh start
        over a part that holds bytes, or a resume from any byte but the last one held,
        is refused, and so is any attempt by another member on a part that holds bytes: one
        member cannot truncate or delete what another sends."""
        content = self.directory / sha256
        part = self._part(sha256)

        def final() -> Path:
            content.mkdir(exist_ok=True)
            return content / name

        free = shutil.disk_usage(self.directory).free
        if free - (size - offset) < self.min_free:
            raise P.TransferError(f"the worker keeps {self.min_free / 1e9:g} GB free (--min-free-gb); this upload "
                                  f"would leave {max(0, free - size + offset) / 1e9:.1f} GB")
        with self._lock:
            previous = self._active.get(sha256)
            if previous is not None and not previous[0].closed and previous[1] != sender:
                raise P.TransferError("another member is uploading the same content now; try again once it ends "
                                      "(the worker keeps what arrives)")
            held = part.stat().st_size if part.exists() else 0
            if held and self._writers.get(sha256, sender) != sender:
                raise P.TransferError("another member's upload of the same content was cut off here; only it "
                                      f"resumes it (or it goes after {PART_TTL_S / 3600:.0f} h unused)")
            if offset != held and not (previous is not None and not previous[0].closed):
                raise P.TransferError(f"the worker holds {held} bytes of this upload: send from byte {held} "
                                      "(client.py upload resumes on its own)")
            self._writers[sha256] = sender
            incoming = P.Incoming(transfer_id, name, size, sha256, part, final, offset, resumable=True)
            # Finished uploads need no tracking: keep the map to what may still be written.
            self._active = {sha: held for sha, held in self._active.items() if not held[0].closed}
            self._active[sha256] = (incoming, sender)
        self.settle()  # the new upload may push the store past its cap: make room first
        if previous is not None and not previous[0].closed:
            previous[0].release("superseded by a newer upload of the same content from the same member")
        return incoming

    # -- keeping the store bounded ----------------------------------------------------------

    def stale_parts(self, cutoff: float) -> list[tuple[Path, str, int]]:
        """Cut-off uploads not written to since `cutoff` that no link is writing now: (the
        part, its content's SHA-256, its size)."""
        with self._lock:
            active = {sha for sha, (incoming, _) in self._active.items() if not incoming.closed}
        parts = []
        for part in self.directory.glob(".*.part"):
            sha = part.name[1:-len(".part")]
            try:
                info = part.stat()
            except OSError:
                continue
            if P.SHA256_RE.fullmatch(sha) and sha not in active and info.st_mtime < cutoff:
                parts.append((part, sha, info.st_size))
        return parts

    def settle(self) -> list[str]:
        """Remove cut-off uploads nobody resumed for PART_TTL_S, then keep the store under
        its cap, parts counted; the hashes removed."""
        removed = []
        for part, sha, _ in self.stale_parts(time.time() - PART_TTL_S):
            part.unlink(missing_ok=True)
            removed.append(sha)
            log.info("upload store: removed the cut-off upload %s (nobody resumed it for %.0f h)", part.name,
                     PART_TTL_S / 3600)
        if self.cap is None:
            return removed
        needed = self.needed()
        entries = []
        for content in self.contents():
            names = self.names(content)  # every name is a hard link to the same bytes
            entries.append((content.stat().st_mtime, content, content.name, names[0].stat().st_size if names else 0))
        entries += [(part.stat().st_mtime, part, sha, size) for part, sha, size in self.stale_parts(float("inf"))]
        total = sum(size for *_, size in entries)
        for _, path, sha, size in sorted(entries, key=lambda e: e[0]):
            if total <= self.cap:
                break
            if sha in needed:
                continue
            if path.is_file():
                path.unlink(missing_ok=True)
            else:
                shutil.rmtree(path, ignore_errors=True)
            total -= size
            removed.append(sha)
            log.info("upload store: removed %s (%d bytes, least recently used) to stay under %d bytes",
                     path.name, size, self.cap)
        return removed

    def listing(self, records: list[dict], needed: set[str]) -> list[dict]:
        """What `files ls` shows: each content with its size, names, senders, last use, the
        jobs that named it and whether a queued or running job needs it; then each cut-off
        upload (`partial`) with the bytes held."""
        jobs: dict[str, list[str]] = {}
        for record in records:
            for sha in {self.content_of(text) for text in _named_paths(record["spec"])} - {None}:
                jobs.setdefault(sha, []).append(record["job_id"])
        files = []
        for content in self.contents():
            names = self.names(content)
            files.append({"sha256": content.name, "size": names[0].stat().st_size if names else 0,
                          "names": [n.name for n in names], "uploaders": sorted(self.uploaders(content.name)),
                          "last_use": content.stat().st_mtime, "jobs": sorted(set(jobs.get(content.name, []))),
                          "needed": content.name in needed})
        for part, sha, size in self.stale_parts(float("inf")):
            files.append({"sha256": sha, "size": size, "names": [], "uploaders": [], "partial": True,
                          "last_use": part.stat().st_mtime, "jobs": [], "needed": False})
        return files

    def content_of(self, path: str) -> Optional[str]:
        """The SHA-256 of the stored content a path inside the store names, else None."""
        if not Path(path).is_relative_to(self.directory):
            return None
        parts = Path(path).relative_to(self.directory).parts
        return parts[0] if parts and P.SHA256_RE.fullmatch(parts[0]) else None

    def _part(self, sha256: str) -> Path:
        return self.directory / f".{sha256}.part"


# ---------------------------------------------------------------------------------------
# Maintenance: pruning the files of old jobs and unused uploads
# ---------------------------------------------------------------------------------------
# A prune job is planned on its job's thread (what to remove, what to keep and why) and
# run as `worker.py prune-step`, a child like any step, so that it is logged, can be
# cancelled and leaves its record. Only directories under the worker's jobs and uploads
# directories are ever removed; the ledger keeps every job's record and notes the prune.

PRUNE_PLAN_FILE = "prune-plan.json"
PRUNE_RESULT_FILE = "prune-result.json"
PRUNE_DEFAULT_S = 30 * 86400.0
PRUNE_EVERY_S = 86400.0  # worker --keep-days: how often it prunes on its own
_FINAL_STATES = (P.COMPLETED, P.FAILED, P.CANCELLED)


def _named_paths(spec: dict) -> list[str]:
    """Every path an accepted spec names on this worker."""
    named = [spec.get("_package", {}).get("path"), *spec.get("_command", [])[1:],
             *(i["source"] for i in spec.get("_inputs", []))]
    for stage in job_stages(spec):
        for value in stage.get("_resolved", {}).values():
            named += value if isinstance(value, list) else [value]
    return [text for text in named if isinstance(text, str) and text.startswith("/")]


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def prune_plan(records: list[dict], jobs_dir: Path, store: "UploadStore", needed_uploads: set[str],
               spec: dict, own_job_id: str) -> dict:
    """What a prune job removes: the directories of jobs finished before the cutoff
    (failed ones too unless `keep_failed`), except those whose files a later job names,
    and uploads unused since the cutoff that no queued or running job needs. With
    `uploads` (hashes or their first digits: `client.py files rm`) only those uploads,
    whatever their age, and no job.

    Its `_scope` (set by the worker, never by the client) says whose: {"all": True} for
    the worker's admins and its own --keep-days, which also take cut-off uploads (.part)
    unused since the cutoff; {"owner": USER} for a member, who removes only USER's jobs
    and the uploads only USER sent."""
    cutoff = time.time() - spec.get("older_than_s", PRUNE_DEFAULT_S)
    chosen = spec.get("uploads")
    scope = spec.get("_scope") or {}
    everything, owner = bool(scope.get("all")), scope.get("owner")
    jobs_dir = jobs_dir.resolve()
    users = [(r["submitted_at"], r["job_id"], Path(p)) for r in records for p in _named_paths(r["spec"])]
    plan: dict = {"jobs": [], "uploads": [], "kept": [], "dry_run": bool(spec.get("dry_run"))}
    held = store.contents()
    if chosen is not None:
        picked = set()
        for prefix in chosen:
            matches = [c for c in held if c.name.startswith(prefix)]
            if len(matches) == 1:
                picked.add(matches[0])
            else:
                plan["kept"].append({"upload": prefix, "why": "no such upload" if not matches else
                                     f"{len(matches)} uploads start with it; give more digits"})
        held, cutoff, records = sorted(picked), float("inf"), []
    for record in records:
        if (record["job_id"] == own_job_id or record["state"] not in _FINAL_STATES or record.get("pruned")
                or (record["finished_at"] or cutoff) >= cutoff or not (everything or record.get("owner") == owner)):
            continue
        if spec.get("keep_failed") and record["state"] == P.FAILED:
            plan["kept"].append({"job_id": record["job_id"], "why": "it failed (--keep-failed)"})
            continue
        job_dir = Path(record["job_dir"])
        if not job_dir.is_dir() or job_dir.resolve().parent != jobs_dir:
            continue
        user = next(((job_id, path) for when, job_id, path in users if when > record["submitted_at"]
                     and job_id != record["job_id"] and path.is_relative_to(job_dir)), None)
        if user is not None:
            plan["kept"].append({"job_id": record["job_id"], "why": f"job {user[0]} uses {user[1]}"})
            continue
        plan["jobs"].append({"job_id": record["job_id"], "path": str(job_dir), "bytes": _tree_bytes(job_dir)})
    for content in held:
        if content.stat().st_mtime >= cutoff:
            continue
        if content.name in needed_uploads:
            plan["kept"].append({"upload": content.name, "why": "a queued or running job needs it"})
            continue
        if not everything and store.uploaders(content.name) != {uploader(owner)}:
            if chosen is not None:
                plan["kept"].append({"upload": content.name, "why": "other members sent it too; only this "
                                     "worker's admins (worker.py --admin USER) remove it"})
            continue
        plan["uploads"].append({"sha256": content.name, "path": str(content), "bytes": _tree_bytes(content)})
    if everything and chosen is None:
        for part, sha, size in store.stale_parts(cutoff):
            plan["uploads"].append({"sha256": sha, "path": str(part), "bytes": size, "part": True})
    return plan


def prune_step(argv: list[str]) -> int:
    """`worker.py prune-step`: carry out a prune plan, saying what goes and what stays."""
    parser = argparse.ArgumentParser(prog="worker.py prune-step")
    parser.add_argument("plan", type=Path)
    parser.add_argument("result", type=Path)
    parser.add_argument("--root", action="append", type=Path, required=True, help="nothing outside is removed")
    args = parser.parse_args(argv)
    plan = json.loads(args.plan.read_text())
    roots = [root.resolve() for root in args.root]
    dry = plan["dry_run"]
    for kept in plan["kept"]:
        print(f"kept {'job ' + kept['job_id'] if 'job_id' in kept else 'upload ' + kept['upload']}: {kept['why']}")
    removed, freed = [], 0
    for entry in plan["jobs"] + plan["uploads"]:
        path = Path(entry["path"])
        what = f"job {entry['job_id']}" if "job_id" in entry else \
            f"{'cut-off upload' if entry.get('part') else 'upload'} {entry['sha256'][:12]}"
        if path.is_symlink() or path.resolve().parent not in roots:
            print(f"skipped {what}: {path} is not a directory of its own under {' or '.join(map(str, roots))}")
            continue
        if not (path.is_file() if entry.get("part") else path.is_dir()):
            print(f"skipped {what}: {path} is gone already")
            continue
        if not dry:
            try:
                path.unlink() if entry.get("part") else shutil.rmtree(path)
            except OSError as exc:  # say so and go on: the ledger notes only what did go
                print(f"could not remove {what}: {path}: {exc}", flush=True)
                continue
            removed.append(entry)
        freed += entry["bytes"]
        print(f"{'would remove' if dry else 'removed'} {what}: {path} ({entry['bytes'] / 1e6:.1f} MB)", flush=True)
    count = len(plan["jobs"]) if dry else sum("job_id" in e for e in removed)
    uploads = len(plan["uploads"]) if dry else sum("sha256" in e for e in removed)
    print(f"{'dry run: would free' if dry else 'freed'} {freed / 1e6:.1f} MB: {count} job director"
          f"{'y' if count == 1 else 'ies'}, {uploads} upload(s); {len(plan['kept'])} kept")
    write_whole(args.result, json.dumps({"removed": removed}))
    return 0


def note_pruned(ledger: "Ledger", job: "Job") -> None:
    """Say in each pruned job's record that its files are gone, and which prune took them."""
    try:
        removed = json.loads((job.dir / PRUNE_RESULT_FILE).read_text())["removed"]
    except (OSError, ValueError, KeyError) as exc:
        log.warning("prune job %s left no readable result: %s", job.job_id, exc)
        return
    for entry in removed:
        if "job_id" in entry:
            ledger.update(entry["job_id"], pruned={"at": job.finished_at, "by": job.job_id, "path": entry["path"]})


def pruned_note(pruned: dict) -> str:
    return (f"on {time.strftime('%Y-%m-%d %H:%M', time.localtime(pruned['at']))} by job {pruned['by']} "
            "(the ledger keeps the record)")


def prune_step_of(job: "Job", plan: dict, roots: list[Path]) -> Step:
    """The step that carries out `plan`, written into the job's directory."""
    (job.dir / PRUNE_PLAN_FILE).write_text(json.dumps(plan, indent=1))
    args = [sys.executable, str(Path(__file__).resolve()), "prune-step", str(job.dir / PRUNE_PLAN_FILE),
            str(job.dir / PRUNE_RESULT_FILE)]
    for root in roots:
        args += ["--root", str(root)]
    return Step(P.PRUNE, "prune", args, job.dir)


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def _gigabytes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < 1e6:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size in GB above 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = P.CommandLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    parser.add_argument("--slots", type=_positive, default=1, metavar="N",
                        help="jobs run at once (default 1); accepted jobs beyond that wait in the queue")
    parser.add_argument("--advertise-gpu-memory", type=_positive, metavar="MB",
                        help="report this much GPU memory instead of measuring it (a share of a GPU; tests)")
    parser.add_argument("--reservation-timeout", type=_positive, default=int(RESERVATION_TIMEOUT_S), metavar="S",
                        help="seconds a slot promised to a client waits for its job before it is free again "
                             f"(default {RESERVATION_TIMEOUT_S:.0f})")
    parser.add_argument("--maintenance", action="store_true",
                        help="take no new jobs (queued ones still run); status, logs and fetch keep working")
    parser.add_argument("--stop-grace", type=_positive, default=int(STOP_GRACE_S), metavar="S",
                        help="seconds a training told to stop early has to end before it gets SIGINT "
                             f"(default {STOP_GRACE_S:.0f})")
    parser.add_argument("--follower-backlog", type=_positive, default=FOLLOWER_BACKLOG_BYTES // 2**20, metavar="MB",
                        help="a client that falls this far behind a job's output stops getting it (the job "
                             f"runs on; it can reattach); default {FOLLOWER_BACKLOG_BYTES // 2**20}")
    parser.add_argument("--upload-cache-gb", type=_gigabytes, default=UPLOAD_CACHE_GB, metavar="GB",
                        help="most the upload store keeps; past it, the least recently used uploads that no "
                             f"queued or running job needs are removed (default {UPLOAD_CACHE_GB:g})")
    parser.add_argument("--sleap-nn", metavar="PATH", default=None,
                        help="the sleap-nn executable to run (default: the one beside this Python, else on PATH)")
    parser.add_argument("--min-free-gb", type=float, default=MIN_FREE_GB, metavar="GB",
                        help=f"take no new jobs while less than this is free in the working dir "
                             f"(default {MIN_FREE_GB:g})")
    parser.add_argument("--keep-days", type=float, metavar="N",
                        help="prune on its own, at start and daily: the files of jobs finished more than N days "
                             "ago and uploads unused as long (the ledger keeps every record)")
    parser.add_argument("--allow-command", action="append", type=parse_allowed_command, default=[],
                        metavar="NAME=EXECUTABLE",
                        help="let clients run EXECUTABLE as `client.py run NAME -- ARGS` (repeatable; none by "
                             "default), e.g. convert=sleap-io or smi=nvidia-smi")
    parser.add_argument("--allow-env", action="append", default=[], metavar="NAME",
                        help="pass this secret-looking environment variable to commands after all (repeatable)")
    parser.add_argument("--admin", action="append", default=[], metavar="USER",
                        help="a signed-in user (as `client.py login` prints it) who may stop, cancel and prune "
                             "every member's jobs and remove any upload (repeatable); others change only their own")
    parser.add_argument("--run-as", metavar="USER",
                        help="when the worker runs as root: run every job as USER, who cannot read the worker's "
                             "own files (room.env, the ledger, the embedded server's state)")
    parser.add_argument("--require-room-secret", action="store_true",
                        help="sleap-rtc 0.0.7 clients must prove the room secret (their AUTH_RESPONSE); by "
                             "default one that has none is served, since entering the room took its token")
    slurm = parser.add_argument_group("SLURM", "run each job as a SLURM batch job (on a login node with sbatch)")
    slurm.add_argument("--slurm", action="store_true", help="submit jobs to SLURM instead of running them here")
    slurm.add_argument("--slurm-partition", metavar="NAME", help="the partition to submit to (default: SLURM's)")
    slurm.add_argument("--slurm-gres", metavar="GRES", help="generic resources per job, e.g. gpu:1")
    slurm.add_argument("--slurm-time", metavar="LIMIT", help="time limit per job, e.g. 12:00:00")
    slurm.add_argument("--slurm-cpus", type=_positive, metavar="N", help="CPUs per job")
    slurm.add_argument("--slurm-mem", metavar="SIZE", help="memory per job, e.g. 32G")
    slurm.add_argument("--slurm-option", action="append", default=[], metavar="OPTION",
                       help="a raw sbatch option, e.g. --slurm-option=--qos=long (repeatable)")
    slurm.add_argument("--slurm-max-jobs", type=_positive, default=8, metavar="N",
                       help="jobs in SLURM at once, in place of --slots; more wait in this worker's queue "
                            "(default 8)")
    slurm.add_argument("--slurm-zmq-host", metavar="ADDRESS",
                       help="this machine's address as compute nodes reach it, for live progress and "
                            "stop-early (default: what its hostname resolves to)")
    slurm.add_argument("--slurm-poll", type=float, default=SLURM_POLL_S, metavar="S",
                       help=f"seconds between squeue calls (default {SLURM_POLL_S:g})")
    slurm.add_argument("--slurm-patience", type=float, default=SLURM_PATIENCE_S, metavar="S",
                       help="seconds SLURM may fail to answer about a job before the job is failed "
                            f"(default {SLURM_PATIENCE_S:g})")
    parser.add_argument("--no-direct", action="store_true",
                        help="move file bytes only over the WebRTC data channel, never over a direct TCP "
                             f"connection to the client (env {P.ENV_NO_DIRECT}=1)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.no_direct:
        os.environ[P.ENV_NO_DIRECT] = "1"  # where the links read it
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout)
    working_dir = args.working_dir.expanduser().resolve()
    working_dir.mkdir(parents=True, exist_ok=True)
    mounts = args.mount or [Mount(working_dir, "working-dir")]

    run_as = None
    if args.run_as:
        if os.geteuid() != 0:
            print("error: --run-as needs a worker running as root; otherwise run the worker as that user",
                  file=sys.stderr)
            return 2
        if args.slurm:
            print("error: --run-as is for jobs run here; SLURM runs jobs as the user who submits them",
                  file=sys.stderr)
            return 2
        import pwd

        try:
            entry = pwd.getpwnam(args.run_as)
        except KeyError:
            print(f"error: --run-as {args.run_as}: no such user here", file=sys.stderr)
            return 2
        run_as = (entry.pw_uid, entry.pw_gid)
    elif os.geteuid() == 0 and not args.slurm:
        print("worker: warning: running as root, so jobs run as root too and could read room.env and the ledger; "
              "give them a user of their own with --run-as USER (see SECURITY.md)", flush=True)
    executor, slots = LocalExecutor(run_as), args.slots
    if args.slurm:
        try:
            slurm = optional("slurm")
        except CapabilityMissing as exc:
            print(f"error: --slurm: {exc}", file=sys.stderr)
            return 1
        executor = slurm.SlurmExecutor(args.slurm_partition, args.slurm_gres, args.slurm_time, args.slurm_cpus,
                                 args.slurm_mem, args.slurm_option, args.slurm_zmq_host, args.slurm_poll,
                                 args.slurm_patience)
        try:
            notes = executor.check(working_dir / "jobs")
        except slurm.SlurmError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        slots = args.slurm_max_jobs
        for note in notes:
            print(f"worker: SLURM: {note}", flush=True)
    embedded = None
    server_url = args.server or P.DEFAULT_SERVER_URL
    if not args.server and not _listening("127.0.0.1", P.DEFAULT_WS_PORT):
        if not (Path(__file__).resolve().parent / "signaling.py").is_file():
            print(f"error: no --server given, nothing listens on {P.DEFAULT_SERVER_URL}, and signaling.py is not "
                  "beside worker.py to start a server here; give --server URL", file=sys.stderr)
            return 1
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

    config = WorkerConfig(
        server_url, room_id, token, working_dir, args.name, mounts, args.gpu, args.sleap_nn or sleap_nn_executable(),
        slots=slots, advertise_gpu_memory=args.advertise_gpu_memory, maintenance=args.maintenance,
        reservation_timeout=args.reservation_timeout, stop_grace=args.stop_grace,
        follower_backlog=args.follower_backlog * 2**20, upload_cap=int(args.upload_cache_gb * 1e9),
        allowed_commands=dict(args.allow_command), allowed_env=set(args.allow_env), min_free_gb=args.min_free_gb,
        keep_days=args.keep_days, require_room_secret=args.require_room_secret, admins=set(args.admin))
    worker = Worker(config, executor, embedded)
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
    # The optional role files `import worker`: they get this running module, not a second copy.
    sys.modules.setdefault("worker", sys.modules[__name__])
    try:
        if sys.argv[1:2] == ["slurm-step"]:  # inside a batch job: see slurm.batch_script
            raise SystemExit(optional("slurm").slurm_step(sys.argv[2:]))
        if sys.argv[1:2] == ["replicate-step"]:  # a replicate job's step: see replicas.replicate_step_of
            raise SystemExit(optional(P.REPLICATE).replicate_step(sys.argv[2:]))
    except CapabilityMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    if sys.argv[1:2] == ["prune-step"]:  # a prune job's step: see prune_step_of
        raise SystemExit(prune_step(sys.argv[2:]))
    if sys.argv[1:2] == ["probe-checkpoint"]:  # the worker asking whether a member's checkpoint is data
        raise SystemExit(probe_checkpoint_step(sys.argv[2:]))
    raise SystemExit(main())
