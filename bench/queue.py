"""How fast the worker's queue moves on, and how long choosing a worker takes.

    python bench/queue.py [--runs 3] [--rounds 5]

1. A slot freeing to the next queued job starting, median of --runs: one worker, one
   slot, two jobs; the first holds the slot for a second, the second waits in the
   queue. sleap-nn is replaced (worker --sleap-nn) by a stand-in that prints the time it
   starts and exits, so the figure is the worker's own latency, measured against the
   time to start the same stand-in directly.
2. Discovery + negotiation (discover_peers, job_request to every worker, the answers,
   the ranking, job_assignment) with 1, 10 and 50 workers in the room, median of
   --rounds, against one discover_peers round trip measured alongside.
"""

from __future__ import annotations

from _world import ROOT, BenchWorld  # first: it stops this file shadowing the standard library's queue

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import re  # noqa: E402
import secrets  # noqa: E402
import sqlite3  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import client  # noqa: E402  (_world put the project root on sys.path)
import protocol as P  # noqa: E402

STAND_IN = """import sys, time
print("start", time.time(), flush=True)
time.sleep(float(sys.argv[-1]) if sys.argv[-1].replace(".", "").isdigit() else {hold})
print("exit", time.time(), flush=True)
"""


def stamp(log_text: str, word: str) -> float:
    return float(re.search(rf"^{word} (\S+)$", log_text, re.M).group(1))


def state(world: BenchWorld, worker: int, job_id: str) -> str:
    with sqlite3.connect(world.tmp / f"worker{worker}" / "jobs.sqlite") as db:
        row = db.execute("SELECT state FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
    return row[0] if row else ""


def queue_handover(world: BenchWorld, runs: int) -> None:
    stand_in = world.script("stand-in", STAND_IN.format(hold=1.0))
    config = world.tmp / "config.yaml"
    config.write_text("trainer_config: {max_epochs: 1}\n")
    worker_n = len(world.procs)
    worker_id = world.start_worker("--mount", str(world.tmp), "--sleap-nn", str(stand_in))
    handover, bare = [], []
    for run in range(runs):
        jobs = []
        for _ in range(2):
            result = subprocess.run([sys.executable, str(ROOT / "client.py"), "train", "--config", str(config),
                                     "--worker-id", worker_id, "--detach"], env=world.env(), cwd=world.tmp,
                                    capture_output=True, text=True, timeout=60)
            assert result.returncode == 0, result.stderr
            jobs.append(re.search(r"job (\S+) accepted", result.stdout).group(1))
        deadline = time.monotonic() + 60
        while state(world, worker_n, jobs[1]) != P.COMPLETED and time.monotonic() < deadline:
            time.sleep(0.05)
        logs = [(world.tmp / f"worker{worker_n}" / "jobs" / job / "job.log").read_text() for job in jobs]
        handover.append(stamp(logs[1], "start") - stamp(logs[0], "exit"))
        before = time.time()
        out = subprocess.run([str(stand_in), "0"], capture_output=True, text=True).stdout
        bare.append(stamp(out, "start") - before)
        print(f"run {run + 1}: slot free -> next job started {handover[-1] * 1000:7.1f} ms   "
              f"starting the stand-in directly {bare[-1] * 1000:6.1f} ms", flush=True)
    h, b = statistics.median(handover), statistics.median(bare)
    print(f"\nqueue handover, median of {runs}:")
    print(f"  slot free -> next queued job's process started: {h * 1000:7.1f} ms")
    print(f"  the same process started directly:             {b * 1000:7.1f} ms")
    print(f"  ratio:                                         {h / b:7.2f}\n", flush=True)


def negotiation(world: BenchWorld, rounds: int) -> None:
    signaling = P.SignalingClient(world.ws_url, world.room_id, world.token, "bench-client", "client")
    signaling.connect()
    spec = {"type": P.TRAIN, "config": "config.yaml"}
    figures = []
    try:
        for size in (1, 10, 50):
            while len(signaling.discover(role="worker")) < size:
                world.start_worker("--advertise-gpu-memory", "8000")
            negotiate, discover = [], []
            for _ in range(rounds):
                started = time.perf_counter()
                signaling.discover(role="worker", tags=["training-worker"])
                discover.append(time.perf_counter() - started)
                started = time.perf_counter()
                with contextlib.redirect_stderr(io.StringIO()):
                    chosen, reply = client.negotiate(signaling, P.new_job_id() + secrets.token_hex(2), spec, None)
                negotiate.append(time.perf_counter() - started)
                assert reply.accepted, reply
            figures.append((size, statistics.median(negotiate), statistics.median(discover)))
            print(f"{size:3d} workers: negotiate {figures[-1][1] * 1000:7.1f} ms   "
                  f"discover alone {figures[-1][2] * 1000:6.1f} ms", flush=True)
    finally:
        signaling.close()
    print(f"\ndiscovery + negotiation, median of {rounds}:")
    for size, n, d in figures:
        print(f"  {size:3d} workers: {n * 1000:7.1f} ms   (one discover_peers {d * 1000:5.1f} ms, ratio {n / d:5.1f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with BenchWorld() as world:
        queue_handover(world, args.runs)
    with BenchWorld() as world:
        negotiation(world, args.rounds)


if __name__ == "__main__":
    main()
