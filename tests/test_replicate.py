"""`client.py replicate JOB --to WORKER`: a model trained on one worker, used on another.

Real signaling server, two worker processes and clients; sleap-nn is the stand-in of
test_prune.py (a model directory for train, a predictions file for track).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import protocol as P
from conftest import job_id_of, ledger, sha256, stand_in, state_of, wait_until, weights_checkpoint
from test_prune import STAND_IN
from tiny_data import make_project

pytestmark = pytest.mark.slow


def test_a_model_trained_on_one_worker_runs_inference_on_another(room, tmp_path):
    project = make_project(tmp_path / "project", frames=8, epochs=1, steps=1)
    exe = stand_in(tmp_path, "sleap-nn", STAND_IN.format(gate=str(tmp_path / "never"),
                                                         checkpoint=weights_checkpoint()))
    common = ("--mount", str(project["config"].parent), "--sleap-nn", str(exe))
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    _, a = room.start_worker(*common, working_dir=a_dir)
    _, b = room.start_worker(*common, working_dir=b_dir)
    trained = room.submit(project["config"], "--worker-id", a, "--run-name", "mice")
    wait_until(lambda: state_of(a_dir, trained) == P.COMPLETED, 60, "the training on a")
    model_a = a_dir / "jobs" / trained / "models" / "mice"

    result = room.client("replicate", trained, "--to", b)
    assert result.returncode == 0, result.stdout + result.stderr
    replicate_job = job_id_of(result.stdout)
    assert f"accepted by {a}" in result.stdout
    assert re.search(r"sent .*best\.ckpt \(\d+ bytes, sha256 \w+\) over direct TCP 127\.0\.0\.1", result.stdout)
    record_a = ledger(a_dir, replicate_job)
    assert record_a["type"] == P.REPLICATE and record_a["state"] == P.COMPLETED
    (sent,) = record_a["outputs"]
    assert sent["kind"] == "replica" and sent["worker"] == b and sent["of"] == "model"
    record_b = ledger(b_dir, sent["replica_job"])
    assert record_b["type"] == P.REPLICA and record_b["state"] == P.COMPLETED
    assert record_b["spec"]["source"] == {"worker": a, "job_id": trained}
    model_b = Path(sent["path"])
    assert model_b.is_relative_to(b_dir / "jobs")
    assert sorted(p.name for p in model_b.iterdir()) == sorted(p.name for p in model_a.iterdir())
    for f in model_a.iterdir():
        assert sha256(model_b / f.name) == sha256(f)

    track = room.client("track", "--worker-id", b, "--data-path", str(project["labels"]), "--model-paths",
                        str(model_b), "--non-interactive", "--download", str(tmp_path / "down"))
    assert track.returncode == 0, track.stdout + track.stderr
    track_record = ledger(b_dir, job_id_of(track.stdout))
    assert track_record["state"] == P.COMPLETED and track_record["spec"]["_resolved"]["model_paths"] == [str(model_b)]

    # Nothing to replicate: a job that is not there, or a worker sending to itself.
    missing = room.client("replicate", "nope-123", "--to", b)
    assert missing.returncode == 1 and "nope-123" in missing.stderr
    itself = room.client("replicate", trained, "--to", a)
    assert itself.returncode != 0 and "on " + a + " already" in itself.stderr
