"""The tiny training run directly with sleap-nn and through worker + client, in one run.

    python bench/jobs.py [--runs 3] [--epochs 2] [--only-training]

Prints, median of --runs: wall time of `sleap-nn train` alone, wall time of
`client.py train` against a worker on loopback (link setup, validation, streaming and
the checkpoint included), their ratio, and a timeline of the run through the worker:
seconds from `client.py train` starting to each milestone, from what can be seen from
outside: the client's output lines (stamped as they arrive), the worker's log and its
ledger (jobs.sqlite), and sleap-nn's process (watched in /proc). Then the part of the
run that is not sleap-nn's own time (sleap-nn's process start to its exit).

Then log throughput: a second worker runs, through `--sleap-nn`, a stand-in that prints
--lines numbered lines as fast as it can. Lines per second from the stand-in starting to
the last line reaching the client, against the same stand-in read straight from a pipe,
and how many lines the client's log misses.

Last, the same lines to three `logs --follow` clients at once, one of them SIGSTOPped
for the whole run: lines per second to the slower of the two live ones, against one
client alone (the figure above), and what the stopped one got when it resumed.
(--only-training skips these two.)
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Optional

from _world import ROOT, BenchWorld

sys.path.insert(0, str(ROOT / "tests"))
from tiny_data import make_project  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lines", type=int, default=100_000)
    parser.add_argument("--only-training", action="store_true", help="skip the log throughput runs")
    args = parser.parse_args()
    with BenchWorld() as world:
        project = make_project(world.tmp / "data", frames=16, epochs=args.epochs)
        config = project["config"]
        sleap_nn = str(Path(sys.executable).parent / "sleap-nn")
        direct, remote, timelines = [], [], []
        world.start_worker("--mount", str(config.parent))
        worker = Worker(world, 1)
        for run in range(args.runs):
            started = time.perf_counter()
            subprocess.run([sleap_nn, "train", "--config-dir", str(config.parent), "--config-name", config.stem,
                            f"++trainer_config.ckpt_dir={world.tmp / 'direct'}", f"++trainer_config.run_name=r{run}",
                            "++trainer_config.save_ckpt=true"], cwd=world.tmp, check=True, capture_output=True)
            direct.append(time.perf_counter() - started)

            timeline = traced_train(world, worker, config)
            remote.append(timeline["client exit"])
            timelines.append(timeline)
            print(f"run {run + 1}: direct {direct[-1]:.2f} s   through worker+client {remote[-1]:.2f} s   "
                  f"client start -> sleap-nn start {_s(timeline['sleap-nn start'])} s", flush=True)
        d, r = statistics.median(direct), statistics.median(remote)
        print(f"\ntiny training ({args.epochs} epochs x 4 steps), median of {args.runs}:")
        print(f"  sleap-nn train directly:          {d:6.2f} s")
        print(f"  client.py train via worker:       {r:6.2f} s")
        print(f"  ratio via-worker/direct:          {r / d:6.2f}\n")
        print_timeline(timelines, d)
        if args.only_training:
            return
        alone = log_rates(world, config, args.runs, args.lines)
        follower_rates(world, config, args.runs, args.lines, alone)


# The timeline's milestones, in order: (name, where it is seen).
MILESTONES = [
    ("client start", "bench"),
    ("negotiated", "worker log: assigned job"),
    ("link open", "worker log: link open"),
    ("job accepted", "client: job accepted"),
    ("sleap-nn start", "ledger started_at"),
    ("training begins", "client: training started"),
    ("last epoch", "client: last epoch line"),
    ("sleap-nn exit", "/proc: sleap-nn a zombie"),  # then the kernel's teardown, then the worker reaps it
    ("job finished", "ledger finished_at"),
    ("result printed", "client: job completed"),
    ("client exit", "bench: process ended"),
]


class Worker:
    """What the bench reads of worker N (started with world.start_worker): its log, its
    ledger, its children."""

    def __init__(self, world: BenchWorld, n: int):
        self.log = world.tmp / f"worker{n}.log"
        self.ledger = world.tmp / f"worker{n}" / "jobs.sqlite"
        self.pid = world.procs[n].pid

    def logged(self, pattern: str) -> list[tuple[float, re.Match]]:
        """(time, match) of each log line whose message matches `pattern`."""
        found = []
        for line in self.log.read_text(errors="replace").splitlines():
            stamp = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \S+ (.*)", line)
            match = stamp and re.search(pattern, stamp.group(2))
            if match:
                found.append((datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp(), match))
        return found

    def record(self, job_id: str) -> dict:
        with sqlite3.connect(f"file:{self.ledger}?mode=ro", uri=True) as db:
            db.row_factory = sqlite3.Row
            row = db.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return dict(row) if row else {}

    def children(self) -> list[int]:
        pids = []
        for task in Path(f"/proc/{self.pid}/task").glob("*"):
            try:
                pids += [int(p) for p in (task / "children").read_text().split()]
            except OSError:
                pass
        return pids


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie waiting for its parent."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def watch_sleap_nn(worker: Worker, stop: threading.Event, seen: dict) -> None:
    """Note in `seen` when a sleap-nn child of the worker is first seen, and when it ends."""
    pid = None
    while not stop.is_set():
        if pid is None:
            for child in worker.children():
                try:
                    command = Path(f"/proc/{child}/cmdline").read_bytes()
                except OSError:
                    continue
                if b"sleap-nn" in command and b"train" in command:
                    pid, seen["seen"] = child, time.time()
        elif not _alive(pid):
            seen["exit"] = time.time()
            return
        stop.wait(0.01)


def traced_train(world: BenchWorld, worker: Worker, config: Path) -> dict:
    """Run `client.py train` once; the seconds from its start to each milestone."""
    lines: list[tuple[float, str]] = []
    seen: dict = {}
    stop = threading.Event()
    watcher = threading.Thread(target=watch_sleap_nn, args=(worker, stop, seen), name="watch-sleap-nn")
    watcher.start()
    start = time.time()
    client = subprocess.Popen([sys.executable, str(ROOT / "client.py"), "train", "--config", str(config),
                               "--log-dir", str(world.tmp / "client")],
                              env={**world.env(), "PYTHONUNBUFFERED": "1"}, cwd=world.tmp, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def read(stream) -> None:
        for line in stream:
            lines.append((time.time(), line.rstrip("\n")))

    readers = [threading.Thread(target=read, args=(s,), name="client-output") for s in (client.stdout, client.stderr)]
    for reader in readers:
        reader.start()
    code = client.wait()
    ended = time.time()
    for reader in readers:
        reader.join()
    stop.set()
    watcher.join()
    output = "\n".join(line for _, line in lines)
    assert code == 0, output

    def first(pattern: str, last: bool = False) -> Optional[float]:
        stamps = [t for t, line in lines if re.search(pattern, line)]
        return (stamps[-1] if last else stamps[0]) if stamps else None

    job_id = re.search(r"job (\S+) accepted", output).group(1)
    assigned = worker.logged(rf"assigned job {job_id} by (\S+)")
    peer = assigned[-1][1].group(1).rstrip(":") if assigned else None
    opened = [t for t, _ in worker.logged(rf"link open with {re.escape(peer)}\b")] if peer else []
    record = worker.record(job_id)
    at = {
        "client start": start,
        "negotiated": assigned[-1][0] if assigned else None,
        "link open": opened[-1] if opened else None,
        "job accepted": first(rf"job {job_id} accepted"),
        "sleap-nn start": record.get("started_at") or seen.get("seen"),
        "training begins": first(r"^training started"),
        "last epoch": first(r"^epoch \d+/", last=True),
        "sleap-nn exit": seen.get("exit"),
        "job finished": record.get("finished_at"),
        "result printed": first(rf"job {job_id} (completed|failed)"),
        "client exit": ended,
    }
    return {name: (t - start if t is not None else None) for name, t in at.items()}


def _s(value: Optional[float]) -> str:
    return f"{value:.2f}" if value is not None else "-"


def _median(values: list[Optional[float]]) -> Optional[float]:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def print_timeline(timelines: list[dict], direct: float) -> None:
    """Each milestone per run and its median, then where the time that is not sleap-nn's goes."""
    runs = len(timelines)
    print("timeline through worker+client, seconds from `client.py train` starting:")
    print(f"  {'milestone':17} {'seen in':27} " + " ".join(f"{'run ' + str(i + 1):>6}" for i in range(runs))
          + f" {'median':>7} {'step':>6}")
    previous = "client start"
    for name, where in MILESTONES:
        values = [t[name] for t in timelines]
        # step: the median, over runs, of the time since the milestone before (the last one seen)
        step = _median([t[name] - t[previous] for t in timelines if t[name] is not None and t[previous] is not None])
        previous = name if any(v is not None for v in values) else previous
        print(f"  {name:17} {where:27} " + " ".join(f"{_s(v):>6}" for v in values)
              + f" {_s(_median(values)):>7} {_s(step):>6}")
    whole = [t for t in timelines if t["sleap-nn exit"] is not None and t["sleap-nn start"] is not None]
    if not whole:
        return
    own = statistics.median(t["sleap-nn exit"] - t["sleap-nn start"] for t in whole)
    rest = statistics.median(t["client exit"] - (t["sleap-nn exit"] - t["sleap-nn start"]) for t in whole)
    before = statistics.median(t["sleap-nn start"] for t in whole)
    after = statistics.median(t["client exit"] - t["sleap-nn exit"] for t in whole)
    print(f"\n  sleap-nn's own time via the worker (its start to its exit): {own:6.2f} s   (directly: {direct:.2f} s)")
    print(f"  not sleap-nn's own time:                                  {rest:6.2f} s   "
          f"(before it starts {before:.2f} s, after it exits {after:.2f} s)")
    print(f"  ratio if sleap-nn took its direct time:                   {(direct + rest) / direct:6.2f}\n",
          flush=True)


STAND_IN = """import sys, time
print("start", time.time(), flush=True)
for i in range({lines}):
    sys.stdout.write(f"line {{i}} of {lines}: epoch 1 step {{i}} loss 0.0123 lr 0.0001\\n")
"""


def read_lines(command: list[str], env: dict, cwd: Path, marker: str) -> tuple[float, list[str]]:
    """Run `command`, read its stdout line by line; (seconds from the stand-in's start to
    the last line matching `marker`, every line read)."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=cwd, text=True)
    lines, start, last = [], None, None
    for line in proc.stdout:
        if line.startswith("start ") and start is None:
            start = float(line.split()[1])
        elif line.startswith(marker):
            last = time.time()
        lines.append(line)
    assert proc.wait() == 0, "".join(lines[-20:])
    return last - start, lines


def log_rates(world: BenchWorld, config: Path, runs: int, n: int) -> float:
    stand_in = world.script("print-lines", STAND_IN.format(lines=n))
    world.start_worker("--mount", str(config.parent), "--sleap-nn", str(stand_in))
    worker_id = re.search(r"registered as (\S+)", (world.tmp / "worker2.log").read_text()).group(1)
    env = {**world.env(), "PYTHONUNBUFFERED": "1"}
    direct, remote, lost = [], [], []
    for run in range(runs):
        seconds, _ = read_lines([str(stand_in)], env, world.tmp, f"line {n - 1} of")
        direct.append(n / seconds)
        seconds, lines = read_lines([sys.executable, str(ROOT / "client.py"), "train", "--config", str(config),
                                     "--worker-id", worker_id, "--verbose", "--log-dir", str(world.tmp / "lines")],
                                    env, world.tmp, f"line {n - 1} of")
        remote.append(n / seconds)
        job_id = re.search(r"job (\S+) accepted", "".join(lines)).group(1)
        logged = (world.tmp / "lines" / job_id / "job.log").read_text().splitlines()
        numbered = [line for line in logged if line.startswith("line ")]
        in_order = [f"line {i} of {n}" for i in range(n)] == [line.split(":")[0] for line in numbered]
        lost.append(n - len(numbered) if in_order else n)
        print(f"run {run + 1}: pipe {direct[-1]:,.0f} lines/s   worker->client {remote[-1]:,.0f} lines/s   "
              f"lost {lost[-1]}", flush=True)
    d, r = statistics.median(direct), statistics.median(remote)
    print(f"\nlog lines, {n:,} lines, median of {runs}:")
    print(f"  read from a pipe:        {d:10,.0f} lines/s")
    print(f"  worker -> client:        {r:10,.0f} lines/s")
    print(f"  ratio worker->client/pipe: {r / d:8.3f}")
    print(f"  lines lost (worst run):  {max(lost):10d}")
    return r


GATED = """import os, time
print("waiting", flush=True)
while not os.path.exists({gate!r}):
    time.sleep(0.01)
""" + STAND_IN


def follower_rates(world: BenchWorld, config: Path, runs: int, n: int, alone: float) -> None:
    gate = world.tmp / "gate"
    stand_in = world.script("gated-lines", GATED.format(gate=str(gate), lines=n))
    world.start_worker("--mount", str(config.parent), "--sleap-nn", str(stand_in))
    worker_id = re.search(r"registered as (\S+)", (world.tmp / "worker3.log").read_text()).group(1)
    env = {**world.env(), "PYTHONUNBUFFERED": "1"}
    rates, outcomes = [], []
    for run in range(runs):
        gate.unlink(missing_ok=True)
        submitted = subprocess.run([sys.executable, str(ROOT / "client.py"), "train", "--config", str(config),
                                    "--worker-id", worker_id, "--detach"], env=env, cwd=world.tmp,
                                   capture_output=True, text=True, check=True)
        job_id = re.search(r"job (\S+) accepted", submitted.stdout).group(1)
        followers = [subprocess.Popen([sys.executable, str(ROOT / "client.py"), "logs", job_id, "--follow"],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=world.tmp,
                                      text=True) for _ in range(3)]
        for follower in followers:  # the job's log may open with the worker's own notes
            assert any(line.strip() == "waiting" for line in follower.stdout), "a follower ended before the job ran"
        stalled = followers[2]
        os.kill(stalled.pid, signal.SIGSTOP)
        spans: list[float] = []

        def read(follower) -> None:
            start = last = None
            for line in follower.stdout:
                if line.startswith("start "):
                    start = float(line.split()[1])
                elif line.startswith(f"line {n - 1} of"):
                    last = time.time()
            spans.append(last - start)

        readers = [threading.Thread(target=read, args=(f,), name=f"follower-{i}") for i, f in enumerate(followers[:2])]
        for reader in readers:
            reader.start()
        gate.touch()
        for reader in readers:
            reader.join(timeout=120)
        os.kill(stalled.pid, signal.SIGCONT)
        stalled_out, stalled_err = stalled.communicate(timeout=60)
        for follower in followers[:2]:
            follower.wait(timeout=30)
        rates.append(n / max(spans))
        got = sum(1 for line in stalled_out.splitlines() if line.startswith("line "))
        outcomes.append(f"{got:,} lines, then {'told it fell behind' if 'fell' in stalled_err else 'the end'}"
                        if stalled.returncode in (0, 1) else f"exit {stalled.returncode}")
        print(f"run {run + 1}: slower live follower {rates[-1]:,.0f} lines/s   stopped one: {outcomes[-1]}",
              flush=True)
    r = statistics.median(rates)
    print(f"\nlog lines to 3 followers at once, one stopped, median of {runs}:")
    print(f"  slower live follower:    {r:10,.0f} lines/s")
    print(f"  ratio to one client alone: {r / alone:8.3f}")


if __name__ == "__main__":
    main()
