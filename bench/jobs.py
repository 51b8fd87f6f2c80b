"""The tiny training run directly with sleap-nn and through worker + client, in one run.

    python bench/jobs.py [--runs 3] [--epochs 2]

Prints, median of --runs: wall time of `sleap-nn train` alone, wall time of
`client.py train` against a worker on loopback (link setup, validation, streaming and
the checkpoint included), their ratio, and the time from `client.py train` starting to
the worker starting sleap-nn (read from the worker's log timestamps).

Then log throughput: a second worker runs, through `--sleap-nn`, a stand-in that prints
--lines numbered lines as fast as it can. Lines per second from the stand-in starting to
the last line reaching the client, against the same stand-in read straight from a pipe,
and how many lines the client's log misses.

Last, the same lines to three `logs --follow` clients at once, one of them SIGSTOPped
for the whole run: lines per second to the slower of the two live ones, against one
client alone (the figure above), and what the stopped one got when it resumed.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

from _world import ROOT, BenchWorld

sys.path.insert(0, str(ROOT / "tests"))
from tiny_data import make_project  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lines", type=int, default=100_000)
    args = parser.parse_args()
    with BenchWorld() as world:
        project = make_project(world.tmp / "data", frames=16, epochs=args.epochs)
        config = project["config"]
        sleap_nn = str(Path(sys.executable).parent / "sleap-nn")
        direct, remote, to_start = [], [], []
        world.start_worker("--mount", str(config.parent))
        worker_log = world.tmp / "worker1.log"
        for run in range(args.runs):
            started = time.perf_counter()
            subprocess.run([sleap_nn, "train", "--config-dir", str(config.parent), "--config-name", config.stem,
                            f"++trainer_config.ckpt_dir={world.tmp / 'direct'}", f"++trainer_config.run_name=r{run}",
                            "++trainer_config.save_ckpt=true"], cwd=world.tmp, check=True, capture_output=True)
            direct.append(time.perf_counter() - started)

            wall_start = time.time()
            started = time.perf_counter()
            result = subprocess.run([sys.executable, str(ROOT / "client.py"), "train", "--config", str(config),
                                     "--log-dir", str(world.tmp / "client")], env=world.env(), cwd=world.tmp,
                                    capture_output=True, text=True)
            remote.append(time.perf_counter() - started)
            assert result.returncode == 0, result.stderr
            job_id = re.search(r"job (\S+) accepted", result.stdout).group(1)
            line = re.search(rf"^(\S+ \S+) INFO job {job_id} from \S+ started", worker_log.read_text(), re.M)
            to_start.append(datetime.strptime(line.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp() - wall_start)
            print(f"run {run + 1}: direct {direct[-1]:.2f} s   through worker+client {remote[-1]:.2f} s   "
                  f"client start -> sleap-nn start {to_start[-1]:.2f} s", flush=True)
        d, r = statistics.median(direct), statistics.median(remote)
        print(f"\ntiny training ({args.epochs} epochs x 4 steps), median of {args.runs}:")
        print(f"  sleap-nn train directly:          {d:6.2f} s")
        print(f"  client.py train via worker:       {r:6.2f} s")
        print(f"  ratio via-worker/direct:          {r / d:6.2f}")
        print(f"  client start -> sleap-nn started: {statistics.median(to_start):6.2f} s\n", flush=True)
        alone = log_rates(world, config, args.runs, args.lines)
        follower_rates(world, config, args.runs, args.lines, alone)


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
        for follower in followers:
            assert follower.stdout.readline().strip() == "waiting"
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
