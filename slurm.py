"""SLURM: every step of a job as a batch job on a cluster, followed from the login node.

An optional capability of the worker: `worker.py --slurm` imports this file and, without
it, refuses to start with a reason naming it.

A step becomes a batch script (every word through shlex.quote) that runs
`worker.py slurm-step` on the compute node: it starts sleap-nn with the step's argument
list, relays its ZMQ progress and control between the node's loopback and the worker, and
writes sleap-nn's exit code to a file. The worker follows the step's output files as they
grow and asks squeue about every job it follows once per poll. Batch jobs outlive the
worker: a restarted worker follows them again from the state file each run keeps.

Read top to bottom:

1. constants;
2. `SlurmExecutor`: checks at start-up, sbatch/scancel, the "slurm-poller" thread;
3. `SlurmRun`: one step's batch job, as a Job sees a run;
4. the batch script and `slurm-step`, which runs inside the batch job;
5. the filesystem a job directory is on.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import protocol as P
import worker as W

log = logging.getLogger("sleap_rtc.worker")

# ---------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------

SLURM_COMMAND_TIMEOUT_S = 15.0
# SLURM states after which a job will not run again; all but these two are failures.
SLURM_FINAL = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
               "DEADLINE", "REVOKED", "SPECIAL_EXIT"}
# Filesystems a compute node can share with the login node.
SHARED_FILESYSTEMS = {"nfs", "nfs4", "lustre", "gpfs", "beegfs", "cephfs", "cifs", "smb3", "panfs", "wekafs",
                      "glusterfs", "ocfs2", "9p", "virtiofs"}
FOLLOW_POLL_S = 0.2  # how often a SLURM step's output files are read for new bytes
# Shared filesystems show a file written on another node late: after the job ended, its
# output is read until it has not grown for FOLLOW_SETTLE_S, and its exit file is waited
# for up to EXIT_FILE_WAIT_S.
FOLLOW_SETTLE_S = 1.0
EXIT_FILE_WAIT_S = 30.0


# ---------------------------------------------------------------------------------------
# The executor and its runs
# ---------------------------------------------------------------------------------------


class SlurmError(Exception):
    """A SLURM command failed, timed out or is missing; the message says which and why."""


@dataclass(frozen=True)
class SlurmState:
    state: str  # SLURM's word: PENDING, RUNNING, COMPLETED, TIMEOUT, ...
    reason: str = ""  # why it waits or ended (squeue's %r, scontrol's Reason)
    node: str = ""
    exit_code: Optional[int] = None  # from scontrol's ExitCode, when it has one

    @property
    def final(self) -> bool:
        return self.state in SLURM_FINAL


class SlurmExecutor:
    """Steps run as SLURM batch jobs, one `sbatch --parsable` each, with the admin's options.

    The batch script runs `worker.py slurm-step` on the node, which starts sleap-nn with
    the step's argument list, relays its ZMQ progress and control between the node's
    loopback and this worker, and writes sleap-nn's exit code to a file. Thread
    "slurm-poller" asks squeue about every job the worker follows, once per poll, so
    that many jobs cost one call; `stop()` ends it. Jobs outlive the worker: a restarted
    worker follows them again (`attach`).
    """

    name = "slurm"
    outlives_worker = True

    def __init__(self, partition: Optional[str] = None, gres: Optional[str] = None, time_limit: Optional[str] = None,
                 cpus: Optional[int] = None, mem: Optional[str] = None, options: Optional[list[str]] = None,
                 zmq_host: Optional[str] = None, poll_s: float = W.SLURM_POLL_S,
                 patience_s: float = W.SLURM_PATIENCE_S):
        self.partition = partition
        self.options = [f"--partition={partition}"] if partition else []
        self.options += [f"--gres={gres}"] if gres else []
        self.options += [f"--time={time_limit}"] if time_limit else []
        self.options += [f"--cpus-per-task={cpus}"] if cpus else []
        self.options += [f"--mem={mem}"] if mem else []
        self.options += list(options or [])
        self.zmq_host = zmq_host or _own_address()
        self.poll_s = poll_s
        self.patience_s = patience_s
        # Guards _watched (SLURM job ids being followed) and _states (the latest state of each).
        self._lock = threading.Lock()
        self._watched: set[str] = set()
        self._states: dict[str, SlurmState] = {}
        self._trouble = ""  # why the last poll failed, or ""; read by runs for their messages
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=P.guarded(self._poll_forever), name="slurm-poller", daemon=True)

    # -- start-up -----------------------------------------------------------------------

    def check(self, jobs_dir: Path) -> list[str]:
        """Raise SlurmError when this worker cannot submit at all; notes for the admin."""
        if shutil.which("sbatch") is None:
            raise SlurmError("--slurm needs sbatch on the PATH (run the worker on a SLURM login node)")
        if self.partition:
            try:
                out = self._call(["scontrol", "show", "partition", self.partition, "-o"])
            except SlurmError as exc:
                out = str(exc)
            if f"PartitionName={self.partition}" not in out:
                raise SlurmError(f"SLURM has no partition {self.partition!r} ({out.strip()[:200]})")
        notes = []
        fs = filesystem_type(jobs_dir)
        if fs in SHARED_FILESYSTEMS:
            notes.append(f"job directories are in {jobs_dir} ({fs}), which compute nodes can share")
        else:
            notes.append(f"job directories are in {jobs_dir} on a local filesystem ({fs}); batch jobs on other "
                         "nodes cannot see it. Fine for a one-node cluster; else put --working-dir on shared storage")
        if self.zmq_host.startswith("127."):
            notes.append(f"live progress and stop-early use {self.zmq_host}, which only jobs on this machine "
                         "reach; set --slurm-zmq-host to an address the compute nodes can reach")
        return notes

    def describe(self) -> dict:
        """Registration metadata: the executor, the partition and what SLURM says of its GPUs."""
        facts = {"executor": self.name, "slurm_partition": self.partition or "(default)"}
        try:
            nodes = re.search(r"\bNodes=(\S+)", self._call(["scontrol", "show", "partition", "-o"] +
                                                             ([self.partition] if self.partition else [])))
            gres = self._call(["scontrol", "show", "node", "-o"] + ([nodes.group(1)] if nodes else []))
            gpus = sorted(set(re.findall(r"\bGres=gpu:([A-Za-z0-9_.-]+):\d", gres)))
            if gpus:
                facts["slurm_gpu_types"] = gpus
                facts["gpu_model"] = ", ".join(gpus)
        except SlurmError as exc:
            log.warning("could not read the partition's nodes: %s", exc)
        return facts

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()

    # -- SLURM commands -----------------------------------------------------------------

    def _call(self, args: list[str], timeout: float = SLURM_COMMAND_TIMEOUT_S) -> str:
        try:
            result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            raise SlurmError(f"{args[0]} is not on the PATH") from None
        except subprocess.TimeoutExpired:
            raise SlurmError(f"{args[0]} did not answer within {timeout:.0f} s") from None
        if result.returncode != 0:
            raise SlurmError(f"{args[0]} failed: {(result.stderr or result.stdout).strip()[:500]}")
        return result.stdout

    def launch(self, job: "W.Job", index: int, step: "W.Step", ports: Optional[tuple[int, int]]) -> "SlurmRun":
        files = SlurmRun.files(job.dir, index)
        script = batch_script(step.command(None), files["exit"], ports and (self.zmq_host, *ports), step.drop_env)
        files["script"].write_text(script, encoding="utf-8")
        for name in ("out", "err", "exit"):
            files[name].unlink(missing_ok=True)
        args = ["sbatch", "--parsable", f"--job-name=sleap-rtc-{job.job_id}-{index}", f"--chdir={step.cwd}",
                f"--output={files['out']}", f"--error={files['err']}", *self.options, str(files["script"])]
        try:
            slurm_id = self._call(args).strip().split(";")[0]
        except SlurmError as exc:
            raise W.JobSetupError(f"sbatch refused the job: {exc}") from None
        if not slurm_id.isdigit():
            raise W.JobSetupError(f"sbatch answered {slurm_id[:100]!r} instead of a job id")
        return SlurmRun(self, job, index, slurm_id, step.command(None), ports, {"o": 0, "e": 0})

    def attach(self, job: "W.Job", index: int, saved: dict) -> "SlurmRun":
        """Follow again a step's batch job that a previous worker process submitted."""
        return SlurmRun(self, job, index, str(saved["slurm_id"]), saved.get("command") or [],
                        tuple(saved["ports"]) if saved.get("ports") else None, saved.get("pos") or {"o": 0, "e": 0})

    def follow_again(self, record: dict) -> Optional[dict]:
        """What a restarted worker needs to follow a running job's batch job again, from the
        step's state file; None when there is none to follow."""
        slurm = record.get("slurm") or {}
        if "step" not in slurm:
            return None
        state_file = SlurmRun.files(Path(record["job_dir"]), slurm["step"])["state"]
        try:
            saved = json.loads(state_file.read_text())
        except (OSError, ValueError) as exc:
            log.warning("job %s: cannot follow SLURM job %s again (%s)", record["job_id"], slurm.get("job_id"), exc)
            return None
        return {"step": slurm["step"], "saved": saved, "note": f"following SLURM job {saved['slurm_id']} again"}

    def cancel(self, slurm_id: str, sig: Optional[int] = None) -> None:
        args = ["scancel"] + ([f"--signal={signal.Signals(sig).name[3:]}", "--full"] if sig else []) + [slurm_id]
        try:
            self._call(args)
        except SlurmError as exc:
            log.warning("scancel of SLURM job %s: %s", slurm_id, exc)

    # -- following jobs -----------------------------------------------------------------

    def watch(self, slurm_id: str) -> None:
        with self._lock:
            self._watched.add(slurm_id)

    def unwatch(self, slurm_id: str) -> None:
        with self._lock:
            self._watched.discard(slurm_id)
            self._states.pop(slurm_id, None)

    def state(self, slurm_id: str) -> tuple[Optional[SlurmState], str]:
        """The latest known state of a followed job (None before the first poll), and why
        the last poll failed ("" when it did not)."""
        with self._lock:
            return self._states.get(slurm_id), self._trouble

    def _poll_forever(self) -> None:
        while not self._stopping.wait(self.poll_s):
            with self._lock:
                watched = set(self._watched)
            if not watched:
                continue
            try:
                states = self._poll(watched)
                trouble = ""
            except SlurmError as exc:
                states, trouble = {}, str(exc)
                log.warning("SLURM: %s", exc)
            with self._lock:
                self._trouble = trouble
                for slurm_id, state in states.items():
                    if slurm_id in self._watched:
                        self._states[slurm_id] = state

    def _poll(self, watched: set[str]) -> dict[str, SlurmState]:
        states = {}
        try:
            listing = self._call(["squeue", "-h", "-t", "all", "-j", ",".join(sorted(watched)), "-o", "%i|%T|%r|%N"])
        except SlurmError as exc:
            if "Invalid job id" not in str(exc):
                raise
            listing = ""  # SLURM forgot one of them: scontrol (or sacct, or its exit file) tells the end
        for line in listing.splitlines():
            fields = line.strip().split("|")
            if len(fields) == 4 and fields[0] in watched:
                states[fields[0]] = SlurmState(fields[1], "" if fields[2] == "None" else fields[2], fields[3])
        for slurm_id in watched:
            state = states.get(slurm_id)
            if state is None or state.final:  # squeue has no exit code: scontrol (or sacct) knows it
                states[slurm_id] = self._final(slurm_id) or state or SlurmState("UNKNOWN")
        return states

    def _final(self, slurm_id: str) -> Optional[SlurmState]:
        try:
            out = self._call(["scontrol", "show", "job", "-o", slurm_id])
        except SlurmError:
            out = ""
        fields = dict(re.findall(r"(\w+)=(\S*)", out))
        if "JobState" not in fields and shutil.which("sacct"):
            try:
                row = self._call(["sacct", "-n", "-P", "-X", "-j", slurm_id, "-o", "State,ExitCode,NodeList"])
                state, code, node = (row.splitlines() or ["||"])[0].split("|")[:3]
                fields = {"JobState": state.split()[0] if state else "", "ExitCode": code, "NodeList": node}
            except (SlurmError, ValueError):
                pass
        if not fields.get("JobState"):
            return None
        code = fields.get("ExitCode", "")
        exit_code = int(code.split(":")[0]) if re.fullmatch(r"\d+:\d+", code) else None
        reason = fields.get("Reason", "")
        return SlurmState(fields["JobState"], "" if reason == "None" else reason, fields.get("NodeList", ""),
                          exit_code)


class SlurmRun:
    """One step running as a SLURM batch job: its files in the job's directory, its state
    from the executor's poller. Output is followed from the files as they grow (and from
    where a previous worker process had read them, after a restart)."""

    def __init__(self, slurm: SlurmExecutor, job: "W.Job", index: int, slurm_id: str, command: list[str],
                 ports: Optional[tuple[int, int]], pos: dict):
        self.slurm = slurm
        self.job = job
        self.slurm_id = slurm_id
        self.command = command
        self.paths = self.files(job.dir, index)
        self.ports = ports
        self.last: Optional[SlurmState] = None
        self.trouble_since: Optional[float] = None
        self.exit_code: Optional[int] = None
        self._failure: Optional[str] = None
        # Guards pos (bytes of each output file read so far) and the state file that keeps it.
        self._pos_lock = threading.Lock()
        self.pos = {"o": int(pos.get("o", 0)), "e": int(pos.get("e", 0))}
        self.noted = {"job_id": slurm_id, "step": index}  # the ledger's "slurm": also state, reason, node, problem
        self.trouble = ""  # why SLURM could not be asked about the job, or ""
        self._save()
        slurm.watch(slurm_id)

    @property
    def record(self) -> dict:
        """For the ledger: the SLURM job a restarted worker follows again."""
        return {"slurm": dict(self.noted)}

    @staticmethod
    def files(job_dir: Path, index: int) -> dict[str, Path]:
        return {"script": job_dir / f"step-{index}.sbatch", "out": job_dir / f"step-{index}.out",
                "err": job_dir / f"step-{index}.err", "exit": job_dir / f"step-{index}.exit",
                "state": job_dir / f"step-{index}.slurm.json"}

    def _save(self) -> None:
        """Keep what a restarted worker needs to follow this run again."""
        with self._pos_lock:
            state = {"slurm_id": self.slurm_id, "command": self.command, "ports": self.ports, "pos": dict(self.pos)}
            W.write_whole(self.paths["state"], json.dumps(state))

    def outputs(self) -> list[tuple[str, str, Iterator[bytes]]]:
        return [("o", "stdout", self._follow("out", "o")), ("e", "stderr", self._follow("err", "e"))]

    def _follow(self, name: str, stream: str) -> Iterator[bytes]:
        """New bytes of an output file until the job has ended and nothing more comes."""
        path = self.paths[name]
        quiet_since = None
        while True:
            ended = self.exit_code is not None or self._failure is not None
            try:
                with open(path, "rb") as f:
                    f.seek(self.pos[stream])
                    chunk = f.read(65536)
            except FileNotFoundError:
                chunk = b""
            if chunk:
                quiet_since = None
                with self._pos_lock:
                    self.pos[stream] += len(chunk)
                yield chunk
                # The consumer has queued the chunk's lines: a restart now resumes after them
                # (a crash in the next ~50 ms, before the relay writes them, would lose them).
                self._save()
            elif ended and time.monotonic() - (quiet_since := quiet_since or time.monotonic()) >= FOLLOW_SETTLE_S:
                return
            else:
                time.sleep(FOLLOW_POLL_S)

    def poll(self) -> Optional[int]:
        """The exit code once SLURM says the job ended (-1 when it has none), else None."""
        if self.exit_code is not None or self._failure is not None:
            return self.exit_code if self.exit_code is not None else -1
        state, trouble = self.slurm.state(self.slurm_id)
        self._note(state, trouble)
        if self.trouble_since is not None and time.monotonic() - self.trouble_since > self.slurm.patience_s:
            self._failure = (f"SLURM did not answer about job {self.slurm_id} for {self.slurm.patience_s:.0f} s "
                             f"({trouble}); the job was cancelled if it still ran")
            self.slurm.cancel(self.slurm_id)
            self.slurm.unwatch(self.slurm_id)
            return -1
        if state is None or not state.final:
            return None
        self.exit_code = self._exit_code(state)
        self.slurm.unwatch(self.slurm_id)
        return self.exit_code if self.exit_code is not None else -1

    def _exit_code(self, state: SlurmState) -> Optional[int]:
        exit_file = self.paths["exit"]
        deadline = time.monotonic() + (EXIT_FILE_WAIT_S if state.state == "COMPLETED" else 0)
        while True:
            try:
                code = int(exit_file.read_text().strip())
                break
            except (OSError, ValueError):
                code = None
            if time.monotonic() >= deadline:
                break
            time.sleep(0.5)
        if state.state == "COMPLETED" and code is None:
            self._failure = (f"SLURM job {self.slurm_id} completed on {state.node or 'its node'} but left no exit "
                             f"code in {exit_file}: is the job directory shared with the compute nodes?")
        elif state.state == "CANCELLED" and not self.job.cancel_requested.is_set():
            self._failure = f"SLURM job {self.slurm_id} was cancelled outside sleap-rtc ({state.reason or 'scancel'})"
        elif state.state not in ("COMPLETED", "CANCELLED") and code is None:
            why = f" ({state.reason})" if state.reason and state.reason != state.state else ""
            self._failure = f"SLURM ended job {self.slurm_id} on {state.node or 'its node'}: {state.state}{why}"
        return code if code is not None else state.exit_code

    def _note(self, state: Optional[SlurmState], trouble: str) -> None:
        """Tell the job (log and ledger) when the SLURM state or a polling problem changes."""
        self.trouble_since = (self.trouble_since or time.monotonic()) if trouble else None
        if trouble != self.trouble:
            self.trouble = trouble
            self._report(self.last, f"cannot ask SLURM about job {self.slurm_id}: {trouble}"
                         if trouble else "SLURM answers again")
        if state is not None and state != self.last:
            self.last = state
            self._report(state)

    def _report(self, state: Optional[SlurmState], text: Optional[str] = None) -> None:
        """The batch job changed state (or polling it failed): a line and the ledger's "slurm"."""
        if state is not None:
            self.noted.update(job_id=self.slurm_id, state=state.state, reason=state.reason, node=state.node)
        if text is None and state is not None:
            where = f" on {state.node}" if state.node and state.state != "PENDING" else ""
            why = f" ({state.reason})" if state.reason else ""
            text = f"SLURM job {self.slurm_id}: {state.state}{where}{why}"
        self.noted["problem"] = self.trouble or None
        self.job.run_changed(text, self.record)

    def wait(self, timeout: float) -> Optional[int]:
        deadline = time.monotonic() + timeout
        while (code := self.poll()) is None:
            if time.monotonic() >= deadline:
                return None
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
        return code

    def signal(self, sig: int) -> None:
        if self.poll() is None:
            self.slurm.cancel(self.slurm_id, None if sig == signal.SIGTERM else sig)

    def failure(self) -> Optional[str]:
        return self._failure


def batch_script(command: list[str], exit_file: Path, zmq: Optional[tuple[str, int, int]],
                 drop_env: list[str]) -> str:
    """The batch script of one step: `worker.py slurm-step` around sleap-nn's argument list.

    Every word is passed through shlex.quote, so no path, name or value a client chose
    can be read by the shell as anything but one literal argument."""
    words = [sys.executable, str(Path(W.__file__).resolve()), "slurm-step", "--exit-file", str(exit_file)]
    if zmq:
        words += ["--zmq", f"{zmq[0]}:{zmq[1]}:{zmq[2]}"]
    for name in drop_env:
        words += ["--unset", name]
    words += ["--", *command]
    return ("#!/bin/sh\n# Written by sleap-rtc's worker.py: one step of one job. Every word below is quoted.\n"
            f"exec {' '.join(shlex.quote(w) for w in words)}\n")


def slurm_step(argv: list[str]) -> int:
    """`worker.py slurm-step`, inside a batch job: run sleap-nn, relay its ZMQ traffic
    between this node's loopback and the worker, and write its exit code to a file."""
    import zmq

    parser = argparse.ArgumentParser(prog="worker.py slurm-step")
    parser.add_argument("--exit-file", type=Path, required=True)
    parser.add_argument("--zmq", metavar="HOST:SUB_PORT:PUB_PORT", help="the worker's progress and control sockets")
    parser.add_argument("--unset", action="append", default=[], metavar="NAME", help="a variable sleap-nn must not get")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    # scancel signals every process of the job: sleap-nn answers them; this relay waits for
    # it. A handler, unlike SIG_IGN, is not inherited by sleap-nn.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    context = local_sub = local_pub = remote_pub = remote_sub = None
    if args.zmq:
        host, worker_sub, worker_pub = args.zmq.rsplit(":", 2)
        context = zmq.Context()
        local_sub, local_pub, ports = W.bind_zmq_pair(context)
        remote_pub, remote_sub = context.socket(zmq.PUB), context.socket(zmq.SUB)
        remote_sub.setsockopt_string(zmq.SUBSCRIBE, "")
        for sock in (remote_pub, remote_sub):
            sock.setsockopt(zmq.LINGER, 1000)
        remote_pub.connect(f"tcp://{host}:{worker_sub}")
        remote_sub.connect(f"tcp://{host}:{worker_pub}")
        command = command + W.zmq_overrides(ports)
    try:
        env = {k: v for k, v in os.environ.items() if k not in args.unset}
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL,
                                   env={**env, **W.SLEAP_NN_ENV, "PYTHONUNBUFFERED": "1"})
    except OSError as exc:
        print(f"sleap-rtc slurm-step: cannot start {command[0] if command else 'nothing'}: {exc}", file=sys.stderr)
        code = 127
    else:
        if context is not None:
            poller = zmq.Poller()
            poller.register(local_sub, zmq.POLLIN)
            poller.register(remote_sub, zmq.POLLIN)
            while True:
                running = process.poll() is None
                for sock, _ in poller.poll(100):
                    (remote_pub if sock is local_sub else local_pub).send(sock.recv())
                if not running:
                    break
        code = process.wait()
    if context is not None:
        for sock in (local_sub, local_pub, remote_pub, remote_sub):
            sock.close()
        context.term()
    W.write_whole(args.exit_file, f"{code}\n")
    return code


def filesystem_type(path: Path) -> str:
    """The type of the filesystem `path` is on, from /proc/mounts ("unknown" without it)."""
    best, kind = "", "unknown"
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return kind
    target = str(path.resolve())
    for line in mounts:
        fields = line.split()
        if len(fields) > 2:
            point = fields[1].replace("\\040", " ")
            if (target == point or target.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
                best, kind = point, fields[2]
    return kind


def _own_address() -> str:
    """This machine's address as its name resolves, for batch jobs to reach."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"

