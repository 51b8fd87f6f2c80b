"""A room member against the worker: secrets, paths outside the mounts, hostile configs
and paths, a rejected job's slot, and a client that loses its worker.

Real signaling server and worker processes; the hostile peer is the real client or, where
the command line cannot send the input, a peer built on protocol.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

import protocol as P
import worker as W
from conftest import job_id_of, ledger, stand_in, state_of, wait_until
from tiny_data import make_project

SECRET = "s3cr3t-do-not-print"


@pytest.fixture
def data(tmp_path):
    """The worker's mount with a config a stand-in accepts, and a directory outside it."""
    mount = tmp_path / "data"
    mount.mkdir()
    make_project(mount, frames=4)  # labels.slp: real labels, whose video the worker checks at acceptance
    (mount / "config.yaml").write_text("trainer_config:\n  max_epochs: 1\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "planted").write_text("not yours")
    return mount, outside


def start(room, mount: Path, *extra: str):
    """A worker with SECRET in its environment, mounting `mount`: (process, peer id, working dir)."""
    working_dir = room.tmp / "w"
    proc, peer_id = room.start_worker("--mount", str(mount), *extra, working_dir=working_dir, env={"SECRET": SECRET})
    return proc, peer_id, working_dir


def rejected(result, code: int = 1) -> str:
    """The errors of a rejected job; `code` 4 when the client found paths it could offer to fix."""
    assert result.returncode == code, result.stdout + result.stderr
    assert "was rejected by" in result.stderr, result.stderr
    return result.stderr


def test_resolvers_in_a_config_are_refused_and_no_secret_leaves(room, data):
    mount, _ = data
    worker, _, _ = start(room, mount)
    config = room.tmp / "leak.yaml"
    config.write_text('data_config:\n  train_labels_path: ["/nonexistent/${oc.env:SECRET}.slp"]\n'
                      "trainer_config:\n  run_name: ok-${trainer_config.max_epochs}\n")
    errors = rejected(room.client("train", "--config", str(config), "--upload"))
    assert "calls an OmegaConf resolver" in errors and "${oc.env:SECRET}" in errors
    assert SECRET not in errors and SECRET not in worker.output()
    assert not (room.tmp / "w" / "jobs").exists() or not any((room.tmp / "w" / "jobs").iterdir())


def test_paths_inside_a_config_must_stay_inside_the_mounts(room, data):
    mount, outside = data
    start(room, mount)
    config = mount / "escape.yaml"
    config.write_text(f"trainer_config:\n  ckpt_dir: {outside}\n")
    errors = rejected(room.client("train", "--config", str(config)))
    assert f"trainer_config.ckpt_dir: Access denied: {outside} is outside the worker's mounts" in errors
    config.write_text("trainer_config:\n  ckpt_dir: ../../../../../../../../tmp\n")
    assert "trainer_config.ckpt_dir: Access denied" in rejected(room.client("train", "--config", str(config)))
    config.write_text(f"data_config:\n  val_labels_path: [{outside / 'planted'}]\n")
    assert "data_config.val_labels_path: Access denied" in rejected(room.client("train", "--config", str(config)), 4)
    config.write_text("defaults: [other]\n")
    assert "the top-level key 'defaults'" in rejected(room.client("train", "--config", str(config)))


def test_fetch_serves_nothing_that_now_leads_out_of_the_mounts(room, data, tmp_path):
    mount, outside = data
    body = """import os, sys
args = dict(a[2:].split('=', 1) for a in sys.argv if a.startswith('++'))
model = os.path.join(args['trainer_config.ckpt_dir'].strip("'"), args['trainer_config.run_name'].strip("'"))
os.makedirs(model)
open(os.path.join(model, 'training_config.yaml'), 'w').write('{}')
open(os.path.join(model, 'best.ckpt'), 'w').write('weights')
"""
    _, _, worker_dir = start(room, mount, "--sleap-nn", str(stand_in(tmp_path, "saves-sleap-nn", body)))
    job_id = room.submit(mount / "config.yaml")
    wait_until(lambda: state_of(worker_dir, job_id) == P.COMPLETED, 30, "the job to complete")
    model = Path(next(o for o in ledger(worker_dir, job_id)["outputs"] if o["kind"] == "model")["path"])
    (model / "best.ckpt").unlink()
    os.symlink(outside / "planted", model / "best.ckpt")  # planted after the job ended
    fetched = room.client("fetch", job_id, "--download", str(tmp_path / "got"))
    assert fetched.returncode == 1
    assert "is not served: Access denied" in fetched.stderr, fetched.stderr
    assert not any("not yours" in f.read_text() for f in (tmp_path / "got").rglob("*") if f.is_file())


def test_hydra_overrides_keep_every_character_of_a_path_literal(tmp_path):
    """Our quoting, parsed by Hydra's own override parser and resolved by OmegaConf."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    os.environ["SECRET"] = SECRET
    parser = OverridesParser.create()
    for name in ("/d/${oc.env:SECRET}.slp", "/d/a=b,c d.slp", "/d/it's.slp", "/d/back\\slash.slp",
                 "/d/$${x}.slp", "/d/${a.b}.slp", "/d/ünï.slp", "/d/trailing\\", "/d/a\\${oc.env:SECRET}",
                 "/d/q\\'q", "/d/\\\\${x}"):
        config = OmegaConf.create({})
        ConfigLoaderImpl._apply_overrides_to_config([parser.parse_override(f"++key={W.hydra_value(name)}")], config)
        assert OmegaConf.to_container(config, resolve=True)["key"] == name


@pytest.mark.slow
def test_a_file_named_like_an_interpolation_trains_as_itself(room, tmp_path):
    project = make_project(tmp_path / "project", frames=12, epochs=1, steps=2)
    hostile = project["labels"].parent / "${oc.env:SECRET}.slp"
    shutil.copy(project["labels"], hostile)
    worker, _, _ = start(room, project["labels"].parent)
    result = room.client("train", "--config", str(project["config"]), "--labels", str(hostile), "--max-epochs", "1")
    assert result.returncode == 0, result.stdout + result.stderr  # it found the file under its literal name
    log = room.tmp / "sleap-rtc-jobs" / job_id_of(result.stdout) / "job.log"
    assert SECRET not in log.read_text() + result.stdout + result.stderr + worker.output()


@pytest.mark.slow
def test_queued_jobs_run_with_the_paths_resolved_at_acceptance(room, data, tmp_path):
    mount, outside = data
    gate = tmp_path / "gate"
    gated = stand_in(tmp_path, "gated-sleap-nn", f"import os, time\nprint('working', flush=True)\n"
                     f"while not os.path.exists({str(gate)!r}):\n    time.sleep(0.05)\n")
    _, _, worker_dir = start(room, mount, "--sleap-nn", str(gated))
    link, real = mount / "link.slp", mount / "real.slp"
    os.symlink(mount / "labels.slp", link)
    shutil.copy(mount / "labels.slp", real)

    config = mount / "config.yaml"
    first = room.submit(config)
    through_link, direct = room.submit(config, "--labels", str(link)), room.submit(config, "--labels", str(real))
    # Before they start, the link is pointed outside and the file is replaced by such a link.
    link.unlink()
    os.symlink(outside / "planted", link)
    real.unlink()
    os.symlink(outside / "planted", real)
    gate.touch()
    wait_until(lambda: state_of(worker_dir, direct) in (P.FAILED, P.COMPLETED), 30, "the queued jobs to end")
    ran = ledger(worker_dir, through_link)
    assert ran["state"] == P.COMPLETED
    assert any(str(mount / "labels.slp") in arg for arg in json.loads(ran["command"]))  # the target at acceptance
    assert not any(str(outside) in arg for arg in json.loads(ran["command"]))
    refused = ledger(worker_dir, direct)
    assert refused["state"] == P.FAILED and refused["started_at"] is None
    assert "changed after the job was accepted" in refused["error"] or "now leads to" in refused["error"], refused
    assert state_of(worker_dir, first) == P.COMPLETED


def test_a_config_bomb_and_a_huge_config_are_refused_at_once(tmp_path):
    mount = W.Mount(tmp_path, "t")
    bomb = tmp_path / "bomb.yaml"
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    bomb.write_text("\n".join(lines) + "\n")
    assert bomb.stat().st_size < 1000
    huge = tmp_path / "huge.yaml"
    huge.write_text("trainer_config:\n" + "".join(f"  k{i}: {'v' * 90}\n" for i in range(20_000)))
    for path, expected in ((bomb, "expands to more than"), (huge, "larger than 1024 KiB")):
        started = time.monotonic()
        errors, _ = W.validate_job({"type": P.TRAIN, "config": str(path)}, [mount], [mount], tmp_path / "job")
        assert time.monotonic() - started < 2.0
        assert [e["code"] for e in errors] == ["BAD_CONFIG"] and expected in errors[0]["message"], errors


def hostile_link(room, worker_id: str, tmp_path: Path):
    signaling = room.signaling_client("hostile")
    return signaling, P.open_link(signaling, worker_id, tmp_path)


def test_hostile_paths_are_field_errors_and_the_link_stays_up(room, data, tmp_path):
    mount, _ = data
    _, worker_id, _ = start(room, mount)
    signaling, link = hostile_link(room, worker_id, tmp_path)
    try:
        spec = {"type": P.TRAIN, "config": str(mount / "config.yaml") + "\x00.yaml",
                "labels": "/" + "/".join(["d"] * 3000), "val_labels": "~nosuchuser/x.slp",
                "resume": str(mount) + "/${oc.env:SECRET}"}
        link.send(P.JOB_SUBMIT, {"job_id": "hostile-1", "spec": spec})
        reply = link.expect(lambda m: m.name == P.JOB_REJECTED, 10, "rejection")
        by_field = {e["field"]: e for e in reply.payload["errors"]}
        assert set(by_field) == {"config", "labels", "val_labels", "resume"}, by_field
        assert "NUL byte" in by_field["config"]["message"]
        assert by_field["labels"]["code"] == "BAD_PATH"
        assert by_field["val_labels"]["code"] == "BAD_PATH"
        assert by_field["resume"]["code"] == "NOT_FOUND" and "${oc.env:SECRET}" in by_field["resume"]["message"]
        assert SECRET not in str(reply.payload)
        link.send(P.FILE_REQUEST, {"path": "/etc/passwd\x00"})
        with pytest.raises(P.PeerError, match="NUL byte"):
            link.expect(lambda m: False, 10, "refusal")
        # A pong answers with the ping's seq alone: the worker echoes nothing else a member sends.
        link.send(P.LINK_PING, {"seq": 7, "echo": "x" * 100_000})
        assert link.expect(lambda m: m.name == P.LINK_PONG, 10, "pong").payload == {"seq": 7}
    finally:
        link.close()
        signaling.close()



def test_a_members_odd_fields_get_the_workers_own_words_and_short_echoes(room, data, tmp_path):
    """Over signaling and over the link, a request whose fields hold the wrong types or
    100 kB of text is answered (not a traceback in the log, which the fixture checks),
    with the worker's own words and at most 64 characters of any id it echoes."""
    mount, _ = data
    _, worker_id, _ = start(room, mount)
    big = "q" * 100_000

    def answer(peer, kind: str) -> dict:
        frame = peer.next(lambda f: f.get("type") == P.PEER_MESSAGE
                          and (f.get("payload") or {}).get(P.APP_MESSAGE_TYPE) == kind, timeout=15)
        assert frame is not None, f"no {kind}"
        return frame["payload"]

    peer = room.signaling_client("oddfields")
    try:
        peer.send_to_peer(worker_id, {P.APP_MESSAGE_TYPE: P.APP_JOB_REQUEST, "job_id": {"k": big},
                                      "job_type": [P.TRAIN], "capability": {"k": 1}})
        response = answer(peer, P.APP_JOB_RESPONSE)
        assert (response["accepted"], response["reason"]) == (False, "incompatible"), response
        assert len(response["job_id"]) <= 64 and len(response["message"]) < 500
        peer.send_to_peer(worker_id, {P.APP_MESSAGE_TYPE: P.APP_JOBS_QUERY, "request_id": big, "state": big})
        listing = answer(peer, P.APP_JOBS_LIST)
        assert listing["request_id"] == big[:64] and listing["error"].startswith("unknown state")
        assert len(listing["error"]) < 500
    finally:
        peer.close()
    signaling, link = hostile_link(room, worker_id, tmp_path)
    try:
        link.send(P.FS_LIST, {"request_id": big, "path": ["/"]})
        files = link.expect(lambda m: m.name == P.FS_LISTING, 10, "the listing").payload
        assert files["request_id"] == big[:64] and "expected a path" in files["error"]
        link.send(P.UPLOAD_QUERY, {"sha256": big, "size": 3, "name": "x.slp"})
        status = link.expect(lambda m: m.name == P.UPLOAD_STATUS, 10, "the upload status").payload
        assert status["sha256"] == big[:64] and "UPLOAD_QUERY needs" in status["error"]
        link.send(P.STORE_LIST, {"request_id": {"k": big}})
        store = link.expect(lambda m: m.name == P.STORE_LISTING, 10, "the store listing").payload
        assert len(store["request_id"]) <= 64 and store["files"] == []
    finally:
        link.close()
        signaling.close()

def test_a_rejected_job_frees_its_slot_at_once(room, data, tmp_path):
    mount, _ = data
    quick = stand_in(tmp_path, "quick-sleap-nn", "print('ok')\n")
    start(room, mount, "--sleap-nn", str(quick))
    assert rejected(room.client("train", "--config", str(mount / "missing.yaml")), 4)
    began = time.monotonic()
    result = room.client("train", "--config", str(mount / "config.yaml"), "--detach")
    assert result.returncode == 0, result.stderr
    assert "starting now" in result.stdout, result.stdout  # not "queued at position 1" behind a ghost
    assert time.monotonic() - began < 10


def a_client_following_a_sleeper(room, mount: Path, tmp_path: Path):
    """A worker whose sleap-nn sleeps, and a `client.py train` following its job once it
    started: (worker, its working dir, the client, the job id)."""
    sleeper = stand_in(tmp_path, "sleeper-sleap-nn", "import time\nprint('working', flush=True)\ntime.sleep(60)\n")
    worker, _, worker_dir = start(room, mount, "--sleap-nn", str(sleeper))
    follower = room.start_client("train", "--config", str(mount / "config.yaml"))
    job_id = follower.wait_for(r"job (\S+) accepted", timeout=60).group(1)
    follower.wait_for(r"started on", timeout=30)
    return worker, worker_dir, follower, job_id


@pytest.mark.slow
def test_a_client_following_a_job_hears_it_cancelled_when_the_worker_stops(room, data, tmp_path):
    """SIGTERM cancels the running job; the client following it hears why before its link closes."""
    worker, worker_dir, follower, job_id = a_client_following_a_sleeper(room, data[0], tmp_path)
    worker.popen.send_signal(signal.SIGTERM)
    assert worker.popen.wait(timeout=60) == 0
    assert follower.popen.wait(timeout=30) == 1
    out = follower.output()
    assert f"job {job_id} cancelled" in out and "error: the worker was stopped" in out, out
    assert state_of(worker_dir, job_id) == P.CANCELLED


@pytest.mark.slow
def test_a_client_that_loses_its_worker_says_so_without_a_traceback(room, data, tmp_path):
    worker, _, follower, job_id = a_client_following_a_sleeper(room, data[0], tmp_path)
    worker.kill()
    assert follower.popen.wait(timeout=20) == 1
    out = follower.output()
    assert "Traceback" not in out, out
    assert "lost the link" in out and f"python client.py status {job_id}" in out, out


def test_file_transfers_do_not_need_a_free_slot(room, data, tmp_path):
    mount, _ = data
    sleeper = stand_in(tmp_path, "sleeper-sleap-nn", "import time\ntime.sleep(20)\n")
    _, _, worker_dir = start(room, mount, "--sleap-nn", str(sleeper))
    job_id = room.submit(mount / "config.yaml")
    wait_until(lambda: state_of(worker_dir, job_id) == P.RUNNING, 30, "the job to run")
    upload = room.client("upload", str(mount / "labels.slp"))
    assert upload.returncode == 0, upload.stderr
    assert [f.read_bytes() for f in (worker_dir / "uploads").glob("*/labels.slp")] == [(mount / "labels.slp").read_bytes()]
    room.client("cancel", job_id)


def test_odd_app_messages_over_signaling_are_ignored_without_a_trace(room, tmp_path):
    """A member sends peer messages whose app type is a list, a dict, a number or missing:
    the worker ignores each (no traceback in its log, which the fixture checks) and still
    answers a proper query right after."""
    _, worker_id = room.start_worker("--mount", str(tmp_path))
    signaling = room.signaling_client("oddball")
    try:
        for odd in (["job_request"], {"a": 1}, 7, None):
            signaling.send_to_peer(worker_id, {P.APP_MESSAGE_TYPE: odd, "job_id": "j1"})
        signaling.send_to_peer(worker_id, [P.APP_JOBS_QUERY])
        signaling.send_to_peer(worker_id, P.app_jobs_query("q1", state=P.COMPLETED))
        answer = signaling.next(lambda f: f.get("type") == P.PEER_MESSAGE
                                and (f.get("payload") or {}).get("request_id") == "q1", timeout=15)
    finally:
        signaling.close()
    assert answer is not None and answer["payload"]["jobs"] == []
