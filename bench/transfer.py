"""Throughput of a file over the direct path and the WebRTC data channel, next to plain
loopback TCP, in one run.

    python bench/transfer.py [--mb 100] [--runs 3]

The link side is real: a worker process, a signaling server process, and this process
as the client, each upload checked by size and SHA-256 at the receiver. "direct" lets
the link open its encrypted TCP connection; "data channel" turns that off in this
process (SLEAP_RTC_NO_DIRECT), so the bytes take SCTP. The TCP reference sends the same
file through a loopback socket to a thread that writes and hashes it, so every path
does the same disk and hashing work on both sides.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import secrets
import socket
import statistics
import threading
import time
from pathlib import Path

from _world import BenchWorld, P


def tcp_transfer(path: Path, out: Path) -> float:
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    digest = hashlib.sha256()

    def receive():
        conn, _ = server.accept()
        with conn, open(out, "wb") as f:
            while chunk := conn.recv(P.CHUNK_BYTES):
                digest.update(chunk)
                f.write(chunk)

    receiver = threading.Thread(target=receive, name="bench-tcp-receiver")
    started = time.perf_counter()
    receiver.start()
    size, expected = P.file_digest(path)
    with socket.create_connection(("127.0.0.1", port)) as conn, open(path, "rb") as f:
        while chunk := f.read(P.CHUNK_BYTES):
            conn.sendall(chunk)
    receiver.join()
    elapsed = time.perf_counter() - started
    server.close()
    assert digest.hexdigest() == expected and out.stat().st_size == size
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with BenchWorld() as world:
        worker_id = world.start_worker()
        source = world.tmp / "payload.bin"
        source.write_bytes(os.urandom(args.mb * 1024 * 1024))
        size = source.stat().st_size
        signaling = P.SignalingClient(world.ws_url, world.room_id, world.token, f"bench-{secrets.token_hex(3)}",
                                      "client")
        signaling.connect()
        link = P.open_link(signaling, worker_id, world.tmp / "received")
        times: dict[str, list[float]] = {"direct": [], "data channel": [], "tcp": []}

        def upload(direct: bool) -> float:
            if direct:
                os.environ.pop(P.ENV_NO_DIRECT, None)
            else:
                os.environ[P.ENV_NO_DIRECT] = "1"
            started = time.perf_counter()
            ack = link.send_file(source, store=True)  # returns once the worker checked SHA-256
            elapsed = time.perf_counter() - started
            assert ack["via"].startswith("direct TCP") == direct, ack["via"]
            return elapsed

        try:
            for run in range(args.runs):
                times["direct"].append(upload(direct=True))
                times["data channel"].append(upload(direct=False))
                times["tcp"].append(tcp_transfer(source, world.tmp / f"tcp{run}.bin"))
                (world.tmp / f"tcp{run}.bin").unlink()
                print(f"run {run + 1}: " + "   ".join(f"{name} {size / t[-1] / 1e6:6.1f} MB/s"
                                                      for name, t in times.items()), flush=True)
        finally:
            os.environ.pop(P.ENV_NO_DIRECT, None)
            link.close()
            signaling.close()
    rates = {name: size / statistics.median(t) / 1e6 for name, t in times.items()}
    print(f"\n{args.mb} MiB file, median of {args.runs} (hashing and disk on both sides included):")
    print(f"  direct TCP (AES-256-GCM): {rates['direct']:8.1f} MB/s")
    print(f"  WebRTC data channel:      {rates['data channel']:8.1f} MB/s")
    print(f"  plain loopback TCP:       {rates['tcp']:8.1f} MB/s")
    print(f"  ratio direct/tcp:         {rates['direct'] / rates['tcp']:8.3f}")
    print(f"  ratio data channel/tcp:   {rates['data channel'] / rates['tcp']:8.3f}")
    print(f"  ratio direct/data channel:{rates['direct'] / rates['data channel']:8.1f}")


if __name__ == "__main__":
    main()
