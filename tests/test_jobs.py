"""Real sleap-nn training and inference through a worker and client over WebRTC."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from conftest import job_id_of, stand_in, wait_until
from tiny_data import make_project

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return make_project(tmp_path_factory.mktemp("project"), frames=16, epochs=2, steps=4)


@pytest.fixture
def lab(room, project):
    """A room with one worker whose mount holds the tiny project."""
    room.worker_dir = room.tmp / "w"
    worker, worker_id = room.start_worker("--mount", f"{project['config'].parent}:data", working_dir=room.worker_dir)
    room.worker, room.worker_id, room.project = worker, worker_id, project
    return room


def reports(lab, job_id: str) -> list[dict]:
    lines = (lab.tmp / "sleap-rtc-jobs" / job_id / "progress.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line]


def test_training_completes_with_ordered_progress_and_a_checkpoint(lab):
    result = lab.client("train", "--config", str(lab.project["config"]), "--max-epochs", "2", "--run-name", "tiny")
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = job_id_of(result.stdout)
    model_dir = Path(re.search(r"model on the worker: (\S+)", result.stdout).group(1))
    assert (model_dir / "best.ckpt").is_file() and model_dir.name == "tiny"
    assert "epoch 2/2  loss" in result.stderr
    events = [r["event"] for r in reports(lab, job_id)]
    assert events[0] == "train_begin" and events[-1] == "train_end"
    epoch_ends = [r["epoch"] for r in reports(lab, job_id) if r["event"] == "epoch_end"]
    assert epoch_ends == [0, 1]
    assert events.index("epoch_end") < len(events) - 1
    local = lab.tmp / "sleap-rtc-jobs" / job_id
    assert (local / "loss.png").stat().st_size > 1000
    assert "`Trainer.fit` stopped: `max_epochs=2` reached" in (local / "job.log").read_text()


def test_epochs_set_only_in_the_config_are_known_with_an_eta(lab):
    """No --max-epochs: the count comes from the config the worker validated (2 here)."""
    result = lab.client("train", "--config", str(lab.project["config"]))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "/?" not in result.stderr
    assert re.search(r"epoch 1/2  loss \S+  val_loss \S+  ETA \d+ s", result.stderr), result.stderr
    assert "epoch 2/2  loss" in result.stderr


def test_progress_bars_do_not_flood_the_client(lab, tmp_path):
    config = tmp_path / "many-steps.yaml"
    config.write_text(lab.project["config"].read_text().replace("train_steps_per_epoch: 4",
                                                                "train_steps_per_epoch: 60"))
    lab.worker.stop()
    _, lab.worker_id = lab.start_worker("--mount", f"{lab.project['config'].parent}:data", "--mount", str(tmp_path),
                                        working_dir=lab.worker_dir)
    result = lab.client("train", "--config", str(config), "--max-epochs", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = job_id_of(result.stdout)
    batches = [r for r in reports(lab, job_id) if r["event"] == "batch_end"]
    assert len(batches) >= 60  # sleap-nn redrew its bar at least this often
    bar_lines = [line for line in (lab.tmp / "sleap-rtc-jobs" / job_id / "job.log").read_text().splitlines()
                 if line.startswith("Epoch 0:") and "/60 [" in line]
    assert 1 <= len(bar_lines) <= 3, bar_lines  # the bar's final states, not its 60+ redraws


def test_stop_early_keeps_the_model(lab):
    trainer = lab.start_client("train", "--config", str(lab.project["config"]), "--max-epochs", "500")
    job_id = trainer.wait_for(r"job (\S+) accepted by", timeout=60).group(1)
    trainer.wait_for(r"epoch 2/500", timeout=90)
    stop = lab.client("stop", job_id)
    assert stop.returncode == 0 and "stop sent" in stop.stdout, stop.stdout + stop.stderr
    assert trainer.popen.wait(timeout=120) == 0, trainer.output()
    out = trainer.output()
    assert "completed" in out and "stopped early" in out
    epochs = [r["epoch"] for r in reports(lab, job_id) if r["event"] == "epoch_end"]
    assert len(epochs) < 50
    assert (Path(re.search(r"model on the worker: (\S+)", out).group(1)) / "best.ckpt").is_file()


def test_cancel_ends_the_run_and_reports_cancelled(lab):
    trainer = lab.start_client("train", "--config", str(lab.project["config"]), "--max-epochs", "500")
    job_id = trainer.wait_for(r"job (\S+) accepted by", timeout=60).group(1)
    trainer.wait_for(r"epoch 1/500", timeout=90)
    cancel = lab.client("cancel", job_id)
    assert cancel.returncode == 0, cancel.stdout + cancel.stderr
    assert trainer.popen.wait(timeout=60) == 1
    assert f"job {job_id} cancelled" in trainer.output()
    lab.worker.wait_for(rf"job {job_id} cancelled", timeout=10)
    assert lab.client("workers").stdout.count("available") == 1  # free again


def test_inference_returns_checked_predictions(lab):
    trained = lab.client("train", "--config", str(lab.project["config"]), "--max-epochs", "1")
    assert trained.returncode == 0, trained.stderr
    model_dir = re.search(r"model on the worker: (\S+)", trained.stdout).group(1)
    download = lab.tmp / "predictions"
    result = lab.client("track", "--data-path", str(lab.project["video"]), "--model-paths", model_dir,
                        "--peak-threshold", "0", "--frames", "0-9", "--download", str(download))
    assert result.returncode == 0, result.stdout + result.stderr
    local = download / "video.predictions.slp"
    worker_sha = re.search(r"sha256 ([0-9a-f]{64}), checked", result.stdout).group(1)
    assert hashlib.sha256(local.read_bytes()).hexdigest() == worker_sha
    import sleap_io as sio

    assert len(sio.load_slp(str(local))) == 10


def test_bad_spec_is_rejected_field_by_field_and_nothing_runs(lab):
    outside = lab.tmp / "elsewhere.slp"
    outside.write_text("x")
    result = lab.client("train", "--config", str(lab.project["config"].parent / "missing.yaml"),
                        "--labels", str(outside), "--val-labels", str(lab.project["config"].parent / "nope.slp"))
    assert result.returncode == 4  # rejected for paths: the client printed what it found instead
    assert "config: " in result.stderr and "does not exist on the worker" in result.stderr
    assert f"labels: Access denied: {outside} is outside the worker's mounts" in result.stderr
    assert "val_labels: " in result.stderr
    bad_numbers = lab.client("train", "--config", str(lab.project["config"]), "--max-epochs", "0",
                             "--batch-size", "5000", "--learning-rate", "3")
    assert bad_numbers.returncode == 2
    for field in ("max_epochs", "batch_size", "learning_rate"):
        assert f"{field}: {field} must be" in bad_numbers.stderr
    assert lab.worker_dir.is_dir() and not (lab.worker_dir / "jobs").exists(), "nothing may run"


def test_sleap_nn_failure_reports_exit_code_and_stderr(lab, tmp_path):
    # Paths and labels are checked at acceptance, so sleap-nn gets a config it refuses itself:
    # body parts its skeleton does not have.
    broken = lab.project["config"].parent / "broken.yaml"
    broken.write_text(lab.project["config"].read_text().replace("part_names: [head, tail]", "part_names: [nose, ear]"))
    result = lab.client("train", "--config", str(broken), "--max-epochs", "1")
    assert result.returncode == 1
    assert "failed (exit code 1" in result.stderr
    assert "error: sleap-nn exited with code 1" in result.stderr
    assert "  | " in result.stderr  # the stderr tail
    wait_until(lambda: "failed" in lab.worker.output(), 10, "the worker to log the failure")


def test_output_from_the_first_instant_reaches_the_client(room, project, tmp_path):
    """Lines printed before JOB_ACCEPTED reaches the client are kept, in order, none twice."""
    fast = stand_in(tmp_path, "fast-sleap-nn", "for i in range(5000):\n    print(f'line {i}')\n")
    room.start_worker("--mount", str(project["config"].parent), "--sleap-nn", str(fast))
    result = room.client("train", "--config", str(project["config"]))
    assert result.returncode == 0, result.stdout + result.stderr
    logged = (room.tmp / "sleap-rtc-jobs" / job_id_of(result.stdout) / "job.log").read_text().splitlines()
    # The worker marks where the run starts and ends; between the marks, sleap-nn's every line.
    assert logged == ["[sleap-rtc worker] TRAIN_JOB_START config", *(f"line {i}" for i in range(5000)),
                      "[sleap-rtc worker] TRAIN_JOB_END config"]
