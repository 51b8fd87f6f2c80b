"""The tiny training run directly with sleap-nn and through worker + client, in one run.

    python bench/jobs.py [--runs 3] [--epochs 2]

Prints, median of --runs: wall time of `sleap-nn train` alone, wall time of
`client.py train` against a worker on loopback (link setup, validation, streaming and
the checkpoint included), their ratio, and the time from `client.py train` starting to
the worker starting sleap-nn (read from the worker's log timestamps).
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
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
    print(f"  client start -> sleap-nn started: {statistics.median(to_start):6.2f} s")


if __name__ == "__main__":
    main()
