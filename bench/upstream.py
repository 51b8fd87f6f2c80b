"""The tiny training through an unmodified sleap-rtc 0.0.7 client next to ours, in one run.

    python bench/upstream.py [--runs 3] [--epochs 2]

Against one worker on loopback, median of --runs wall times: `sleap-nn train` alone,
`client.py train`, `sleap-rtc train --session-string` (the upstream CLI) and
`sleap_rtc.api.run_training` (the layer the SLEAP GUI calls), each from its process
starting to its exit with the model written; then each one's ratio to ours and to
sleap-nn alone. Upstream processes get the tests' loopback-only sitecustomize and a STUN
server on 127.0.0.1, handed out by our signaling server.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _world import ROOT, BenchWorld

sys.path.insert(0, str(ROOT / "tests"))
from tiny_data import make_project  # noqa: E402
from upstream_world import HERE, SLEAP_RTC, LoopbackStun  # noqa: E402

API_TRAINING = """
import sys
from sleap_rtc import api
result = api.run_training(config_path=sys.argv[3], room_id=sys.argv[1], worker_id=sys.argv[2], timeout=600)
assert result.success, result
"""


def timed(command: list[str], env: dict, cwd: Path, stdin: str = "") -> float:
    started = time.perf_counter()
    result = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, input=stdin, timeout=600)
    seconds = time.perf_counter() - started
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    stun = LoopbackStun()
    with BenchWorld("--ice-server", stun.url) as world:
        project = make_project(world.tmp / "data", frames=16, epochs=args.epochs)
        config = project["config"]
        worker_id = world.start_worker("--mount", str(config.parent))
        session = re.search(r"--session-string (\S+)", (world.tmp / "worker1.log").read_text()).group(1)
        home = world.tmp / "home"
        home.mkdir()
        # The room comes from the environment: the API enters by membership, with the jwt.
        subprocess.run([sys.executable, str(ROOT / "client.py"), "login", "--sleap-rtc-credentials"],
                       env={**world.env(), "HOME": str(home)}, check=True, capture_output=True)
        upstream_env = {**world.env(), "HOME": str(home), "SLEAP_RTC_SIGNALING_WS": world.ws_url,
                        "SLEAP_RTC_SIGNALING_HTTP": world.http_url, "PYTHONPATH": str(HERE / "upstream_site")}
        sleap_nn = str(Path(sys.executable).parent / "sleap-nn")
        times: dict[str, list[float]] = {"direct": [], "ours": [], "cli": [], "api": []}
        for run in range(args.runs):
            times["direct"].append(timed([sleap_nn, "train", "--config-dir", str(config.parent), "--config-name",
                                          config.stem, f"++trainer_config.ckpt_dir={world.tmp / 'direct'}",
                                          f"++trainer_config.run_name=r{run}", "++trainer_config.save_ckpt=true"],
                                         world.env(), world.tmp))
            times["ours"].append(timed([sys.executable, str(ROOT / "client.py"), "train", "--config", str(config),
                                        "--log-dir", str(world.tmp / "client")], world.env(), world.tmp))
            times["cli"].append(timed([str(SLEAP_RTC), "train", "--session-string", session, "--config", str(config),
                                       "--non-interactive"], upstream_env, world.tmp, stdin="s\n"))
            times["api"].append(timed([sys.executable, "-c", API_TRAINING, world.room_id, worker_id, str(config)],
                                      upstream_env, world.tmp))
            print(f"run {run + 1}: " + "   ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
    stun.close()
    median = {k: statistics.median(v) for k, v in times.items()}
    print(f"\ntiny training ({args.epochs} epochs x 4 steps), median of {args.runs} (wall, process start to exit):")
    print(f"  sleap-nn train directly:              {median['direct']:6.2f} s")
    print(f"  client.py train (ours):               {median['ours']:6.2f} s   {median['ours'] / median['direct']:5.2f}x "
          "sleap-nn alone")
    for key, label in (("cli", "sleap-rtc 0.0.7 train (session string)"), ("api", "sleap_rtc.api.run_training")):
        print(f"  {label + ':':<38}{median[key]:6.2f} s   {median[key] / median['direct']:5.2f}x sleap-nn alone, "
              f"{median[key] / median['ours']:5.2f}x ours")


if __name__ == "__main__":
    main()
