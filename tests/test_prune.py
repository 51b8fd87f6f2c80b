"""Prune jobs (`client.py prune`): what goes, what stays and why, and what the ledger says.

Real signaling server, worker and client processes; sleap-nn is a stand-in that writes a
model directory (train) or a predictions file (track), and holds while a gate is shut
for the run named "hold".
"""

from __future__ import annotations

import os
import re
import sqlite3
from pathlib import Path

import pytest

import protocol as P
from conftest import job_id_of, ledger, sha256, stand_in, state_of, wait_until, weights_checkpoint
from tiny_data import make_project

pytestmark = pytest.mark.slow

STAND_IN = """import os, pathlib, sys, time
args = sys.argv[1:]
if args[0] == "train":
    over = dict(a[2:].split("=", 1) for a in args if a.startswith("++"))
    run = over["trainer_config.run_name"].strip("'")
    model = pathlib.Path(over["trainer_config.ckpt_dir"].strip("'")) / run
    model.mkdir(parents=True, exist_ok=True)
    (model / "training_config.yaml").write_text("model: tiny")
    (model / "best.ckpt").write_bytes({checkpoint!r})
    while run == "hold" and not os.path.exists({gate!r}):
        time.sleep(0.05)
else:
    pathlib.Path(args[args.index("--output_path") + 1]).write_text("predictions")
"""


def test_prune_removes_old_files_keeps_what_is_needed_and_records_it(room, tmp_path):
    project = make_project(tmp_path / "project", frames=8, epochs=1, steps=1)
    gate = tmp_path / "gate"
    exe = stand_in(tmp_path, "sleap-nn", STAND_IN.format(gate=str(gate), checkpoint=weights_checkpoint()))
    worker_dir = tmp_path / "w"
    room.start_worker("--mount", str(project["config"].parent), "--sleap-nn", str(exe), working_dir=worker_dir)
    jobs = worker_dir / "jobs"
    config = str(project["config"])

    a = room.submit(project["config"], "--run-name", "a")
    wait_until(lambda: state_of(worker_dir, a) == P.COMPLETED, 60, "job a")
    model = jobs / a / "models" / "a"
    b = job_id_of(room.client("track", "--data-path", str(project["labels"]), "--model-paths", str(model),
                              "--detach").stdout)
    c = room.submit(project["config"], "--run-name", "c")
    for job_id in (b, c):
        wait_until(lambda: state_of(worker_dir, job_id) == P.COMPLETED, 60, f"job {job_id}")
    unused = tmp_path / "unused.bin"
    unused.write_bytes(os.urandom(1000))
    assert room.client("upload", str(unused)).returncode == 0
    held = room.submit(project["config"], "--run-name", "hold")
    wait_until(lambda: state_of(worker_dir, held) == P.RUNNING, 60, "the held job to run")
    labels_here = tmp_path / "mine.slp"
    labels_here.write_bytes(project["labels"].read_bytes())
    queued = job_id_of(room.client("train", "--config", config, "--labels", str(labels_here), "--upload",
                                   "--detach").stdout)
    assert state_of(worker_dir, queued) == P.PENDING
    needed = worker_dir / "uploads" / sha256(labels_here)
    assert needed.is_dir()

    dry = room.client("prune", "--older-than", "0", "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert f"kept job {a}: job {b} uses {model}" in dry.stdout
    for job_id in (b, c):
        assert re.search(rf"would remove job {job_id}: {jobs / job_id} \(\d", dry.stdout), dry.stdout
    assert f"would remove upload {sha256(unused)[:12]}" in dry.stdout
    assert f"kept upload {needed.name}: a queued or running job needs it" in dry.stdout
    assert all((jobs / j).is_dir() for j in (a, b, c)) and (worker_dir / "uploads" / sha256(unused)).is_dir()

    real = room.client("prune", "--older-than", "0")
    assert real.returncode == 0, real.stdout + real.stderr
    prune_id = job_id_of(real.stdout)
    assert not (jobs / b).exists() and not (jobs / c).exists() and not (worker_dir / "uploads" / sha256(unused)).exists()
    assert (model / "best.ckpt").is_file() and needed.is_dir()
    assert (jobs / held).is_dir() and (jobs / queued).is_dir()
    # b, c and the dry run; the unused upload, and the queued job's config, which it holds as its own copy
    assert re.search(r"freed [\d.]+ MB: 3 job directories, 2 upload\(s\); 2 kept", real.stdout), real.stdout
    assert f"{prune_id} accepted by" in real.stdout and "starting now" in real.stdout  # a prune needs no slot

    record = ledger(worker_dir, c)
    assert record["state"] == P.COMPLETED and record["pruned"]["by"] == prune_id
    assert record["pruned"]["path"] == str(jobs / c)
    status = room.client("status", c)
    assert "pruned" in status.stdout and f"by job {prune_id}" in status.stdout
    logs = room.client("logs", c)
    assert logs.returncode == 1 and "its log and files were pruned" in logs.stderr
    assert ledger(worker_dir, prune_id)["type"] == P.PRUNE

    # The held and queued jobs were never touched: both run to the end.
    gate.write_text("open")
    for job_id in (held, queued):
        wait_until(lambda: state_of(worker_dir, job_id) == P.COMPLETED, 60, f"job {job_id}")
    assert Path(ledger(worker_dir, queued)["log_path"]).is_file()


def test_keep_days_prunes_on_its_own_at_start(room, tmp_path):
    worker_dir = tmp_path / "w"
    room.start_worker("--allow-command", "echo=/bin/echo", working_dir=worker_dir)
    old = job_id_of(room.client("run", "--non-interactive", "echo", "--", "old").stdout)
    room.procs[-1].stop()
    room.start_worker("--keep-days", "0", working_dir=worker_dir)

    def prune_record():
        with sqlite3.connect(worker_dir / "jobs.sqlite") as db:
            return db.execute("SELECT job_id, state FROM jobs WHERE type = 'prune' AND submitter = ?",
                              ("worker --keep-days",)).fetchone()

    prune_id, _ = wait_until(lambda: (prune_record() or (None, ""))[1] == P.COMPLETED and prune_record(), 30,
                             "the worker's own prune to complete")
    assert ledger(worker_dir, old)["pruned"]["by"] == prune_id
    assert not (worker_dir / "jobs" / old).exists()


def test_files_lists_the_upload_store_and_rm_removes_by_hash(room, tmp_path):
    worker_dir = tmp_path / "w"
    room.start_worker("--allow-command", "echo=/bin/echo", working_dir=worker_dir)
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(os.urandom(3000))
    b.write_bytes(os.urandom(5000))
    for path in (a, b):
        assert room.client("upload", str(path)).returncode == 0
    stored_a = worker_dir / "uploads" / sha256(a) / "a.bin"
    user = job_id_of(room.client("run", "--non-interactive", "echo", "--", str(stored_a)).stdout)

    listing = room.client("files", "ls")
    assert listing.returncode == 0, listing.stderr
    assert re.search(rf"{sha256(a)[:12]}\s+3\.0 kB\s+.*a\.bin\s+{user}", listing.stdout), listing.stdout
    assert re.search(rf"{sha256(b)[:12]}\s+5\.0 kB\s+.*b\.bin\s+-", listing.stdout), listing.stdout
    assert "2 upload(s)" in listing.stdout

    removed = room.client("files", "rm", sha256(b)[:8], "000000")
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert f"removed upload {sha256(b)[:12]}" in removed.stdout
    assert "kept upload 000000: no such upload" in removed.stdout
    assert not (worker_dir / "uploads" / sha256(b)).exists() and stored_a.is_file()
    assert "1 upload(s)" in room.client("files", "ls").stdout
