"""Connect time and upload throughput behind NATs, per topology, against plain TCP.

    sudo python bench/nat.py [--mb 8] [--runs 3] [--topologies routed,home,symmetric,udp-blocked]

Each topology is a namespace internet from tests/netlab.py (a real coturn, NAT routers)
with the signaling server in the internet, a worker behind one router and the laptop
behind the other. In each run, from the laptop: register and open a link to the worker
(timed), upload a fresh random file into the worker's store (client.send_content: the
direct TCP path where the worker is reachable, else the data channel, relayed by TURN
where the NATs need it), and send as many bytes over plain TCP to a sink in the internet
through the same routers: the reference, measured in the same run. Medians of --runs.

Where UDP is blocked, the same is measured once more as before the UDP probe (every URL
given to aiortc, which takes the first STUN and TURN URL; TURN over UDP left out, as a lab
had to): the ratio of the two link-open times shows the STUN wait the probe saves.

Needs root, iproute2, iptables, conntrack and coturn (as the netlab tests do).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]  # see _world.py
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

SINK_PORT = 9000
SINK = f"""import socket
server = socket.create_server(("0.0.0.0", {SINK_PORT}))
while True:
    conn, _ = server.accept()
    with conn:
        while conn.recv(1 << 20):
            pass
        conn.sendall(b"k")
"""


# -- in the laptop's namespace ---------------------------------------------------------------


def probe(args) -> None:
    """Runs on the laptop: the timed runs; prints one JSON object."""
    import client
    import protocol as P

    if args.before:  # as before the UDP probe: every URL handed to aiortc, which takes the first of each
        # kind; a lab that served a network without UDP then handed out STUN and TURN/TCP only
        P.usable_ice_servers = lambda servers: [u.server() for u in P.ice_urls(servers)
                                                if not (u.scheme == "turn" and u.transport == "udp")]
    results = {"open_s": [], "upload_mbps": [], "tcp_mbps": [], "tcp_connect_s": [], "route": []}
    size = args.mb * 2**20
    for _ in range(args.runs):
        signaling = P.SignalingClient(args.server, args.room, args.token, f"bench-{os.urandom(3).hex()}", "client")
        began = time.monotonic()
        signaling.connect()
        link = P.open_link(signaling, args.worker, Path(args.tmp))
        results["open_s"].append(time.monotonic() - began)
        results["route"].append(link.route() or "?")
        path = Path(args.tmp) / "payload.bin"
        path.write_bytes(os.urandom(size))
        began = time.monotonic()
        client.send_content(link, path)
        results["upload_mbps"].append(size / 2**20 / (time.monotonic() - began))
        link.close()
        signaling.close()

        host, port = args.sink.split(":")
        chunk = os.urandom(1 << 20)
        began = time.monotonic()
        with socket.create_connection((host, int(port)), timeout=60) as sock:
            results["tcp_connect_s"].append(time.monotonic() - began)
            for _ in range(args.mb):
                sock.sendall(chunk)
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(1) == b"k"
        results["tcp_mbps"].append(size / 2**20 / (time.monotonic() - began))
    print(json.dumps(results), flush=True)


# -- from the host -------------------------------------------------------------------------


def run_topology(topology: str, args, before: bool = False) -> dict:
    import netlab

    tmp = Path(tempfile.mkdtemp(prefix=f"sleap-rtc-nat-{topology}-"))
    env = {k: v for k, v in os.environ.items() if k != "SLEAP_RTC_ICE_HOSTS"}
    env["PYTHONUNBUFFERED"] = "1"
    procs, logs = [], []

    def start(host: str, argv: list[str], name: str, ready: str = "") -> subprocess.Popen:
        log = tmp / f"{name}.log"
        logs.append(open(log, "wb"))
        proc = subprocess.Popen(lab.wrap(host, argv), stdout=logs[-1], stderr=subprocess.STDOUT, env=env,
                                cwd=tmp, stdin=subprocess.DEVNULL)
        procs.append(proc)
        deadline = time.monotonic() + 60
        while ready and not re.search(ready, log.read_text(errors="replace")):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start: {log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.1)
        return proc

    with netlab.Lab(topology, tmp / "lab") as lab:
        try:
            server = f"ws://{netlab.SERVER_IP}:8080"
            start("internet", [sys.executable, str(ROOT / "signaling.py"), "--host", netlab.SERVER_IP, "--port", "8080",
                               "--http-port", "8001", *lab.ice_server_options()], "signaling", r"signaling: websocket")
            start("internet", [sys.executable, "-c", SINK], "sink")
            made = subprocess.run(lab.wrap("laptop", [sys.executable, str(ROOT / "client.py"), "rooms", "create",
                                                      "--server", server, "--http", f"http://{netlab.SERVER_IP}:8001"]),
                                  capture_output=True, text=True, env={**env, "HOME": str(tmp)}, cwd=tmp, timeout=60)
            room = re.search(r"room:\s*(\S+)", made.stdout).group(1)
            token = re.search(r"token:\s*(\S+)", made.stdout).group(1)
            start("worker", [sys.executable, str(ROOT / "worker.py"), "--server", server, "--room", room,
                             f"--token={token}", "--working-dir", str(tmp / "w")],
                  "worker", r"registered as \S+")
            worker_id = re.search(r"registered as (\S+)", (tmp / "worker.log").read_text()).group(1)
            out = subprocess.run(lab.wrap("laptop", [sys.executable, __file__, "--probe", "--server", server,
                                                     "--room", room, "--token=" + token, "--worker", worker_id,
                                                     "--mb", str(args.mb), "--runs", str(args.runs), "--tmp", str(tmp),
                                                     "--sink", f"{netlab.SERVER_IP}:{SINK_PORT}",
                                                     *(["--before"] if before else [])]),
                                 capture_output=True, text=True, env=env, cwd=tmp, timeout=600)
            if out.returncode != 0:
                raise RuntimeError(f"{topology}: the probe failed: {out.stderr[-3000:]}")
            return json.loads(out.stdout.strip().splitlines()[-1])
        finally:
            for proc in reversed(procs):
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
            for log in logs:
                log.close()
            shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--topologies", default="routed,home,symmetric,udp-blocked")
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--before", action="store_true", help=argparse.SUPPRESS)
    for name in ("--server", "--room", "--token", "--worker", "--tmp", "--sink"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        return probe(args)
    if os.geteuid() != 0:
        raise SystemExit("bench/nat.py builds network namespaces: run it as root")
    print(f"{args.mb} MB per upload, median of {args.runs} runs; reference: plain TCP from the laptop "
          "through the same routers to the internet")
    print(f"{'topology':<12} {'path (laptop <-> worker)':<26} {'link open':>9} {'TCP connect':>11} {'upload':>11} "
          f"{'plain TCP':>11} {'upload/TCP':>10}")
    opened = {}
    for topology in args.topologies.split(","):
        for before in (False, True) if topology == "udp-blocked" else (False,):
            r = run_topology(topology, args, before)
            upload, tcp = statistics.median(r["upload_mbps"]), statistics.median(r["tcp_mbps"])
            opened[(topology, before)] = statistics.median(r["open_s"])
            name = topology + (" (before)" if before else "")
            print(f"{name:<12} {'/'.join(sorted(set(r['route']))):<26} {opened[(topology, before)]:>8.2f}s "
                  f"{statistics.median(r['tcp_connect_s']) * 1000:>9.2f}ms "
                  f"{upload:>7.1f}MB/s {tcp:>7.1f}MB/s {upload / tcp:>10.3f}", flush=True)
    if ("udp-blocked", True) in opened:
        print(f"without UDP: link open with the probe / as before (STUN + TURN/TCP handed to aiortc): "
              f"{opened[('udp-blocked', False)] / opened[('udp-blocked', True)]:.2f}")


if __name__ == "__main__":
    main()
