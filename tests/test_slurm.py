"""A worker in front of a real single-node SLURM cluster (`worker.py --slurm`).

The cluster (munged, slurmctld, slurmd) is started for this module from a slurm.conf in
a temporary directory; workers and clients are real processes; sleap-nn is a fast
stand-in except in the last test, which trains the real one through SLURM.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import time
from pathlib import Path

import pytest

import protocol as P
from conftest import ROOT, ledger, stand_in, state_of, wait_until
from slurm_cluster import PARTITION, SlurmCluster
from tiny_data import make_project


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why_not = SlurmCluster.available()
    if why_not:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the SLURM tests: {why_not}")
        pytest.skip(why_not)
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as running:
        yield running


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return make_project(tmp_path_factory.mktemp("project"), frames=16, epochs=2, steps=4)


def slurm_worker(room, cluster, project, *extra: str, sleap_nn: Path | None = None, working_dir: Path | None = None):
    args = ["--slurm", "--slurm-poll", "0.5", "--mount", str(project["config"].parent), *extra]
    if sleap_nn is not None:
        args += ["--sleap-nn", str(sleap_nn)]
    return room.start_worker(*args, working_dir=working_dir, env=cluster.env)


def submit(room, project, *extra: str) -> str:
    return room.submit(project["config"], *extra)


def slurm_env(cluster) -> dict:
    return {**os.environ, **cluster.env}


def script_of(working_dir: Path, job_id: str, step: int = 0) -> str:
    return (working_dir / "jobs" / job_id / f"step-{step}.sbatch").read_text()


def test_a_job_runs_through_sbatch_with_its_log_streamed(room, cluster, project, tmp_path):
    body = ("import sys, time\nprint('stand-in started', sys.argv[1], flush=True)\n"
            "for i in range(3):\n    print(f'progress {i}', end='\\r', flush=True)\n    time.sleep(0.1)\n"
            "print('line after progress', flush=True)\nprint('a warning', file=sys.stderr, flush=True)\n")
    exe = stand_in(tmp_path, "sleap-nn", body)
    worker_dir = tmp_path / "w"
    worker, worker_id = slurm_worker(room, cluster, project, sleap_nn=exe, working_dir=worker_dir)
    assert "SLURM: job directories are in" in worker.output()

    result = room.client("train", "--config", str(project["config"]), "--verbose", "--non-interactive")
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = re.search(r"job (\S+) accepted by", result.stdout).group(1)
    assert "stand-in started train" in result.stdout and "line after progress" in result.stdout
    record = ledger(worker_dir, job_id)
    assert record["state"] == P.COMPLETED and record["exit_code"] == 0
    slurm_id = record["slurm"]["job_id"]
    assert slurm_id.isdigit() and record["slurm"]["state"] == "COMPLETED" and record["slurm"]["node"] == cluster.node
    log_text = Path(record["log_path"]).read_text()
    assert f"SLURM job {slurm_id}: RUNNING on {cluster.node}" in log_text
    assert "a warning" in log_text
    script = script_of(worker_dir, job_id)
    assert "slurm-step" in script and str(exe) in script

    status = room.client("status", job_id)
    assert status.returncode == 0, status.stderr
    assert re.search(rf"slurm\s+job {slurm_id} on {cluster.node}: COMPLETED", status.stdout), status.stdout
    # Discovery says where jobs run.
    workers = room.client("workers")
    assert re.search(rf"{worker_id}\s.*slurm \(\(default\), 8 at once\)", workers.stdout), workers.stdout


def test_a_failing_run_is_failed_with_its_stderr_tail(room, cluster, project, tmp_path):
    exe = stand_in(tmp_path, "sleap-nn", "import sys\nprint('bad config key', file=sys.stderr)\nsys.exit(3)\n")
    worker_dir = tmp_path / "w"
    slurm_worker(room, cluster, project, sleap_nn=exe, working_dir=worker_dir)
    job_id = submit(room, project)
    wait_until(lambda: state_of(worker_dir, job_id) == P.FAILED, 60, "the job to fail")
    record = ledger(worker_dir, job_id)
    assert record["exit_code"] == 3 and record["error"] == "sleap-nn exited with code 3"
    assert "bad config key" in record["stderr_tail"]


@pytest.mark.slow
def test_cancel_scancels_the_batch_job(room, cluster, project, tmp_path):
    exe = stand_in(tmp_path, "sleap-nn", "import time\nprint('working', flush=True)\ntime.sleep(600)\n")
    worker_dir = tmp_path / "w"
    slurm_worker(room, cluster, project, sleap_nn=exe, working_dir=worker_dir)
    job_id = submit(room, project)
    wait_until(lambda: (ledger(worker_dir, job_id).get("slurm") or {}).get("state") == "RUNNING", 60,
               "the batch job to run")
    slurm_id = ledger(worker_dir, job_id)["slurm"]["job_id"]
    cancel = room.client("cancel", job_id)
    assert cancel.returncode == 0, cancel.stderr
    wait_until(lambda: state_of(worker_dir, job_id) == P.CANCELLED, 60, "the job to be cancelled")
    assert slurm_id not in cluster.squeue()
    out = subprocess.run(["scontrol", "show", "job", "-o", slurm_id], capture_output=True, text=True,
                         env=slurm_env(cluster)).stdout
    assert "JobState=CANCELLED" in out


@pytest.mark.slow
def test_max_jobs_holds_the_rest_in_our_queue(room, cluster, project, tmp_path):
    exe = stand_in(tmp_path, "sleap-nn", "import time\nprint('short job', flush=True)\ntime.sleep(2)\n")
    worker_dir = tmp_path / "w"
    slurm_worker(room, cluster, project, "--slurm-max-jobs", "2", sleap_nn=exe, working_dir=worker_dir)
    jobs = [submit(room, project) for _ in range(5)]
    most = 0
    deadline = time.monotonic() + 120
    while not all(state_of(worker_dir, j) == P.COMPLETED for j in jobs):
        assert time.monotonic() < deadline, [state_of(worker_dir, j) for j in jobs]
        most = max(most, len(cluster.squeue()))
        time.sleep(0.1)
    assert 1 <= most <= 2
    ids = {ledger(worker_dir, j)["slurm"]["job_id"] for j in jobs}
    assert len(ids) == 5


@pytest.mark.slow
def test_a_restarted_worker_follows_its_slurm_jobs_again(room, cluster, project, tmp_path):
    """Killed while two jobs run in SLURM: one ends while no worker watches, the other
    after the restart. Both are followed again, neither is failed, no line is lost or doubled."""
    exe = stand_in(tmp_path, "sleap-nn", "import os, sys, time\ngate = os.environ['GATE_DIR'] + '/' + "
                   "sys.argv[sys.argv.index('--config-dir') + 1].rsplit('/', 1)[1]\n"
                   "print('before the restart', flush=True)\n"
                   "while not os.path.exists(gate):\n    time.sleep(0.05)\nprint('after the restart', flush=True)\n")
    gates = tmp_path / "gates"
    gates.mkdir()
    worker_dir = tmp_path / "w"
    env = {**cluster.env, "GATE_DIR": str(gates)}
    args = ["--slurm", "--slurm-poll", "0.5", "--mount", str(project["config"].parent), "--sleap-nn", str(exe)]
    worker, _ = room.start_worker(*args, working_dir=worker_dir, env=env)
    early, late = submit(room, project), submit(room, project)

    def log_of(job_id: str) -> str:
        path = worker_dir / "jobs" / job_id / "job.log"
        return path.read_text() if path.exists() else ""

    for job_id in (early, late):
        wait_until(lambda: "before the restart" in log_of(job_id), 60, f"job {job_id}'s first line")
    worker.kill()
    early_slurm, late_slurm = (ledger(worker_dir, j)["slurm"]["job_id"] for j in (early, late))
    (gates / early).write_text("go")
    wait_until(lambda: early_slurm not in cluster.squeue(), 30, "the early job to end in SLURM")
    assert late_slurm in cluster.squeue() and state_of(worker_dir, early) == P.RUNNING

    room.start_worker(*args, working_dir=worker_dir, env=env)
    wait_until(lambda: state_of(worker_dir, early) == P.COMPLETED, 30, "the early job to be recorded")
    (gates / late).write_text("go")
    wait_until(lambda: state_of(worker_dir, late) == P.COMPLETED, 60, "the late job to complete")
    for job_id, slurm_id in ((early, early_slurm), (late, late_slurm)):
        text = log_of(job_id)
        assert f"following SLURM job {slurm_id} again" in text
        assert text.count("before the restart") == 1 and text.count("after the restart") == 1, text
        assert ledger(worker_dir, job_id)["exit_code"] == 0


@pytest.mark.slow
def test_a_pending_job_shows_slurms_reason_and_cancels_from_the_queue(room, cluster, project, tmp_path):
    exe = stand_in(tmp_path, "sleap-nn", "print('never')\n")
    worker_dir = tmp_path / "w"
    slurm_worker(room, cluster, project, "--slurm-option=--begin=now+3600", sleap_nn=exe, working_dir=worker_dir)
    job_id = submit(room, project)
    wait_until(lambda: (ledger(worker_dir, job_id).get("slurm") or {}).get("state") == "PENDING", 30,
               "SLURM to hold the job")
    status = room.client("status", job_id)
    assert re.search(r"slurm\s+job \d+: pending in SLURM: BeginTime", status.stdout), status.stdout
    assert room.client("cancel", job_id).returncode == 0
    wait_until(lambda: state_of(worker_dir, job_id) == P.CANCELLED, 30, "the job to be cancelled")
    assert cluster.squeue() == []


@pytest.mark.slow
def test_slurm_that_stops_answering_fails_the_job_with_the_reason(room, cluster, project, tmp_path):
    shims = tmp_path / "shims"
    shims.mkdir()
    stand_in(shims, "squeue", "import sys\nprint('squeue: error: slurm_load_jobs error: Socket timed out on "
                              "send/recv operation', file=sys.stderr)\nsys.exit(1)\n")
    exe = stand_in(tmp_path, "sleap-nn", "import time\ntime.sleep(600)\n")
    worker_dir = tmp_path / "w"
    room.start_worker("--slurm", "--slurm-poll", "0.2", "--slurm-patience", "3", "--sleap-nn", str(exe),
                      "--mount", str(project["config"].parent), working_dir=worker_dir,
                      env={**cluster.env, "PATH": f"{shims}:{os.environ['PATH']}"})
    result = room.client("train", "--config", str(project["config"]), "--non-interactive")
    assert result.returncode != 0
    assert re.search(r"cannot ask SLURM about job \d+: squeue failed: .*Socket timed out", result.stderr)
    assert "error: SLURM did not answer about job" in result.stderr
    record = ledger(worker_dir, re.search(r"job (\S+) accepted by", result.stdout).group(1))
    assert record["state"] == P.FAILED and record["error"].startswith("SLURM did not answer about job")
    assert "Socket timed out" in record["slurm"]["problem"]
    wait_until(lambda: cluster.squeue() == [], 30, "the abandoned batch job to be cancelled")


def test_hostile_names_and_paths_stay_inert_in_the_batch_script(room, cluster, project, tmp_path):
    ran = tmp_path / "ran.jsonl"
    exe = stand_in(tmp_path, "sleap-nn", f"import json, sys\nopen({str(ran)!r}, 'a').write(json.dumps(sys.argv) + '\\n')\n")
    hostile = project["config"].parent / "a'b;$(touch PWNED)`touch PWNED2`\nc d"
    hostile.mkdir()
    config = hostile / "config.yaml"
    config.write_text(project["config"].read_text())
    labels = hostile / "labels $(touch PWNED5).slp"
    labels.write_bytes(project["labels"].read_bytes())
    worker_dir = tmp_path / "w"
    slurm_worker(room, cluster, project, sleap_nn=exe, working_dir=worker_dir)
    run_name = "x'; touch PWNED3; echo '$(touch PWNED4)"
    result = room.client("train", "--config", str(config), "--labels", str(labels), "--run-name", run_name,
                         "--detach")
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = re.search(r"job (\S+) accepted by", result.stdout).group(1)
    wait_until(lambda: state_of(worker_dir, job_id) == P.COMPLETED, 60, "the job to complete")
    argv = json.loads(ran.read_text().splitlines()[0])
    assert len(ran.read_text().splitlines()) == 1 and argv[1] == "train"
    assert any("$(touch PWNED)`touch PWNED2`\nc d/labels $(touch PWNED5).slp" in word for word in argv), argv
    for where in (worker_dir, project["config"].parent, tmp_path, ROOT):
        assert not list(Path(where).rglob("PWNED*")), where
    # What a shell makes of the script's one command is exactly the argument list sleap-nn got.
    command = next(line for line in script_of(worker_dir, job_id).split("\nexec ", 1)[1:])
    words = shlex.split(command)
    assert words[words.index("--") + 1:] == [argv[0], *argv[1:len(argv) - 2]]


def test_a_partition_slurm_lacks_and_an_option_sbatch_refuses_are_clear_errors(room, cluster, project, tmp_path):
    bad = room.spawn("worker", [str(ROOT / "worker.py"), "--slurm", "--slurm-partition", "nope",
                                "--working-dir", str(tmp_path / "bad")], {**room.peer_env(), **cluster.env})
    assert bad.popen.wait(timeout=30) == 1
    assert "SLURM has no partition 'nope'" in bad.output()

    exe = stand_in(tmp_path, "sleap-nn", "print('never')\n")
    worker_dir = tmp_path / "w"
    # The test node has no GPUs, so sbatch refuses a request for one.
    slurm_worker(room, cluster, project, "--slurm-partition", PARTITION, "--slurm-gres", "gpu:1",
                 sleap_nn=exe, working_dir=worker_dir)
    result = room.client("train", "--config", str(project["config"]), "--non-interactive")
    assert result.returncode != 0
    record = ledger(worker_dir, re.search(r"job (\S+) accepted by", result.stdout).group(1))
    assert record["state"] == P.FAILED and record["error"].startswith("sbatch refused the job: sbatch failed:")
    assert "Invalid generic resource (gres) specification" in record["error"]
    assert "sbatch refused the job" in result.stderr


@pytest.mark.slow
def test_real_sleap_nn_trains_through_slurm_with_progress_and_stop_early(room, cluster, tmp_path):
    long_project = make_project(tmp_path / "long", frames=16, epochs=200, steps=4)
    worker_dir = tmp_path / "w"
    slurm_worker(room, cluster, long_project, working_dir=worker_dir)
    follower = room.start_client("train", "--config", str(long_project["config"]), "--non-interactive")
    follower.wait_for(r"epoch 2/", timeout=180)
    job_id = re.search(r"job (\S+) accepted by", follower.output()).group(1)
    stop = room.client("stop", job_id)
    assert stop.returncode == 0, stop.stderr
    assert follower.popen.wait(timeout=180) == 0, follower.output()
    record = ledger(worker_dir, job_id)
    assert record["state"] == P.COMPLETED and record["stopped_early"]
    model = next(o for o in record["outputs"] if o["kind"] == "model")
    assert (Path(model["path"]) / "best.ckpt").exists()
    assert record["slurm"]["state"] == "COMPLETED"
