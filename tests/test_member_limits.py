"""A room member is not root on the worker: each attack a hostile member tried, kept as a
test. Code from checkpoints, paths glued to options, a swapped upload, another member's
upload in progress, abandoned uploads, memory-hungry ledger queries, a worker's id, the
room and other members' jobs, a member posing as a worker, a port scan through the direct
path, and the internet.

Real signaling server, worker and client processes on loopback; the hostile member is
the real client or, where the command line cannot send the input, a peer built on
protocol.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import socket
import sqlite3
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

import protocol as P
from conftest import PY, ROOT, job_id_of, ledger, stand_in, state_of, wait_until
from tiny_data import make_project

SECRET = "s3cr3t-do-not-leak"
MB = 1024 * 1024


class Payload:
    """What a hostile checkpoint holds: unpickling it runs a shell command."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def evil_checkpoint(path: Path, marker: Path, leak: Path) -> Path:
    """A pickle named like a checkpoint: loading it the way sleap-nn does touches `marker`
    and writes the environment (with SECRET in it) to `leak`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({"state_dict": Payload(f"touch {marker}; env > {leak}")}))
    return path


@pytest.fixture
def lab(tmp_path):
    """A mount with real tiny labels and a config, and the marker and leak files a payload would write."""
    mount = tmp_path / "data"
    project = make_project(mount, frames=4)
    return {"mount": mount, "labels": project["labels"], "config": project["config"],
            "marker": tmp_path / "PWNED", "leak": tmp_path / "leaked-env"}


DATABASE_URL = "postgres://lab:hunter2@db.lab/jobs"  # a secret in a value, under a plain name


def start(room, mount: Path, *extra: str, name: str = "w"):
    """A worker with secrets in its environment: (process, peer id, working dir)."""
    working_dir = room.tmp / name
    proc, peer_id = room.start_worker("--mount", str(mount), *extra, working_dir=working_dir,
                                      env={"SECRET": SECRET, "DATABASE_URL": DATABASE_URL})
    return proc, peer_id, working_dir


def signed_in_home(room, home: Path, signin: dict) -> dict:
    """The environment of a client whose HOME holds `signin` (another member, or an admin)."""
    (home / ".sleap-rtc").mkdir(parents=True, exist_ok=True)
    base = P.http_base_url(room.ws_url, str(room.http_port))
    (home / ".sleap-rtc" / "credentials.json").write_text(json.dumps(
        {base: {"id_token": signin["id_token"], "username": signin["username"]}}))
    return {**room.peer_env(), "HOME": str(home)}


def client_as(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, str(ROOT / "client.py"), *args], env=env, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL, cwd=Path(env["HOME"]))


def sign_in(room) -> dict:
    return P.anonymous_sign_in(room.http_url)


def rejected(result) -> str:
    assert result.returncode != 0, result.stdout + result.stderr
    assert "was rejected by" in result.stderr, result.stderr
    return result.stderr


# -- 1. checkpoints are data, never code ----------------------------------------------------


def test_a_pickled_checkpoint_never_runs_by_any_route(room, lab):
    mount, marker, leak = lab["mount"], lab["marker"], lab["leak"]
    worker, _, worker_dir = start(room, mount)
    evil = evil_checkpoint(room.tmp / "laptop" / "evil.ckpt", marker, leak)
    uploaded = room.client("upload", str(evil))
    assert uploaded.returncode == 0, uploaded.stderr
    stored = uploaded.stdout.strip().rsplit(": ", 1)[1]
    model_dir = mount / "evil-model"
    evil_checkpoint(model_dir / "best.ckpt", marker, leak)

    for key in ("pretrained_backbone_weights", "pretrained_head_weights"):  # routes 1 and 2: the config
        config = mount / f"{key}.yaml"
        config.write_text(lab["config"].read_text().replace("model_config:\n", f"model_config:\n  {key}: {stored}\n"))
        errors = rejected(room.client("train", "--config", str(config)))
        assert f"model_config.{key}: {stored} is refused: checkpoints are unpickled" in errors, errors
        assert "Weights only load failed" in errors
    errors = rejected(room.client("train", "--config", str(lab["config"]), "--resume", stored))  # route 3
    assert re.search(r"resume: .*is refused: checkpoints are unpickled", errors), errors
    errors = rejected(room.client("track", "--data-path", str(lab["labels"]), "--model-paths", str(model_dir)))
    assert f"{model_dir / 'best.ckpt'} is refused: checkpoints are unpickled" in errors, errors  # route 4

    assert not marker.exists() and not leak.exists(), "the payload ran"
    assert SECRET not in worker.output()
    with sqlite3.connect(worker_dir / "jobs.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 0  # nothing was accepted


def test_sleap_nn_steps_load_weights_only_and_see_no_secrets(room, lab, tmp_path):
    """The second lock on the door: whatever a step loads, torch refuses to unpickle code,
    wandb and the hub are off, and secret-looking variables are not passed on."""
    dump = tmp_path / "step-env.json"
    env_dump = stand_in(tmp_path, "env-sleap-nn", f"import json, os\njson.dump(dict(os.environ), open({str(dump)!r}, 'w'))\n")
    _, _, worker_dir = start(room, lab["mount"], "--sleap-nn", str(env_dump))
    job_id = room.submit(lab["config"])
    wait_until(lambda: state_of(worker_dir, job_id) == P.COMPLETED, 60, "the job to complete")
    seen = json.loads(dump.read_text())
    assert seen["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] == "1" and seen["WANDB_MODE"] == "disabled"
    assert seen["HF_HUB_OFFLINE"] == "1"
    assert "SECRET" not in seen and SECRET not in json.dumps(seen) and P.ENV_TOKEN not in seen


@pytest.mark.slow
def test_real_checkpoints_still_resume_pretrain_and_track(room, tmp_path):
    """sleap-nn 0.3.5 under TORCH_FORCE_WEIGHTS_ONLY_LOAD=1, with checkpoints this worker
    trained (found in its ledger) and one another worker checks by loading it."""
    project = make_project(tmp_path / "project", frames=12, epochs=1, steps=2)
    mount = project["config"].parent
    _, first, first_dir = start(room, mount, name="first")
    trained = room.client("train", "--config", str(project["config"]), "--run-name", "base")
    assert trained.returncode == 0, trained.stderr
    model = Path(next(o["path"] for o in ledger(first_dir, job_id_of(trained.stdout))["outputs"]
                      if o["kind"] == "model"))
    resumed = room.client("train", "--config", str(project["config"]), "--resume", str(model / "best.ckpt"),
                          "--max-epochs", "2", "--worker-id", first)
    assert resumed.returncode == 0, resumed.stderr
    pretrained = mount / "pretrained.yaml"
    pretrained.write_text(project["config"].read_text().replace(
        "model_config:\n", f"model_config:\n  pretrained_backbone_weights: {model / 'best.ckpt'}\n"))
    started = room.client("train", "--config", str(pretrained), "--worker-id", first)
    assert started.returncode == 0, started.stderr
    tracked = room.client("track", "--data-path", str(project["labels"]), "--model-paths", str(model),
                          "--worker-id", first)
    assert tracked.returncode == 0, tracked.stderr
    shared = mount / "shared-model"  # on shared storage, where a second worker sees it
    shutil.copytree(model, shared)
    _, second, _ = start(room, mount, name="second")  # its ledger knows nothing of the model: it loads it to check
    elsewhere = room.client("track", "--data-path", str(project["labels"]), "--model-paths", str(shared),
                            "--worker-id", second)
    assert elsewhere.returncode == 0, elsewhere.stderr


# -- 2. command arguments name no path outside the mounts, in any spelling -------------------


def test_paths_glued_to_options_are_checked_and_commands_write_only_where_allowed(room, tmp_path):
    mount, secret_dir = tmp_path / "mount", tmp_path / "secret"
    mount.mkdir()
    secret_dir.mkdir()
    (mount / "in.txt").write_text("b\na\n")
    (secret_dir / "secret.txt").write_text(SECRET)
    worker_dir = tmp_path / "w"
    _, worker_id = room.start_worker("--mount", str(mount), "--allow-command", f"sort={shutil.which('sort')}",
                                     "--allow-command", f"tar={shutil.which('tar')}",
                                     "--allow-command", f"cat={shutil.which('cat')}", working_dir=worker_dir)
    pwned = tmp_path / "outside" / "pwned.txt"
    pwned.parent.mkdir()
    attacks = [
        ["sort", "--", f"-o{pwned}", str(mount / "in.txt")],  # a write outside, glued to -o
        ["tar", "--", "-c", f"-f{mount}/loot.tar", f"-C{secret_dir}", "secret.txt"],  # a read from outside
        ["tar", "--", "-c", f"-f{mount}/loot.tar", f"-C{worker_dir}", "room.env"],
        ["tar", "--", "-cf", f"{mount}/loot.tar", "-C..", "."],  # the jobs directory, above the job's own
        ["tar", "--", "-x", f"-f{mount}/any.tar", f"--directory={worker_dir}/uploads"],
        ["sort", "--", f"of=/{pwned}", str(mount / "in.txt")],
        ["cat", "--", f"a,{secret_dir}/secret.txt"],  # a list a program may split
        ["cat", "--", f"x {secret_dir}/secret.txt"],
    ]
    for argv in attacks:
        result = room.client("run", "--non-interactive", *argv)
        assert result.returncode != 0, (argv, result.stdout)
        assert re.search(r"outside the worker's mounts|which commands only read", result.stderr), (argv, result.stderr)
    assert not pwned.exists() and not (mount / "loot.tar").exists()

    # What stays allowed: glued paths inside the mounts, and reading an upload through a copy.
    ok = room.client("run", "--non-interactive", "sort", "--", f"-o{mount}/sorted.txt", str(mount / "in.txt"))
    assert ok.returncode == 0, ok.stderr
    assert (mount / "sorted.txt").read_text() == "a\nb\n"
    uploaded = room.client("upload", str(mount / "in.txt"))
    stored = Path(uploaded.stdout.strip().rsplit(": ", 1)[1])
    before = stored.read_bytes()
    copied = room.client("run", "--non-interactive", "sort", "--", "-o", str(stored), str(stored))
    assert copied.returncode == 0, copied.stderr  # sort's -o names its input's copy in the job's directory
    assert stored.read_bytes() == before
    assert stat.S_IMODE(stored.stat().st_mode) == 0o444
    record = ledger(worker_dir, job_id_of(copied.stdout))
    assert all("/uploads/" not in arg for arg in json.loads(record["command"])), record["command"]


def test_the_workers_own_files_are_not_in_its_default_mount(room, lab, tmp_path):
    """With no --mount the working directory is the mount: its ledger, key, uploads and
    other jobs stay out of reach all the same."""
    worker_dir = tmp_path / "w"
    _, worker_id = room.start_worker("--allow-command", f"cat={shutil.which('cat')}", working_dir=worker_dir)
    (worker_dir / "room.env").write_text(f"export SLEAP_RTC_TOKEN={SECRET}\n")
    (worker_dir / "room.env").chmod(0o600)
    shutil.copy(lab["labels"], worker_dir / "labels.slp")
    for own in ("jobs.sqlite", "worker-key", "room.env"):
        got = room.client("download", str(worker_dir / own), "--download", str(tmp_path / "got"))
        assert got.returncode != 0 and "outside the worker's mounts" in got.stderr, (own, got.stderr)
        peek = room.client("run", "--non-interactive", "cat", "--", str(worker_dir / own))
        assert peek.returncode != 0 and SECRET not in peek.stdout, own
    listing = room.client("ls", str(worker_dir))
    assert "labels.slp" in listing.stdout  # uploads/ and jobs/ may show too: members read them
    assert not re.search(r"jobs\.sqlite|worker-key|worker-id|room\.env", listing.stdout), listing.stdout
    config = worker_dir / "escape.yaml"
    for target in (worker_dir / "uploads", worker_dir / "jobs" / "someone-elses"):
        config.write_text(lab["config"].read_text().replace(str(lab["labels"]), str(worker_dir / "labels.slp"))
                          + f"  ckpt_dir: {target}\n")
        errors = rejected(room.client("train", "--config", str(config)))
        assert "trainer_config.ckpt_dir: Access denied" in errors, errors


# -- 3. the upload store serves only content whose hash is its name ---------------------------


def test_a_changed_upload_is_hashed_again_and_not_served(room, tmp_path):
    worker_dir = tmp_path / "w"
    start(room, tmp_path, name="w")
    good = tmp_path / "labels.bin"
    good.write_bytes(os.urandom(100_000))
    stored = Path(room.client("upload", str(good)).stdout.strip().rsplit(": ", 1)[1])
    assert stored.is_relative_to(worker_dir / "uploads")
    stored.chmod(0o644)
    stored.write_bytes(b"swapped by a job that should not have been able to")  # as root could
    again = room.client("upload", str(good))
    assert again.returncode == 0, again.stderr
    assert "already on the worker" not in again.stderr  # it was sent again
    assert stored.read_bytes() == good.read_bytes()


def test_another_members_upload_in_progress_cannot_be_truncated_or_deleted(room, tmp_path):
    worker_dir = tmp_path / "w"
    worker, worker_id, _ = start(room, tmp_path, name="w")
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(24 * MB))
    digest = hashlib.sha256(big.read_bytes()).hexdigest()
    part = worker_dir / "uploads" / f".{digest}.part"
    uploader = room.start_client("upload", "--no-direct", str(big))
    wait_until(lambda: part.exists() and part.stat().st_size >= 2 * MB, 60, "the upload to be under way")
    held = part.stat().st_size
    # Another member (a sign-in of its own) tries to start the same content over, then aborts.
    _, other = P.http_call("POST", room.http_url + "/anonymous-signin", {})
    signaling = P.SignalingClient(room.ws_url, room.room_id, room.token, "intruder", "client",
                                  id_token=other["id_token"])
    signaling.connect()
    link = P.open_link(signaling, worker_id, tmp_path)
    try:
        link.send(P.FILE_BEGIN, {"transfer_id": "t1", "name": "big.bin", "size": big.stat().st_size,
                                 "sha256": digest, "store": True, "offset": 0})
        link.send(P.FILE_ABORT, {"transfer_id": "t1", "reason": "gotcha"})
        worker.wait_for(r"upload from intruder failed: refused: another member is uploading the same content",
                        timeout=15)
    finally:
        link.close()
        signaling.close()
    assert part.exists() and part.stat().st_size >= held  # neither truncated nor deleted
    assert uploader.popen.wait(timeout=120) == 0, uploader.output()
    assert hashlib.sha256((worker_dir / "uploads" / digest / "big.bin").read_bytes()).hexdigest() == digest


# -- 4. abandoned uploads are counted, listed, expired and pruned -----------------------------


def abandon_uploads(room, worker_id: str, tmp_path: Path, count: int, first: int = 0) -> list[str]:
    """Start `count` uploads of made-up content, send 1 MiB of each, and leave."""
    signaling = room.signaling_client(f"abandoner-{first}")
    link = P.open_link(signaling, worker_id, tmp_path)
    hashes = []
    try:
        for i in range(first, first + count):
            digest = hashlib.sha256(f"made up {i}".encode()).hexdigest()
            link.send(P.FILE_BEGIN, {"transfer_id": f"a{i}", "name": f"junk{i}.bin", "size": 2 * MB,
                                     "sha256": digest, "store": True, "offset": 0})
            for _ in range(4):
                link.send_raw(os.urandom(MB // 4))
            link.send(P.FILE_ABORT, {"transfer_id": f"a{i}", "reason": "leaving"})
            hashes.append(digest)
        link.send(P.LINK_PING, {"seq": 1})
        link.expect(lambda m: isinstance(m, P.Message) and m.name == P.LINK_PONG, 10, "pong")
    finally:
        link.close()
        signaling.close()
    return hashes


def test_abandoned_uploads_are_listed_counted_and_pruned(room, tmp_path):
    worker_dir = tmp_path / "w"
    room.admin = sign_in(room)
    worker, worker_id, _ = start(room, tmp_path, "--upload-cache-gb", "0.0025", "--admin", room.admin["username"],
                                 name="w")
    hashes = abandon_uploads(room, worker_id, tmp_path, 3)
    parts = lambda: sorted(p.name[1:65] for p in (worker_dir / "uploads").glob(".*.part"))  # noqa: E731
    # 3 MiB of parts against a 2.5 MB cap: the oldest goes, the others are listed.
    wait_until(lambda: parts() == sorted(hashes[1:]), 10, "the cap to take the oldest part")
    listing = room.client("files", "ls")
    assert listing.returncode == 0, listing.stderr
    for digest in hashes[1:]:
        assert re.search(rf"{digest[:12]}\s+1\.0 MB\s+.*\(cut off\)", listing.stdout), listing.stdout
    # A member's prune leaves them (they are no job of its own); the worker's admin's prune takes them.
    mine = room.client("prune", "--older-than", "0s")
    assert mine.returncode == 0, mine.stderr
    assert parts() == sorted(hashes[1:])
    # Another member cannot resume (and so spoil, then lose) one it did not start.
    other = P.SignalingClient(room.ws_url, room.room_id, room.token, "spoiler", "client",
                              id_token=sign_in(room)["id_token"])
    other.connect()
    link = P.open_link(other, worker_id, tmp_path)
    try:
        link.send(P.FILE_BEGIN, {"transfer_id": "x", "name": "junk1.bin", "size": 2 * MB, "sha256": hashes[1],
                                 "store": True, "offset": MB})
        worker.wait_for(r"upload from spoiler failed: refused: another member's upload of the same content was "
                        r"cut off here", timeout=15)
    finally:
        link.close()
        other.close()
    # A cut-off upload nobody resumed for a day goes when the store next settles.
    day_old = worker_dir / "uploads" / f".{hashes[1]}.part"
    os.utime(day_old, (time.time() - 25 * 3600,) * 2)
    newer = abandon_uploads(room, worker_id, tmp_path, 1, first=3)
    wait_until(lambda: parts() == sorted([hashes[2], *newer]), 10, "the day-old part to expire")
    worker.wait_for(rf"removed the cut-off upload \.{hashes[1]}\.part \(nobody resumed it for 24 h\)")
    admin = client_as(signed_in_home(room, tmp_path / "admin-home", room.admin), "prune", "--older-than", "0s")
    assert admin.returncode == 0, admin.stdout + admin.stderr
    assert parts() == [] and "removed cut-off upload" in admin.stdout, admin.stdout


def test_uploads_leave_the_free_space_the_worker_keeps(room, tmp_path):
    _, worker_id, worker_dir = start(room, tmp_path, "--min-free-gb", "1000000", name="w")
    small = tmp_path / "small.bin"
    small.write_bytes(b"x" * 1000)
    refused = room.client("upload", str(small))
    assert refused.returncode != 0
    assert "keeps 1e+06 GB free (--min-free-gb)" in refused.stderr, refused.stderr
    assert not list((worker_dir / "uploads").glob("*"))


# -- 5. ledger queries are bounded in memory ------------------------------------------------


def _peak_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def test_ledger_queries_cannot_balloon_the_worker(room, tmp_path):
    worker, _, _ = start(room, tmp_path, "--allow-command", "echo=/bin/echo", name="w")
    assert room.client("run", "--non-interactive", "echo", "--", "one").returncode == 0
    Path(f"/proc/{worker.popen.pid}/clear_refs").write_text("5")  # the peak resident size starts over
    before = _peak_kb(worker.popen.pid)
    hostile = {
        "SELECT zeroblob(150000000)": "zeroblob() is not one of the functions",
        "SELECT fts3_tokenizer('simple')": "fts3_tokenizer() is not one of the functions",
        "SELECT randomblob(50000000) FROM jobs": "randomblob() is not one of the functions",
        "SELECT replace(printf('%.*c', 60000, 'x'), 'x', 'yy')": "string or blob too big",
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 100000) "
        "SELECT group_concat(printf('%.*c', 1000, 'x')) FROM c": "string or blob too big",
    }
    for sql, why in hostile.items():
        result = room.client("jobs", "--sql", sql)
        assert result.returncode == 1 and why in result.stderr, (sql, result.stderr)
    many = room.client("jobs", "--sql", "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c "
                                        "LIMIT 20) SELECT x, printf('%.*c', 60000, 'x') AS pad FROM c", "--json")
    assert many.returncode == 0, many.stderr
    rows = json.loads(many.stdout)
    assert 0 < len(rows) < 20 and "sent only the first" in many.stderr  # the reply budget stopped the reading
    huge = room.client("jobs", "--sql", "SELECT length(printf('%.*c', 150000000, 'x')) AS n", "--json")
    assert huge.returncode == 0 and json.loads(huge.stdout)[0]["n"] is None  # past the length limit: NULL
    sorted_ = room.client("jobs", "--sql", "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c "
                                           "LIMIT 50000) SELECT printf('%.*c', 60000, 'x') FROM c ORDER BY x DESC")
    assert sorted_.returncode == 0 or "longer than 2 s" in sorted_.stderr, sorted_.stderr
    growth_mb = (_peak_kb(worker.popen.pid) - before) / 1024
    assert growth_mb < 64, f"the worker's peak memory grew by {growth_mb:.0f} MB under hostile queries"


# -- 6 and 7. ids, the room, and other members' jobs have owners -----------------------------


def test_a_stranger_cannot_take_a_restarting_workers_id(room, tmp_path):
    worker, worker_id, worker_dir = start(room, tmp_path, name="w")
    worker.kill()
    stranger_room = P.create_room(room.http_url)
    squatter = P.SignalingClient(room.ws_url, stranger_room["room_id"], stranger_room["token"], worker_id, "worker")
    squatter.connect()  # ids are per room: the stranger's room has its own
    member = P.SignalingClient(room.ws_url, room.room_id, room.token, worker_id, "worker", reconnect=False)
    with pytest.raises(P.SignalingError, match="claimed"):
        member.connect()  # a member without the worker's key cannot take it either
    try:
        restarted, again = start(room, tmp_path, name="w")[:2]
        assert again == worker_id
        watcher = room.signaling_client("watcher")
        assert [w["peer_id"] for w in watcher.discover(role="worker")] == [worker_id]
        watcher.close()
    finally:
        squatter.close()


def test_only_the_submitter_or_an_admin_stops_cancels_or_prunes_a_job(room, tmp_path):
    sleeper = stand_in(tmp_path, "sleeper-sleap-nn", "import time\nprint('working', flush=True)\ntime.sleep(60)\n")
    data = tmp_path / "data"
    data.mkdir()
    (data / "config.yaml").write_text("trainer_config:\n  max_epochs: 1\n")
    signin = sign_in(room)
    worker_dir = tmp_path / "w"
    _, worker_id = room.start_worker("--mount", str(data), "--sleap-nn", str(sleeper), "--slots", "2", "--admin",
                                     signin["username"], "--allow-command", "echo=/bin/echo", working_dir=worker_dir)
    job_id = room.submit(data / "config.yaml")
    wait_until(lambda: state_of(worker_dir, job_id) == P.RUNNING, 30, "the job to run")
    finished = job_id_of(room.client("run", "--non-interactive", "echo", "--", "done").stdout)

    other = signed_in_home(room, tmp_path / "other-home", sign_in(room))  # another member
    for action in ("stop", "cancel"):
        refused = client_as(other, action, job_id)
        assert refused.returncode == 1 and "only the member who submitted it" in refused.stdout, refused.stdout
    # Nor does taking the submitter's peer id, once its client is gone, make it the owner.
    impostor = P.SignalingClient(room.ws_url, room.room_id, room.token, ledger(worker_dir, job_id)["submitter"],
                                 "client")
    impostor.connect()
    link = P.open_link(impostor, worker_id, tmp_path)
    try:
        link.send(*P.job_request_control(P.JOB_CANCEL, job_id))
        answer = link.expect(lambda m: isinstance(m, P.Message) and m.name == P.JOB_CONTROL, 15, "the refusal")
        assert answer.payload["ok"] is False and "only the member who submitted it" in answer.payload["message"]
    finally:
        link.close()
        impostor.close()
    assert state_of(worker_dir, job_id) == P.RUNNING
    pruned = client_as(other, "prune", "--older-than", "0s")
    assert pruned.returncode == 0, pruned.stderr
    assert (worker_dir / "jobs" / finished).is_dir() and not ledger(worker_dir, finished).get("pruned")

    admin = signed_in_home(room, tmp_path / "admin-home", signin)  # the sign-in the worker names --admin
    assert client_as(admin, "cancel", job_id).returncode == 0
    wait_until(lambda: state_of(worker_dir, job_id) == P.CANCELLED, 30, "the admin's cancel")
    assert client_as(admin, "prune", "--older-than", "0s").returncode == 0
    assert ledger(worker_dir, finished).get("pruned")



@pytest.mark.parametrize("offer, record, may", [
    ({"sender": "p1", P.FROM_USER: "ann"}, {"owner": "ann", "submitter": "p9"}, True),  # the owner, from anywhere
    ({"sender": "p1", P.FROM_USER: "bob"}, {"owner": "ann", "submitter": "p1"}, False),  # not by taking a peer id
    ({"sender": "p1", P.FROM_USER: "root"}, {"owner": "ann", "submitter": "p9"}, True),  # an admin
    ({"sender": "p1"}, {"owner": "", "submitter": "p1"}, True),  # no sign-in: the very peer that sent it
    ({"sender": "p1"}, {"owner": "ann", "submitter": "p1"}, False),  # a signed-in owner's job needs the sign-in
    ({"sender": "p2"}, {"owner": "", "submitter": "p1"}, False),
    ({"sender": "p1", P.FROM_USER: ""}, {"owner": "", "submitter": "p2"}, False),
])
def test_a_member_changes_only_its_own_jobs_unless_an_admin(offer, record, may):
    import worker as W

    member = W.Member.of(offer, admins={"root"})
    refusal = member.not_yours({"job_id": "j1", **record})
    assert (refusal is None) == may, refusal
    if not may:
        assert "only the member who submitted it" in refusal
    assert member.prune_scope() == ({"all": True} if member.admin else {"owner": member.user})
    assert bool(member.may_prune()) == (not member.user)  # a prune needs a sign-in
    assert member.sender == (f"user:{member.user}" if member.user else f"peer:{member.peer_id}")


def test_quit_goes_only_to_the_other_end_of_a_link(room, raw):
    a, b, c = raw(), raw(), raw()
    for peer, name in ((a, "a"), (b, "b"), (c, "c")):
        assert peer.register(name, room.room_id, room.token)["type"] == P.REGISTERED_AUTH
    reply = c.ask({"type": "quit", "sender": "c", "target": "b"})
    assert reply["code"] == P.NOT_LINKED
    a.send({"type": "offer", "sender": "a", "target": "b", "sdp": "v=0"})
    assert b.recv_type("offer")["sender"] == "a"
    b.send({"type": "answer", "sender": "b", "target": "a", "sdp": "v=0"})
    assert a.recv_type("answer")["sender"] == "b"
    b.send({"type": "quit", "sender": "b", "target": "a"})
    assert a.recv_type("quit") == {"type": "quit", "sender": "b", "target": "a"}
    assert c.ask({"type": "quit", "sender": "c", "target": "a"})["code"] == P.NOT_LINKED


def test_the_server_vouches_for_who_sent_an_offer(room, raw):
    _, signin = P.http_call("POST", room.http_url + "/anonymous-signin", {})
    signed, anonymous, target = raw(), raw(), raw()
    signed.ask({"type": "register", "peer_id": "signed", "room_id": room.room_id, "token": room.token,
                "id_token": signin["id_token"]})
    anonymous.register("anonymous", room.room_id, room.token)
    target.register("target", room.room_id, room.token)
    signed.send({"type": "peer_message", "from_peer_id": "signed", "to_peer_id": "target", "payload": 1,
                 "from_user": "someone-else"})
    assert target.recv_type("peer_message")["from_user"] == signin["username"]
    anonymous.send({"type": "offer", "sender": "anonymous", "target": "target", "sdp": "v=0",
                    "from_user": signin["username"]})  # a forged claim is dropped
    assert "from_user" not in target.recv_type("offer")


def test_a_member_posing_as_a_worker_crashes_no_ones_job_nor_writes_to_their_terminal(room):
    """Any member may register as a worker. One says its properties in the wrong types,
    with escape sequences, accepts every job with a queue position that is no number, and
    answers ledger questions with odd records, rows and escape sequences; another refuses
    every job with escape sequences for a reason and answers ledger questions with what is
    no list. The other members still list the room's workers, run their jobs on the real
    worker (which has more memory), and list and find those jobs."""
    _, worker_id = room.start_worker("--allow-command", "echo=/bin/echo", "--advertise-gpu-memory", "8000")
    escape = "\x1b]0;owned\x07\x1b[2J"
    odd = {"worker_name": f"lab{escape}", "status": {"a": 1}, "gpu_model": 5, "gpu_memory_mb": "lots",
           "queue_length": "many", "executor": "slurm", "max_concurrent_jobs": [2],
           "job_types": ["command:echo", P.TRAIN], "capabilities": [], "refusing": f"disk{escape}"}
    answers = {
        "aaa-posing": {
            P.APP_JOB_RESPONSE: {"accepted": True, "queue_position": "first", "estimated_start_time_sec": [1]},
            P.APP_JOBS_LIST: {"jobs": [{"job_id": "fake-1", "submitted_at": "yesterday", "type": escape,
                                        "state": escape, "duration_s": "long"}, {"job_id": "bad\n"}, 5],
                              "columns": [escape], "rows": [[escape], "x", [1, 2]], "error": escape}},
        "aab-refusing": {
            P.APP_JOB_RESPONSE: {"accepted": False, "reason": escape, "message": {"why": escape}},
            P.APP_JOBS_LIST: {"jobs": 5, "columns": 7, "rows": {"a": 1}, "error": {"a": 1}}},
    }
    replying_to = {P.APP_JOB_REQUEST: (P.APP_JOB_RESPONSE, "job_id"), P.APP_JOBS_QUERY: (P.APP_JOBS_LIST, "request_id")}
    stop, threads, posing = threading.Event(), [], []
    for peer_id, answer in answers.items():
        fake = room.signaling_client(peer_id, "worker", {"tags": ["sleap-rtc", *P.JOB_TYPE_TAGS.values()],
                                                         "properties": odd})

        def answer_every_question(fake=fake, answer=answer):
            while not stop.is_set():
                frame = fake.next(lambda f: f.get("type") == P.PEER_MESSAGE, timeout=0.2)
                asked = frame["payload"] if frame and isinstance(frame["payload"], dict) else {}
                if asked.get(P.APP_MESSAGE_TYPE) in replying_to:
                    kind, key = replying_to[asked[P.APP_MESSAGE_TYPE]]
                    fake.send_to_peer(frame["from_peer_id"], {P.APP_MESSAGE_TYPE: kind, key: asked.get(key),
                                                              **answer[kind]})

        posing.append(fake)
        threads.append(threading.Thread(target=answer_every_question, name=f"test-{peer_id}"))
        threads[-1].start()
    try:
        listed = room.client("workers")
        as_json = room.client("workers", "--json")
        ran = room.client("run", "--non-interactive", "echo", "--", "hi")
        job_id = re.search(r"job (\S+) accepted by", ran.stdout).group(1)
        jobs = room.client("jobs")
        jobs_json = room.client("jobs", "--json")
        query = room.client("jobs", "--sql", "SELECT job_id, state FROM jobs")
        status = room.client("status", job_id)
    finally:
        stop.set()
        for thread, fake in zip(threads, posing):
            thread.join()
            fake.close()
    everything = "".join(r.stdout + r.stderr for r in (listed, as_json, ran, jobs, jobs_json, query, status))
    assert "\x1b" not in everything and "\x07" not in everything
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line.split() for line in listed.stdout.splitlines()[1:] if "takes no new" not in line}
    assert rows["aaa-posing"][1:7] == ["lab?]0;owned??[2J", "?", "?", "?", "MB", "0"]
    assert rows[worker_id][4:6] == ["8000", "MB"]
    assert "aaa-posing takes no new jobs: disk?]0;owned??[2J" in listed.stdout
    shown = {w["peer_id"]: w for w in json.loads(as_json.stdout)["workers"]}
    assert {k: shown["aaa-posing"][k] for k in ("status", "gpu_model", "gpu_memory_mb", "queue_length")} == \
        {"status": None, "gpu_model": None, "gpu_memory_mb": None, "queue_length": 0}
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert f"accepted by {worker_id}" in ran.stdout and "hi" in ran.stdout.splitlines()
    assert "aaa-posing  ? MB  can start now" in ran.stderr
    assert "aab-refusing  ? MB  refused: ?]0;owned??[2J" in ran.stderr

    assert jobs.returncode == 0, jobs.stderr
    listed_jobs = {line.split()[0]: line.split() for line in jobs.stdout.splitlines()[1:]}
    assert set(listed_jobs) == {job_id, "fake-1"}
    assert listed_jobs[job_id][1:4] == [worker_id, P.COMMAND, P.COMPLETED]
    assert listed_jobs["fake-1"][1:4] == ["aaa-posing", "?]0;owned??[2J", "?]0;owned??[2J"]
    assert "error from aaa-posing: ?]0;owned??[2J" in jobs.stderr
    as_records = {j["job_id"]: j for j in json.loads(jobs_json.stdout)["jobs"]}
    assert as_records["fake-1"]["submitted_at"] is None and as_records[job_id]["state"] == P.COMPLETED
    assert query.returncode == 0, query.stderr
    assert any(line.split() == [worker_id, job_id, P.COMPLETED] for line in query.stdout.splitlines())
    assert "?]0;OWNED??[2J" in query.stdout.splitlines()[0]
    assert status.returncode == 0, status.stderr
    assert P.COMPLETED in status.stdout


# -- 8. the direct path dials only what the peer offered to ICE, and not often ---------------


def test_direct_hints_dial_only_ice_candidates_and_are_rate_limited(room, tmp_path):
    _, worker_id, _ = start(room, tmp_path, name="w")
    victims = []
    for host in ("127.0.0.1", "127.0.0.2"):
        listener = socket.create_server((host, 0))
        listener.settimeout(0.2)
        victims.append((listener, host, listener.getsockname()[1]))
    dialed = {host: 0 for _, host, _ in victims}
    stop = threading.Event()

    def count():
        while not stop.is_set():
            for listener, host, _ in victims:
                try:
                    conn, _ = listener.accept()
                    dialed[host] += 1
                    conn.close()
                except (TimeoutError, OSError):
                    pass

    counter = threading.Thread(target=count, name="test-victims")
    counter.start()
    signaling = room.signaling_client("scanner")
    link = P.open_link(signaling, worker_id, tmp_path)
    began = time.monotonic()
    try:
        hints = [[host, port] for _, host, port in victims]
        for i in range(30):
            link.send(P.FILE_BEGIN, {"transfer_id": f"s{i}", "name": f"x{i}.bin", "size": 10,
                                     "sha256": hashlib.sha256(str(i).encode()).hexdigest(), "store": True,
                                     "offset": 0, "direct": {"key": "0" * 64, "token": "1" * 64, "hints": hints}})
            link.send(P.FILE_ABORT, {"transfer_id": f"s{i}", "reason": "scan"})
        link.send(P.LINK_PING, {"seq": 1})
        link.expect(lambda m: isinstance(m, P.Message) and m.name == P.LINK_PONG, 10, "pong")
        time.sleep(2)
    finally:
        stop.set()
        counter.join()
        link.close()
        signaling.close()
        for listener, _, _ in victims:
            listener.close()
    assert dialed["127.0.0.2"] == 0, "the worker dialed an address the peer never offered to ICE"
    allowed = P.DIRECT_RACES_BURST + P.DIRECT_RACES_PER_S * (time.monotonic() - began) + 1
    assert 0 < dialed["127.0.0.1"] <= allowed < 30, dialed


# -- 9. no job reaches the internet on a member's say-so ------------------------------------


def test_jobs_that_would_reach_the_internet_are_refused(room, lab, tmp_path):
    start(room, lab["mount"], "--allow-command", "env=/usr/bin/env", name="w")
    base = lab["config"].read_text()
    cases = {
        "wandb.yaml": (base + "  use_wandb: true\n", "trainer_config.use_wandb: true would upload the run"),
        "convnext.yaml": (base.replace("    unet: {in_channels: 1, filters: 16, max_stride: 8, output_stride: 2}",
                                       "    convnext: {pre_trained_weights: ConvNeXt_Tiny_Weights}"),
                          "pre_trained_weights: 'ConvNeXt_Tiny_Weights' is downloaded from the internet"),
        "hub.yaml": (base.replace("    unet: {in_channels: 1, filters: 16, max_stride: 8, output_stride: 2}",
                                  "    pretrained: {model_name: facebook/dinov2-small}"),
                     "an external HuggingFace backbone is downloaded"),
    }
    for name, (text, why) in cases.items():
        config = lab["mount"] / name
        config.write_text(text)
        errors = rejected(room.client("train", "--config", str(config)))
        assert why in errors, (name, errors)
    seen = room.client("run", "--non-interactive", "env")  # a secret in a value is not passed on either
    assert seen.returncode == 0 and "PATH=" in seen.stdout
    assert "hunter2" not in seen.stdout and "DATABASE_URL" not in seen.stdout
    assert SECRET not in seen.stdout


# -- defence in depth: jobs as a user of their own ------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="--run-as needs a worker running as root, as CI's is")
def test_jobs_run_as_their_own_user_and_cannot_read_the_workers_files(room):
    base = Path(tempfile.mkdtemp(prefix="sleap-rtc-run-as-", dir="/tmp"))
    try:
        base.chmod(0o755)
        mount, worker_dir = base / "mount", base / "w"
        mount.mkdir()
        (mount / "root-only.txt").write_text(SECRET)
        (mount / "root-only.txt").chmod(0o600)
        _, worker_id = room.start_worker("--mount", str(mount), "--run-as", "nobody",
                                         "--allow-command", "id=/usr/bin/id", "--allow-command", "cat=/bin/cat",
                                         working_dir=worker_dir)
        who = room.client("run", "--non-interactive", "id", "--", "-un")
        assert who.returncode == 0 and "nobody" in who.stdout.splitlines(), who.stdout
        peek = room.client("run", "--non-interactive", "cat", "--", str(mount / "root-only.txt"))
        assert peek.returncode != 0 and "Permission denied" in peek.stdout + peek.stderr
        assert SECRET not in peek.stdout
        for own in ("jobs.sqlite", "worker-key"):
            assert stat.S_IMODE((worker_dir / own).stat().st_mode) == 0o600, own
    finally:
        shutil.rmtree(base, ignore_errors=True)
