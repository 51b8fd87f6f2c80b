"""Uploads into the worker's store next to the raw link transfer, in one run.

    python bench/upload.py [--mb 100] [--runs 3]

Per run, two fresh random files of the same size: one goes over the link as a bare
transfer (send_file, the worker checking size and SHA-256), the other as an upload
(`client.send_content`: hash here, ask the worker, send what it lacks, checked there).
Then the second file is uploaded again, which the worker already holds: the cache hit,
whose cost is hashing the file here and one round trip.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import time

from _world import BenchWorld, P

import client  # noqa: E402  (the path to it is set by _world)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    size = args.mb * 1024 * 1024
    raw_times, upload_times, hit_times = [], [], []
    with BenchWorld() as world:
        worker_id = world.start_worker()
        signaling = P.SignalingClient(world.ws_url, world.room_id, world.token, f"bench-{secrets.token_hex(3)}",
                                      "client")
        signaling.connect()
        link = P.open_link(signaling, worker_id, world.tmp / "received")
        try:
            warm = world.tmp / "warm.bin"  # the link's first megabytes are slower (SCTP's window opens)
            warm.write_bytes(os.urandom(8 * 1024 * 1024))
            link.send_file(warm, store=True)
            for run in range(args.runs):
                raw, upload = world.tmp / f"raw{run}.bin", world.tmp / f"upload{run}.bin"
                raw.write_bytes(os.urandom(size))
                upload.write_bytes(os.urandom(size))
                started = time.perf_counter()
                link.send_file(raw, store=True)
                raw_times.append(time.perf_counter() - started)
                started = time.perf_counter()
                client.send_content(link, upload)
                upload_times.append(time.perf_counter() - started)
                started = time.perf_counter()
                client.send_content(link, upload)
                hit_times.append(time.perf_counter() - started)
                print(f"run {run + 1}: raw link {size / raw_times[-1] / 1e6:6.1f} MB/s   upload "
                      f"{size / upload_times[-1] / 1e6:6.1f} MB/s   cache hit {hit_times[-1]:.3f} s", flush=True)
                raw.unlink()
                upload.unlink()
        finally:
            link.close()
            signaling.close()
    raw_time, upload_time, hit_time = (statistics.median(t) for t in (raw_times, upload_times, hit_times))
    print(f"\n{args.mb} MiB files, median of {args.runs} (hashing and disk on both sides included):")
    print(f"  raw link transfer:        {size / raw_time / 1e6:8.1f} MB/s")
    print(f"  upload (hash, ask, send): {size / upload_time / 1e6:8.1f} MB/s")
    print(f"  ratio upload/raw:         {raw_time / upload_time:8.3f}")
    print(f"  cache hit:                {hit_time:8.3f} s  ({hit_time / raw_time:.4f} of the raw transfer's time)")


if __name__ == "__main__":
    main()
