"""The worker's name search ("did you mean") over a tree of 20,000 files, next to `find`
on the same tree, in one run.

    python bench/search.py [--files 20000] [--runs 3]

Both look for one file name; the search also ranks near misses by similarity, which
`find -name` does not, so the ratio is the price of that ranking and of Python.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from _world import ROOT  # first: it puts the repository on the path

import worker as W  # noqa: E402


def build_tree(root: Path, files: int) -> Path:
    """`files` empty files in 20 x 10 folders, three deep, and one labels file among them."""
    per_folder = files // 200
    for i in range(200):
        folder = root / f"session{i % 20:02d}" / f"camera{i // 20}" / "frames"
        folder.mkdir(parents=True)
        for j in range(per_folder):
            (folder / f"img_{i:03d}_{j:04d}.png").touch()
    target = root / "session07" / "camera3" / "mouse1_labels.slp"
    target.write_bytes(b"x" * 100)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sleap-rtc-search-") as tmp:
        root = Path(tmp)
        target = build_tree(root, args.files)
        mounts = [W.Mount(root, "bench")]
        search_times, find_times = [], []
        for run in range(args.runs):
            started = time.perf_counter()
            found = W.search_files("/Users/ana/mouse1_label.slp", mounts, size=100)
            search_times.append(time.perf_counter() - started)
            assert found["complete"] and found["candidates"][0]["path"] == str(target)
            started = time.perf_counter()
            listed = subprocess.run(["find", str(root), "-name", "mouse1_labels.slp"], capture_output=True, text=True,
                                    check=True, cwd=ROOT).stdout.split()
            find_times.append(time.perf_counter() - started)
            assert listed == [str(target)]
            print(f"run {run + 1}: search {search_times[-1] * 1000:7.1f} ms ({found['scanned']} files)   "
                  f"find {find_times[-1] * 1000:7.1f} ms", flush=True)
    search, find = statistics.median(search_times), statistics.median(find_times)
    print(f"\n{args.files} files, median of {args.runs}:")
    print(f"  worker search (similarity-ranked): {search * 1000:8.1f} ms")
    print(f"  find -name (exact name):           {find * 1000:8.1f} ms")
    print(f"  ratio search/find:                 {search / find:8.2f}")


if __name__ == "__main__":
    main()
