"""Several workers in one room: negotiation, auto-select, the queue, the ledger, reattach.

Real signaling server, real worker and client processes, real sleap-nn on tiny data.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from pathlib import Path

import pytest

import client
import protocol as P
from conftest import ledger, stand_in, state_of, wait_until
from tiny_data import make_project

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return make_project(tmp_path_factory.mktemp("project"), frames=16, epochs=2, steps=4)


def start(room, project, *extra: str, working_dir: Path | None = None):
    return room.start_worker("--mount", str(project["config"].parent), *extra, working_dir=working_dir)


def submit(room, project, *extra: str) -> tuple[str, str, object]:
    """`client.py train --detach`: (job id, worker id, the finished command)."""
    result = room.client("train", "--config", str(project["config"]), "--detach", *extra)
    assert result.returncode == 0, result.stdout + result.stderr
    job_id, worker_id = re.search(r"job (\S+) accepted by (\S+);", result.stdout).groups()
    return job_id, worker_id, result


def gated_stand_in(tmp_path: Path) -> tuple[Path, Path]:
    """A stand-in for sleap-nn (worker --sleap-nn) that runs until the test creates the gate file."""
    gate = tmp_path / "gate"
    script = stand_in(tmp_path, "gated-sleap-nn", "import os, time\nprint('working', flush=True)\n"
                      f"while not os.path.exists({str(gate)!r}):\n    time.sleep(0.05)\n")
    return script, gate


def test_the_worker_with_enough_gpu_memory_is_chosen(room, project):
    _, small = start(room, project, "--advertise-gpu-memory", "4000")
    _, big = start(room, project, "--advertise-gpu-memory", "16000")
    job_id, chosen, result = submit(room, project, "--min-gpu-memory", "8000")
    assert chosen == big
    assert f"chose {big}" in result.stderr and small not in result.stderr

    too_much = room.client("train", "--config", str(project["config"]), "--min-gpu-memory", "32000")
    assert too_much.returncode == 1
    assert "no worker with >= 32000 MB GPU memory" in too_much.stderr
    assert f"{small} (4000 MB)" in too_much.stderr and f"{big} (16000 MB)" in too_much.stderr
    assert room.client("cancel", job_id).returncode == 0


def test_a_busy_worker_is_passed_over_for_a_free_one(room, project):
    busy_dir = room.tmp / "busy"
    _, busy = start(room, project, "--advertise-gpu-memory", "16000", working_dir=busy_dir)
    _, free = start(room, project, "--advertise-gpu-memory", "4000")
    first, chosen, _ = submit(room, project, "--worker-id", busy, "--max-epochs", "30")
    assert chosen == busy
    wait_until(lambda: state_of(busy_dir, first) == P.RUNNING, 30, "the first job to run")

    second, chosen, result = submit(room, project)
    assert chosen == free, result.stderr
    assert "it can start now; the others would queue" in result.stderr
    assert re.search(rf"{busy}\s+16000 MB\s+queue position 1", result.stderr)
    for job_id in (first, second):
        room.client("cancel", job_id)


def test_a_second_job_queues_and_runs_when_the_first_ends(room, project, tmp_path):
    gated, gate = gated_stand_in(tmp_path)
    worker_dir = room.tmp / "w"
    start(room, project, "--sleap-nn", str(gated), working_dir=worker_dir)
    first, _, _ = submit(room, project)
    follower = room.start_client("train", "--config", str(project["config"]))
    second = follower.wait_for(r"job (\S+) accepted by \S+; queued at position 1", timeout=60).group(1)
    gate.touch()  # the first job ends; nobody resubmits the second
    follower.wait_for(rf"job {second} started on")
    follower.wait_for(rf"job {second} completed", timeout=30)
    assert follower.popen.wait(timeout=15) == 0
    one, two = ledger(worker_dir, first), ledger(worker_dir, second)
    assert one["state"] == two["state"] == P.COMPLETED
    assert two["started_at"] >= one["finished_at"]


def test_two_clients_racing_for_one_worker_one_runs_one_queues(room, project):
    worker_dir = room.tmp / "w"
    _, worker_id = start(room, project, working_dir=worker_dir)
    args = ["train", "--config", str(project["config"]), "--detach", "--max-epochs", "30"]
    racers = [room.start_client(*args) for _ in range(2)]
    for racer in racers:
        racer.wait_for(r"detached", timeout=60)
    outputs = [racer.output() for racer in racers]
    assert sum("starting now" in out for out in outputs) == 1, outputs
    assert sum("queued at position 1" in out for out in outputs) == 1, outputs

    probe = room.signaling_client("probe")
    try:
        assert probe.discover(role="worker") != []
        assert probe.discover(role="worker", properties={"status": P.AVAILABLE}) == []
        queued = re.search(r"job (\S+) accepted by \S+; queued", "".join(outputs)).group(1)
        assert room.client("cancel", queued).returncode == 0
        assert state_of(worker_dir, queued) == P.CANCELLED
        assert ledger(worker_dir, queued)["started_at"] is None
    finally:
        probe.close()
    running = re.search(r"job (\S+) accepted by \S+; starting", "".join(outputs)).group(1)
    room.client("cancel", running)


def test_a_killed_client_leaves_the_job_running_and_a_new_one_reattaches(room, project, tmp_path):
    worker_dir = room.tmp / "w"
    start(room, project, working_dir=worker_dir)
    follower = room.start_client("train", "--config", str(project["config"]), "--max-epochs", "10")
    job_id = follower.wait_for(r"job (\S+) accepted by", timeout=60).group(1)
    follower.wait_for(r"epoch 1/10", timeout=60)
    follower.kill()
    (room.tmp / "home" / ".sleap-rtc" / "jobs" / f"{job_id}.json").unlink()  # the new client must find the worker

    logs = room.client("logs", job_id, "--follow")
    assert logs.returncode == 0, logs.stderr
    assert f"job {job_id} completed" in logs.stderr
    worker_log = (worker_dir / "jobs" / job_id / "job.log").read_text()
    assert logs.stdout == worker_log  # from the first line, no gap, nothing twice
    assert "`Trainer.fit` stopped: `max_epochs=10` reached" in logs.stdout

    status = room.client("status", job_id)
    assert status.returncode == 0 and re.search(r"state\s+completed", status.stdout), status.stdout
    fetched = room.client("fetch", job_id, "--download", str(tmp_path / "results"))
    assert fetched.returncode == 0, fetched.stderr
    assert "each SHA-256 matches the job record" in fetched.stdout
    model = next(o for o in ledger(worker_dir, job_id)["outputs"] if o["kind"] == "model")
    local = tmp_path / "results" / job_id
    assert (local / "best.ckpt").read_bytes() == (Path(model["path"]) / "best.ckpt").read_bytes()
    assert {f.name for f in local.iterdir()} == {f["name"] for f in model["files"]}

    track = room.client("track", "--data-path", str(project["video"]), "--model-paths", model["path"],
                        "--peak-threshold", "0", "--frames", "0-4", "--detach")
    assert track.returncode == 0, track.stderr
    track_id = re.search(r"job (\S+) accepted by", track.stdout).group(1)
    followed = room.client("logs", track_id, "--follow")
    assert f"job {track_id} completed" in followed.stderr
    assert not list(room.tmp.glob("*.slp"))  # a follower is not sent the predictions
    fetched = room.client("fetch", track_id, "--download", str(tmp_path / "results"))
    assert fetched.returncode == 0, fetched.stderr
    predictions = next(o for o in ledger(worker_dir, track_id)["outputs"] if o["kind"] == "predictions")
    local = tmp_path / "results" / track_id / "video.predictions.slp"
    assert hashlib.sha256(local.read_bytes()).hexdigest() == predictions["sha256"]


def test_a_worker_killed_mid_training_fails_that_job_and_runs_the_queue_after_restart(room, project):
    worker_dir = room.tmp / "w"
    worker, _ = start(room, project, working_dir=worker_dir)
    running, _, _ = submit(room, project, "--max-epochs", "30")
    queued, _, result = submit(room, project, "--max-epochs", "1")
    assert "queued at position 1" in result.stdout
    wait_until(lambda: "Epoch 0" in (worker_dir / "jobs" / running / "job.log").read_text()
               if (worker_dir / "jobs" / running / "job.log").exists() else False, 60, "training to start")
    pid = ledger(worker_dir, running)["pid"]
    worker.kill()

    start(room, project, working_dir=worker_dir)
    wait_until(lambda: state_of(worker_dir, queued) == P.COMPLETED, 90, "the queued job to run after the restart")
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the orphaned sleap-nn was killed, not left on the GPU

    status = room.client("status", running)
    assert re.search(r"state\s+failed", status.stdout) and "worker restarted during the job" in status.stdout
    logs = room.client("logs", running)
    assert "Epoch 0" in logs.stdout and "worker restarted during the job" in logs.stdout
    listing = room.client("jobs")
    assert listing.returncode == 0, listing.stderr
    rows = {line.split()[0]: line.split() for line in listing.stdout.splitlines()[1:]}
    assert rows[running][3] == P.FAILED and rows[queued][3] == P.COMPLETED
    failed = room.client("jobs", "--state", "failed").stdout.splitlines()[1:]
    assert [line.split()[0] for line in failed] == [running]


def test_ranking_prefers_start_now_then_queue_then_memory_then_peer_id():
    def candidate(peer_id, position, memory):
        return {"peer_id": peer_id, "gpu_memory_mb": memory,
                "response": P.JobResponse.read({"accepted": True, "queue_position": position})}

    pool = [candidate("d", 0, 8000), candidate("c", 0, 8000), candidate("b", 1, 80000), candidate("a", 0, 4000),
            candidate("e", 2, 99999)]
    assert [c["peer_id"] for c in sorted(pool, key=client.rank_key)] == ["c", "d", "a", "b", "e"]
    assert client.choice_reason(sorted(pool[:3], key=client.rank_key)) == "as good as the others; first by peer id"
    assert client.choice_reason([pool[3], pool[2]]) == "it can start now; the others would queue"


class OldServer:
    """Stands in for a server without the v2 discovery: it answers UNKNOWN_MESSAGE_TYPE."""

    url, room_id = "ws://old-server", "R"

    def discover(self, **_):
        raise P.SignalingError(P.UNKNOWN_MESSAGE_TYPE, "unknown message type: discover_peers")


def test_without_discovery_the_worker_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(P.ENV_WORKER_PEER_ID, raising=False)
    with pytest.raises(P.NoWorkersAvailableError, match=P.ENV_WORKER_PEER_ID):
        client.discover_workers(OldServer(), P.TRAIN)
    monkeypatch.setenv(P.ENV_WORKER_PEER_ID, "worker-gpu-1")
    assert client.discover_workers(OldServer(), P.TRAIN) == [P.WorkerCard("worker-gpu-1", fallback=True)]


def test_odd_peer_messages_get_clear_answers_and_the_worker_keeps_serving(room, project):
    _, worker_id = start(room, project, "--advertise-gpu-memory", "4000")
    peer = room.signaling_client("prober")
    try:
        for junk in ("text", [1, 2], {P.APP_MESSAGE_TYPE: P.APP_JOB_REQUEST, "requirements": [1]},
                     {P.APP_MESSAGE_TYPE: P.APP_JOBS_QUERY, "request_id": "q0", "state": ["x"]},
                     {P.APP_MESSAGE_TYPE: "no_such_type"}):
            peer.send_to_peer(worker_id, junk)

        def ask(payload: dict, reply_type: str) -> dict:
            return client.ask_workers(peer, [worker_id], payload, reply_type)[worker_id]

        request = {P.APP_MESSAGE_TYPE: P.APP_JOB_REQUEST, "job_id": "j1", "job_type": P.TRAIN}
        assert ask({**request, "requirements": {"min_gpu_memory_mb": "lots"}}, P.APP_JOB_RESPONSE)["reason"] \
            == "bad_request"
        assert ask({**request, "job_id": "j2", "job_type": "paint"}, P.APP_JOB_RESPONSE)["reason"] == "incompatible"
        too_big = ask({**request, "job_id": "j3", "requirements": {"min_gpu_memory_mb": 8000}}, P.APP_JOB_RESPONSE)
        assert too_big["reason"] == "insufficient_gpu_memory" and "4000 MB" in too_big["message"]
        fine = ask({**request, "job_id": "j4"}, P.APP_JOB_RESPONSE)
        assert fine["accepted"] and fine["queue_position"] == 0
        assert fine["estimated_duration_minutes"] is None  # no history yet, no made-up estimate
        bad_state = ask({P.APP_MESSAGE_TYPE: P.APP_JOBS_QUERY, "request_id": "q1", "state": "done"}, P.APP_JOBS_LIST)
        assert "unknown state 'done'" in bad_state["error"] and bad_state["jobs"] == []
    finally:
        peer.close()


def test_a_worker_in_maintenance_is_not_discovered_as_available_and_takes_no_job(room, project):
    _, resting = start(room, project, "--maintenance", "--advertise-gpu-memory", "4000")
    probe = room.signaling_client("probe")
    try:
        assert [w["peer_id"] for w in probe.discover(role="worker")] == [resting]
        assert probe.discover(role="worker", properties={"status": P.AVAILABLE}) == []
    finally:
        probe.close()
    for how in ([], ["--worker-id", resting]):
        result = room.client("train", "--config", str(project["config"]), *how)
        assert result.returncode == 1
        assert "no worker accepted job" in result.stderr and "maintenance" in result.stderr, result.stderr
    assert room.client("jobs").stdout.startswith("no jobs")


def test_slots_run_jobs_side_by_side_and_the_rest_wait(room, project, tmp_path):
    gated, gate = gated_stand_in(tmp_path)
    worker_dir = room.tmp / "w"
    _, worker_id = start(room, project, "--slots", "2", "--sleap-nn", str(gated), working_dir=worker_dir)
    submitted = [submit(room, project, "--worker-id", worker_id) for _ in range(3)]
    assert ["starting now" in result.stdout for _, _, result in submitted] == [True, True, False]
    assert "queued at position 1" in submitted[2][2].stdout
    probe = room.signaling_client("probe")
    try:
        props = probe.discover(role="worker")[0]["metadata"]["properties"]
    finally:
        probe.close()
    assert (props["status"], props["running_jobs"], props["queue_length"], props["max_concurrent_jobs"]) \
        == (P.BUSY, 2, 1, 2)
    ids = [job_id for job_id, _, _ in submitted]
    assert [state_of(worker_dir, j) for j in ids] == [P.RUNNING, P.RUNNING, P.PENDING]
    gate.touch()
    wait_until(lambda: all(state_of(worker_dir, j) == P.COMPLETED for j in ids), 30, "all three jobs")
    first, second, third = (ledger(worker_dir, j) for j in ids)
    assert first["started_at"] < second["finished_at"] and second["started_at"] < first["finished_at"]
    assert third["started_at"] >= min(first["finished_at"], second["finished_at"])


def test_an_assignment_reserves_the_free_slot_for_its_job_until_the_timeout(room, project):
    _, worker_id = start(room, project, "--reservation-timeout", "2")
    peer = room.signaling_client("assigner")
    try:
        def assign(job_id: str) -> dict:
            message = {P.APP_MESSAGE_TYPE: P.APP_JOB_ASSIGNMENT, "job_id": job_id}
            return client.ask_workers(peer, [worker_id], message, P.APP_JOB_ASSIGNED)[worker_id]

        assert assign("held-1") == {P.APP_MESSAGE_TYPE: P.APP_JOB_ASSIGNED, "job_id": "held-1", "reserved": True,
                                    "queue_position": 0}
        # The worker publishes its status from its own thread, a moment after it answers.
        found = wait_until(lambda: peer.discover(role="worker", properties={"status": P.RESERVED}), 1.5,
                           "discovery to show the slot reserved")
        assert found[0]["metadata"]["properties"]["pending_job_id"] == "held-1"
        assert assign("held-2")["queue_position"] == 1  # the only slot is promised already
        wait_until(lambda: peer.discover(role="worker", properties={"status": P.AVAILABLE}), 10,
                   "the unclaimed slot to be free again")
        assert assign("held-3")["reserved"]
    finally:
        peer.close()


def test_following_a_log_mid_stream_misses_no_line_and_repeats_none(room, project, tmp_path):
    chatty = stand_in(tmp_path, "chatty-sleap-nn",
                      "import time\nfor i in range(20000):\n    print(f'line {i}', flush=True)\n    time.sleep(0.0002)\n")
    worker_dir = room.tmp / "w"
    start(room, project, "--sleap-nn", str(chatty), working_dir=worker_dir)
    job_id, _, _ = submit(room, project)
    log_file = worker_dir / "jobs" / job_id / "job.log"
    wait_until(lambda: log_file.exists() and log_file.stat().st_size > 0, 30, "the first lines")
    attached = time.time()
    followed = room.client("logs", job_id, "--follow")
    assert followed.returncode == 0 and f"job {job_id} completed" in followed.stderr, followed.stderr
    assert ledger(worker_dir, job_id)["finished_at"] > attached + 1.5  # it joined mid-stream

    assert followed.stdout.splitlines() == ["[sleap-rtc worker] TRAIN_JOB_START config",
                                            *(f"line {i}" for i in range(20000)),
                                            "[sleap-rtc worker] TRAIN_JOB_END config"]
