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
import collections
import glob
import importlib.metadata
import json
import logging
import os
import queue
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

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


def sleap_nn_executable() -> str:
    """sleap-nn from this Python's environment (a venv need not be activated), else from PATH."""
    beside = Path(sys.executable).parent / "sleap-nn"
    return str(beside) if beside.exists() else (shutil.which("sleap-nn") or "sleap-nn")


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
# Jobs: validation, the sleap-nn command, the run
# ---------------------------------------------------------------------------------------

ZMQ_PUBLISH_PORT = 9001  # sleap-nn publishes progress here; the worker binds a SUB
ZMQ_CONTROL_PORT = 9000  # the worker binds a PUB here; sleap-nn subscribes for "stop"
LOG_BATCH_S = 0.05
LOG_BATCH_BYTES = 32 * 1024
STDERR_TAIL_LINES = 40
STOP_REPEAT_S = 0.5
STOP_GRACE_S = 120.0  # after this long without train_end, a stop becomes SIGINT
CANCEL_GRACE_S = 10.0  # after SIGTERM, SIGKILL
PATH_FIELDS = {P.TRAIN: ("config", "labels", "val_labels", "resume"), P.TRACK: ("data_path",)}


def validate_job(spec: dict, mounts: list[Mount]) -> list[dict]:
    """All problems of a spec on this worker, one per field: the protocol checks, then every
    path (exists, inside a mount), then the config (parses as a YAML mapping)."""
    errors = P.check_spec(spec)
    if errors and errors[0]["field"] == "type":
        return errors
    bad = {e["field"] for e in errors}
    paths = [(name, spec[name]) for name in PATH_FIELDS[spec["type"]] if isinstance(spec.get(name), str)]
    if spec["type"] == P.TRACK and "model_paths" not in bad:
        paths += [("model_paths", m) for m in spec.get("model_paths") or []]
    for name, path in paths:
        try:
            if not resolve_in_mounts(path, mounts).exists():
                errors.append(P.spec_error(name, f"{path} does not exist on the worker", "NOT_FOUND"))
        except PermissionError as exc:
            errors.append(P.spec_error(name, str(exc), "ACCESS_DENIED"))
    if isinstance(spec.get("output"), str):
        try:
            parent = resolve_in_mounts(spec["output"], mounts).parent
            if not parent.is_dir():
                errors.append(P.spec_error("output", f"directory {parent} does not exist on the worker", "NOT_FOUND"))
        except PermissionError as exc:
            errors.append(P.spec_error("output", str(exc), "ACCESS_DENIED"))
    if spec["type"] == P.TRAIN and not any(e["field"] == "config" for e in errors):
        errors += _check_config(Path(spec["config"]))
    return errors


def _check_config(path: Path) -> list[dict]:
    import yaml

    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        return [P.spec_error("config", f"{path} is not readable YAML: {exc}", "BAD_CONFIG")]
    if not isinstance(config, dict):
        return [P.spec_error("config", f"{path} is not a YAML mapping of sleap-nn settings", "BAD_CONFIG")]
    return []


def _hydra_value(text: str) -> str:
    """A string quoted for a Hydra override, so '=', ',' and spaces in paths stay values."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def safe_run_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[:100] or "run"


def train_command(executable: str, spec: dict, job_dir: Path, run_name: str,
                  zmq_ports: Optional[tuple[int, int]]) -> tuple[list[str], Path]:
    """The sleap-nn train argument list and the checkpoint directory it will write under."""
    import yaml

    config = Path(spec["config"]).resolve()
    trainer = (yaml.safe_load(config.read_text()) or {}).get("trainer_config") or {}
    configured = trainer.get("ckpt_dir")
    if configured in (None, "", "."):
        ckpt_dir = job_dir / "models"
    else:  # sleap-nn resolves a relative ckpt_dir against its working directory, the job's
        ckpt_dir = Path(configured) if Path(configured).is_absolute() else job_dir / configured
    args = [executable, "train", "--config-dir", str(config.parent), "--config-name", config.stem]
    overrides = {"trainer_config.save_ckpt": "true", "trainer_config.ckpt_dir": _hydra_value(str(ckpt_dir)),
                 "trainer_config.run_name": _hydra_value(run_name)}
    if spec.get("labels"):
        overrides["data_config.train_labels_path"] = f"[{_hydra_value(str(Path(spec['labels']).resolve()))}]"
    if spec.get("val_labels"):
        overrides["data_config.val_labels_path"] = f"[{_hydra_value(str(Path(spec['val_labels']).resolve()))}]"
    if spec.get("max_epochs"):
        overrides["trainer_config.max_epochs"] = str(spec["max_epochs"])
    if spec.get("batch_size"):
        overrides["trainer_config.train_data_loader.batch_size"] = str(spec["batch_size"])
        overrides["trainer_config.val_data_loader.batch_size"] = str(spec["batch_size"])
    if spec.get("learning_rate"):
        overrides["trainer_config.optimizer.lr"] = repr(float(spec["learning_rate"]))
    if spec.get("resume"):
        overrides["trainer_config.resume_ckpt_path"] = _hydra_value(str(Path(spec["resume"]).resolve()))
    if zmq_ports:
        overrides["trainer_config.zmq.publish_port"] = str(zmq_ports[0])
        overrides["trainer_config.zmq.controller_port"] = str(zmq_ports[1])
    # "++" sets a key whether or not the YAML has it.
    args += [f"++{key}={value}" for key, value in overrides.items()]
    return args, ckpt_dir


def track_command(executable: str, spec: dict, output: Path) -> list[str]:
    args = [executable, "track", "--data_path", str(Path(spec["data_path"]).resolve())]
    for model in spec["model_paths"]:
        args += ["--model_paths", str(Path(model).resolve())]
    args += ["--output_path", str(output)]
    if spec.get("batch_size"):
        args += ["--batch_size", str(spec["batch_size"])]
    if spec.get("peak_threshold") is not None:
        args += ["--peak_threshold", str(float(spec["peak_threshold"]))]
    if spec.get("frames"):
        args += ["--frames", spec["frames"]]
    if spec.get("only_suggested_frames"):
        args.append("--only_suggested_frames")
    if spec.get("gui", True):
        args.append("--gui")
    return args


def bind_zmq_pair(context):
    """A SUB for progress and a PUB for control on 127.0.0.1: the default ports when free,
    else any free pair, so two workers on one host never collide."""
    import zmq

    sub, pub = context.socket(zmq.SUB), context.socket(zmq.PUB)
    sub.setsockopt_string(zmq.SUBSCRIBE, "")
    for sock in (sub, pub):
        sock.setsockopt(zmq.LINGER, 0)
    ports = []
    for sock, default in ((sub, ZMQ_PUBLISH_PORT), (pub, ZMQ_CONTROL_PORT)):
        try:
            sock.bind(f"tcp://127.0.0.1:{default}")
            ports.append(default)
        except zmq.ZMQError:
            ports.append(sock.bind_to_random_port("tcp://127.0.0.1"))
    return sub, pub, (ports[0], ports[1])


class Job:
    """One sleap-nn run and everything known about it.

    Threads, all ended by the process ending: "job-ID-stdout" / "job-ID-stderr" read the
    pipes into `_lines`; "job-ID-relay" batches them into the log file and to listeners;
    "job-ID-zmq" (training with progress) forwards sleap-nn's events and sends stop;
    "job-ID-wait" reaps the process and reports the outcome.
    """

    def __init__(self, job_id: str, spec: dict, job_dir: Path, submitter: str, executable: str):
        self.job_id = job_id
        self.executable = executable
        self.spec = spec
        self.dir = job_dir
        self.submitter = submitter
        self.log_path = job_dir / "job.log"
        self.state = "pending"
        self.submitted_at = time.time()
        self.started_at: Optional[float] = None
        self.finished_at: Optional[float] = None
        self.exit_code: Optional[int] = None
        self.stop_requested = threading.Event()
        self.cancel_requested = threading.Event()
        self.train_ended = threading.Event()
        self.outcome: Optional[dict] = None
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self.command: list[str] = []
        self.process: Optional[subprocess.Popen] = None
        self._lines: "queue.Queue" = queue.Queue()
        # Guards _listeners, the callbacks (message name, payload) of attached clients.
        self._listeners_lock = threading.Lock()
        self._listeners: list[Callable[[str, dict], None]] = []
        self._threads: list[threading.Thread] = []

    @property
    def kind(self) -> str:
        return self.spec["type"]

    # -- listeners ------------------------------------------------------------------------

    def subscribe(self, listener: Callable[[str, dict], None]) -> None:
        with self._listeners_lock:
            self._listeners.append(listener)

    def unsubscribe(self, listener: Callable[[str, dict], None]) -> None:
        with self._listeners_lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def emit(self, name: str, payload: dict) -> None:
        with self._listeners_lock:
            listeners = list(self._listeners)
        for listener in listeners:
            listener(name, {"job_id": self.job_id, **payload})

    # -- running ------------------------------------------------------------------------

    def start(self, on_finished: Callable[["Job"], None]) -> None:
        """Start sleap-nn in its own process group; raises OSError when it cannot start."""
        import zmq

        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "spec.json").write_text(json.dumps(self.spec, indent=2))
        context = sub = pub = None
        progress = self.spec.get("gui", True)
        if self.kind == P.TRAIN:
            run_name = safe_run_name(self.spec.get("run_name") or f"{Path(self.spec['config']).stem}-{self.job_id}")
            if progress:
                context = zmq.Context()
                sub, pub, ports = bind_zmq_pair(context)
            self.command, self.ckpt_dir = train_command(self.executable, self.spec, self.dir, run_name,
                                                        ports if progress else None)
            self.run_name = run_name
        else:
            stem = Path(self.spec["data_path"]).name.split(".")[0]
            self.output = Path(self.spec["output"]).resolve() if self.spec.get("output") else \
                self.dir / f"{stem}.predictions.slp"
            self.command = track_command(self.executable, self.spec, self.output)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        try:
            self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                            stdin=subprocess.DEVNULL, cwd=self.dir, env=env, start_new_session=True)
        except OSError:
            if context is not None:
                sub.close()
                pub.close()
                context.term()
            raise
        self.state = "running"
        self.started_at = time.time()
        self.emit(P.TRAIN_JOB_START if self.kind == P.TRAIN else P.INFERENCE_JOB_START,
                  {"command": self.command})
        targets = [("stdout", self._read_pipe, (self.process.stdout, "o")),
                   ("stderr", self._read_pipe, (self.process.stderr, "e")),
                   ("relay", self._relay, ())]
        if context is not None:
            targets.append(("zmq", self._poll_zmq, (context, sub, pub)))
        for name, target, args in targets:
            thread = threading.Thread(target=target, args=args, name=f"job-{self.job_id}-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        threading.Thread(target=self._wait, args=(on_finished,), name=f"job-{self.job_id}-wait", daemon=True).start()

    def _read_pipe(self, pipe, stream: str) -> None:
        """Split output into complete lines and carriage-return progress updates."""
        pending = b""
        fd = pipe.fileno()
        while chunk := os.read(fd, 65536):
            pending += chunk
            parts = re.split(rb"(\r\n|\n|\r)", pending)
            pending = parts.pop()
            for text, end in zip(parts[0::2], parts[1::2]):
                line = text.decode("utf-8", "replace")
                self._lines.put((stream, line, end == b"\r"))
        if pending:
            self._lines.put((stream, pending.decode("utf-8", "replace"), False))
        self._lines.put(None)

    def _relay(self) -> None:
        """Batch lines into the log file and to listeners: every LOG_BATCH_S or LOG_BATCH_BYTES."""
        open_pipes = 2
        with open(self.log_path, "a", encoding="utf-8") as log_file:
            while open_pipes:
                batch, progress, size = [], None, 0
                deadline = time.monotonic() + LOG_BATCH_S
                while open_pipes and size < LOG_BATCH_BYTES:
                    try:
                        item = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
                    except queue.Empty:
                        break
                    if item is None:
                        open_pipes -= 1
                        continue
                    stream, line, is_progress = item
                    if is_progress:
                        progress = line
                        continue
                    batch.append([stream, line])
                    size += len(line)
                    log_file.write(line + "\n")
                    if stream == "e":
                        self.stderr_tail.append(line)
                    if stream == "o" and self.kind == P.TRACK and line.startswith("{"):
                        self._inference_progress(line)
                if batch or progress is not None:
                    log_file.flush()
                    self.emit(P.JOB_LOG, {"lines": batch, "progress": progress})

    def _inference_progress(self, line: str) -> None:
        try:
            report = json.loads(line)
        except ValueError:
            return
        if isinstance(report, dict) and "n_processed" in report:
            self.emit(P.JOB_PROGRESS, {"event": "inference", **report})

    def _poll_zmq(self, context, sub, pub) -> None:
        """Forward sleap-nn's progress; while a stop is wanted, repeat it until train_end."""
        import zmq

        stop_sent_at = None
        try:
            while self.process.poll() is None or sub.poll(0):
                if sub.poll(100, zmq.POLLIN):
                    self._on_report(sub.recv_string())
                if self.stop_requested.is_set() and not self.train_ended.is_set():
                    now = time.monotonic()
                    if stop_sent_at is None or now - stop_sent_at >= STOP_REPEAT_S:
                        pub.send_string(json.dumps({"command": "stop"}))
                        stop_sent_at = stop_sent_at or now
                        if now - stop_sent_at > STOP_GRACE_S:
                            self._signal(signal.SIGINT)
        finally:
            sub.close()
            pub.close()
            context.term()

    def _on_report(self, text: str) -> None:
        self.emit(P.PROGRESS_REPORT, {"report": text})
        try:
            report = json.loads(text)
        except ValueError:
            return
        event = report.get("event")
        logs = report.get("logs") or {}
        if event == "train_end":
            self.train_ended.set()
        if event in ("train_begin", "epoch_begin", "epoch_end", "train_end"):
            self.emit(P.JOB_PROGRESS, {
                "event": event, "epoch": report.get("epoch"),
                "max_epochs": self.spec.get("max_epochs"),
                "loss": logs.get("train/loss", logs.get("loss")), "val_loss": logs.get("val/loss")})

    def request_stop(self) -> str:
        if self.kind != P.TRAIN or not self.spec.get("gui", True):
            self.cancel()
            return "this job has no progress channel, so stop cancels it"
        self.stop_requested.set()
        return "stop sent; training ends after the current batch and keeps its model"

    def cancel(self) -> None:
        self.cancel_requested.set()
        self._signal(signal.SIGTERM)

    def _signal(self, sig: int) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                pass

    def _wait(self, on_finished: Callable[["Job"], None]) -> None:
        while True:
            try:
                self.exit_code = self.process.wait(timeout=CANCEL_GRACE_S if self.cancel_requested.is_set() else 1)
                break
            except subprocess.TimeoutExpired:
                if self.cancel_requested.is_set():
                    self._signal(signal.SIGKILL)
        for thread in self._threads:
            thread.join()
        self.finished_at = time.time()
        self.outcome = self._outcome()
        self.state = self.outcome["state"]
        on_finished(self)

    def _outcome(self) -> dict:
        """What the run produced; SIGTERM exits 0 in sleap-nn, so a cancel is known by our own flag."""
        outputs, warning, error = [], None, None
        if self.cancel_requested.is_set():
            state, error = "cancelled", "cancelled on request"
        elif self.exit_code == 0:
            state = "completed"
        else:
            state, error = "failed", f"sleap-nn exited with code {self.exit_code}"
        if self.kind == P.TRAIN:
            model_dir = self._model_dir()
            if model_dir is not None:
                outputs.append({"kind": "model", "path": str(model_dir)})
            elif state == "completed":
                warning = f"sleap-nn finished but no model appeared under {self.ckpt_dir}"
        elif self.output.is_file():
            size, sha256 = P.file_digest(self.output)
            outputs.append({"kind": "predictions", "path": str(self.output), "size": size, "sha256": sha256})
        elif state == "completed":
            warning = f"sleap-nn finished but wrote no predictions file ({self.output})"
        return {"state": state, "exit_code": self.exit_code,
                "duration_s": round(self.finished_at - (self.started_at or self.finished_at), 2),
                "stopped_early": self.stop_requested.is_set() and state == "completed",
                "outputs": outputs, "warning": warning, "error": error,
                "stderr_tail": list(self.stderr_tail) if state != "completed" else [],
                "log_path": str(self.log_path)}

    def _model_dir(self) -> Optional[Path]:
        """sleap-nn writes to RUN_NAME, or RUN_NAME-1, -2... when that already holds a model."""
        candidates = [d for d in self.ckpt_dir.glob(f"{glob.escape(self.run_name)}*")
                      if (d / "training_config.yaml").exists() and d.stat().st_mtime >= (self.started_at or 0) - 1]
        return max(candidates, key=lambda d: d.stat().st_mtime) if candidates else None


class JobRunner:
    """The worker's jobs: one running at a time (the queue comes with the ledger).

    `on_change(job)` is called when a job starts and again when it has finished.
    """

    def __init__(self, working_dir: Path, on_change: Callable[[Job], None], executable: str):
        self.jobs_dir = working_dir / "jobs"
        self.executable = executable
        self.on_change = on_change
        # Guards jobs and the single running slot.
        self._lock = threading.Lock()
        self.jobs: dict[str, Job] = {}
        self.running: Optional[Job] = None

    def get(self, job_id: str) -> Optional[Job]:
        with self._lock:
            return self.jobs.get(job_id)

    def submit(self, job_id: str, spec: dict, submitter: str, listener) -> tuple[Optional[Job], list[dict]]:
        """Start a job now, or say why not."""
        with self._lock:
            if job_id in self.jobs:
                return None, [P.spec_error("job_id", f"job {job_id} exists already", "DUPLICATE")]
            if self.running is not None:
                return None, [P.spec_error("worker", f"busy with job {self.running.job_id}; try another worker "
                                                     "or again later", "BUSY")]
            job = Job(job_id, spec, self.jobs_dir / job_id, submitter, self.executable)
            job.subscribe(listener)
            try:
                job.start(self._finished)
            except OSError as exc:
                return None, [P.spec_error("worker", f"cannot start sleap-nn: {exc}", "START_FAILED")]
            self.jobs[job_id] = job
            self.running = job
        self.on_change(job)
        return job, []

    def _finished(self, job: Job) -> None:
        with self._lock:
            if self.running is job:
                self.running = None
        if job.kind == P.TRAIN:
            if job.state == "completed":
                job.emit(P.TRAIN_JOB_END, {})
            else:
                job.emit(P.TRAIN_JOB_ERROR, {"exit_code": job.exit_code})
        job.emit(P.JOB_COMPLETE if job.state == "completed" else P.JOB_FAILED, job.outcome)
        self.on_change(job)

    def stop_all(self) -> None:
        with self._lock:
            running = self.running
        if running is not None:
            running.cancel()


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
        self.jobs: list[Job] = []  # jobs this session listens to; only its own thread touches it
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
            for job in self.jobs:
                job.unsubscribe(self._forward)
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
        elif item.name == P.JOB_SUBMIT:
            self._submit(item.payload)
        elif item.name in (P.ZMQ_CTRL, P.JOB_CANCEL):
            self._control(item.name, item.payload)
        elif item.name == P.LINK_ERROR:
            log.warning("%s reports: %s", self.peer_id, item.payload.get("message"))
        else:
            self.link.send(P.LINK_ERROR, {"message": f"this worker does not understand {item.name}"})

    def _submit(self, payload: dict) -> None:
        job_id, spec = payload.get("job_id"), payload.get("spec")
        if not P.valid_job_id(job_id):
            self.link.send(P.JOB_REJECTED, {"job_id": str(job_id), "errors": [P.spec_error(
                "job_id", "job_id must be 1-64 letters, digits, '-' or '_'", "BAD_FORMAT")]})
            return
        errors = validate_job(spec, self.worker.readable_mounts)
        job = None
        if not errors:
            job, errors = self.worker.runner.submit(job_id, spec, self.peer_id, self._forward)
        if errors:
            log.info("rejected job %s from %s: %s", job_id, self.peer_id, "; ".join(e["message"] for e in errors))
            self.link.send(P.JOB_REJECTED, {"job_id": job_id, "errors": errors})
            return
        self.jobs.append(job)
        log.info("job %s from %s started: %s", job_id, self.peer_id, " ".join(job.command))
        self.link.send(P.JOB_ACCEPTED, {"job_id": job_id, "job_dir": str(job.dir), "command": job.command})

    def _control(self, name: str, payload: dict) -> None:
        job_id = str(payload.get("job_id", ""))
        job = self.worker.runner.get(job_id)
        action = "stop" if name == P.ZMQ_CTRL else "cancel"
        if job is None:
            reply = {"ok": False, "message": f"no job {job_id} on this worker"}
        elif job.state != "running":
            reply = {"ok": False, "message": f"job {job_id} is {job.state}; nothing to {action}"}
        elif name == P.ZMQ_CTRL:
            reply = {"ok": True, "message": job.request_stop()}
        else:
            job.cancel()
            reply = {"ok": True, "message": "cancel sent; sleap-nn is being terminated"}
        log.info("%s of job %s by %s: %s", action, job_id, self.peer_id, reply["message"])
        self.link.send(P.JOB_CONTROL, {"job_id": job_id, "action": action, **reply})

    def _forward(self, name: str, payload: dict) -> None:
        """Job listener (runs on the job's threads): relay to the client; predictions first."""
        try:
            if name == P.JOB_COMPLETE:
                for output in payload.get("outputs", []):
                    if output["kind"] == "predictions":
                        self.link.send_file(Path(output["path"]))
            self.link.send(name, payload)
        except (P.LinkClosed, P.TransferError) as exc:
            log.info("client %s no longer follows job %s: %s", self.peer_id, payload["job_id"], exc)

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
                 mounts: list[Mount], gpu_index: int, sleap_nn: str, embedded=None):
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
        self.runner = JobRunner(working_dir, self._job_changed, sleap_nn)

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

    def _job_changed(self, job: Job) -> None:
        """Publish busy/available, and mirror an outcome over signaling for a client without a link."""
        status = "busy" if job.state == "running" else "available"
        try:
            self.signaling.update_metadata({"properties": {"status": status}})
        except P.SignalingError as exc:
            log.warning("could not publish status %s: %s", status, exc)
        if job.outcome is None:
            return
        log.info("job %s %s (exit code %s, %.1f s)", job.job_id, job.state, job.exit_code, job.outcome["duration_s"])
        mirror = {"app_message_type": "job_complete" if job.state == "completed" else "job_failed",
                  "job_id": job.job_id, **{k: v for k, v in job.outcome.items() if k != "stderr_tail"}}
        try:
            self.signaling.send_to_peer(job.submitter, mirror)
        except P.SignalingError as exc:
            log.info("could not tell %s about job %s: %s", job.submitter, job.job_id, exc)

    def stop(self) -> None:
        """Cancel the running job, close every link, deregister, stop the embedded server."""
        self.stopping.set()
        self.runner.stop_all()
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
    parser.add_argument("--sleap-nn", metavar="PATH", default=None,
                        help="the sleap-nn executable to run (default: the one beside this Python, else on PATH)")
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

    worker = Worker(server_url, room_id, token, working_dir, args.name, mounts, args.gpu,
                    args.sleap_nn or sleap_nn_executable(), embedded)
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
