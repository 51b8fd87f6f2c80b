"""What running jobs through SLURM costs, on a real single-node SLURM started here.

    python bench/slurm.py [--runs 3] [--jobs 50]

1. Start latency, median of --runs: from `client.py train --detach` to sleap-nn
   starting, through a `--slurm` worker and through a local worker, in one run.
2. Throughput: --jobs short jobs through the `--slurm` worker (one client process per
   job, 8 at a time, and the worker submits each to SLURM) against the same number of
   plain `sbatch` submissions of a script that runs the same program; jobs per minute,
   and the ratio.

sleap-nn is replaced (worker --sleap-nn) by a stand-in that notes when it starts and
exits at once, so the figures are the worker's and SLURM's own. Needs slurm-wlm and
munge (`.ci/run` installs them) and root, as the test cluster does.
"""

from __future__ import annotations

from _world import ROOT, BenchWorld  # first: it stops bench/queue.py shadowing the standard library's queue

import argparse  # noqa: E402
import concurrent.futures  # noqa: E402
import os  # noqa: E402
import sqlite3  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))
from slurm_cluster import SlurmCluster  # noqa: E402

STAND_IN = """import os, sys, time
with open({starts!r}, "a") as f:
    f.write(f"{{os.getcwd()}} {{time.time()}}\\n")
"""


def submit(world: BenchWorld, env: dict, config: Path, worker_id: str) -> str:
    result = subprocess.run([sys.executable, str(ROOT / "client.py"), "train", "--config", str(config), "--detach",
                             "--worker-id", worker_id, "--log-dir", str(world.tmp / "client-logs")],
                            env=env, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(result.stdout + result.stderr)
    return result.stdout.split("job ", 1)[1].split()[0]


def states(working_dir: Path) -> list[str]:
    with sqlite3.connect(working_dir / "jobs.sqlite") as db:
        return [row[0] for row in db.execute("SELECT state FROM jobs")]


def wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def started_at(starts: Path, job_id: str) -> float | None:
    for line in starts.read_text().splitlines() if starts.exists() else []:
        where, when = line.rsplit(" ", 1)
        if where.endswith(job_id):
            return float(when)
    return None


def latency(world: BenchWorld, env: dict, config: Path, worker_id: str, starts: Path, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        asked = time.time()
        job_id = submit(world, env, config, worker_id)
        wait(lambda: started_at(starts, job_id) is not None, 60, f"job {job_id} to start")
        times.append(started_at(starts, job_id) - asked)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=50)
    args = parser.parse_args()
    why_not = SlurmCluster.available()
    if why_not:
        raise SystemExit(f"bench/slurm.py needs a SLURM test cluster: {why_not}")
    with BenchWorld() as world, SlurmCluster(world.tmp / "slurm") as cluster:
        os.environ.update(cluster.env)  # the workers and sbatch below find the cluster
        env = world.env()
        starts = world.tmp / "starts.log"
        stand_in = world.script("stand-in", STAND_IN.format(starts=str(starts)))
        config = world.tmp / "config.yaml"
        config.write_text("trainer_config: {max_epochs: 1}\n")
        common = ["--mount", str(world.tmp), "--sleap-nn", str(stand_in)]
        n = len(world.procs)
        slurm_worker = world.start_worker("--slurm", "--slurm-poll", "0.5", "--slurm-max-jobs", str(args.jobs),
                                          *common)
        slurm_dir = world.tmp / f"worker{n}"
        local_worker = world.start_worker("--slots", "1", *common)

        slurm_times = latency(world, env, config, slurm_worker, starts, args.runs)
        local_times = latency(world, env, config, local_worker, starts, args.runs)
        wait(lambda: all(s == "completed" for s in states(slurm_dir)), 60, "the latency jobs to end")

        before = len(states(slurm_dir))
        started = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="bench-client") as pool:
            list(pool.map(lambda _: submit(world, env, config, slurm_worker), range(args.jobs)))
        submitting = time.perf_counter() - started
        wait(lambda: sum(s == "completed" for s in states(slurm_dir)) == before + args.jobs, 600,
             "the worker's jobs to complete")
        through_worker = time.perf_counter() - started

        script = world.tmp / "plain.sbatch"
        script.write_text(f"#!/bin/sh\nexec {stand_in}\n")
        started = time.perf_counter()
        ids = [subprocess.run(["sbatch", "--parsable", f"--output={world.tmp}/plain-%j.out", str(script)],
                              capture_output=True, text=True, check=True).stdout.strip() for _ in range(args.jobs)]
        wait(lambda: not set(ids) & set(cluster.squeue()), 600, "the plain sbatch jobs to end")
        plain = time.perf_counter() - started

    slurm_latency, local_latency = statistics.median(slurm_times), statistics.median(local_times)
    print(f"start latency, client.py train to sleap-nn running, median of {args.runs}:")
    print(f"  through SLURM (--slurm):   {slurm_latency:7.2f} s")
    print(f"  local worker:              {local_latency:7.2f} s")
    print(f"  ratio slurm/local:         {slurm_latency / local_latency:7.2f}")
    print(f"{args.jobs} short jobs, submission to the last one ended:")
    print(f"  through the worker:        {args.jobs / through_worker * 60:7.1f} jobs/min ({through_worker:.1f} s, "
          f"of which {submitting:.1f} s until every client had its job accepted)")
    print(f"  plain sbatch:              {args.jobs / plain * 60:7.1f} jobs/min ({plain:.1f} s)")
    print(f"  ratio worker/plain sbatch: {plain / through_worker:7.2f}")


if __name__ == "__main__":
    main()
