"""Unmodified sleap-rtc 0.0.7 programs (its CLI, Python API and worker) against our
signaling server and worker: real processes, loopback WebRTC, the real sleap-nn."""

from __future__ import annotations

import json
import re
import socket
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from conftest import PY, ROOT, ledger, sha256, wait_until
from tiny_data import make_project
from upstream_world import SLEAP_RTC, LoopbackStun, upstream_env

import protocol as P
import upstream as U


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return make_project(tmp_path_factory.mktemp("project"), frames=16, epochs=2, steps=4)


@pytest.fixture
def lab(world, project):
    """Our server (handing out a loopback STUN server), a room and one of our workers
    whose mount holds the tiny project, plus what upstream programs need to reach them."""
    assert SLEAP_RTC.exists(), "sleap-rtc 0.0.7 is not installed: pip install -r requirements-dev.txt"
    world.stun = LoopbackStun()
    world.start_server("--ice-server", world.stun.url)
    world.create_room()
    world.worker_dir = world.tmp / "w"
    world.worker, world.worker_id = world.start_worker("--mount", f"{project['config'].parent}:data",
                                                       working_dir=world.worker_dir)
    world.session_string = re.search(r"--session-string (\S+)", world.worker.output()).group(1)
    world.project = project
    yield world
    world.stun.close()


def login(lab, name: str, *room: str) -> dict:
    """`client.py login --sleap-rtc-credentials` in a HOME of its own: that HOME's
    environment for upstream programs."""
    home = lab.tmp / name
    home.mkdir()
    result = subprocess.run([PY, str(ROOT / "client.py"), "login", "--sleap-rtc-credentials", *room],
                            env={**lab.peer_env(), "HOME": str(home)}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return upstream_env(lab, home)


def upstream(env: dict, *args: str, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    """An upstream CLI command to its end. It asks to confirm the job's paths whatever
    its flags say; the answer `s` (submit) waits on its standard input."""
    return subprocess.run([str(SLEAP_RTC), *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, input="s\n")


def jobs_of(working_dir: Path) -> list[dict]:
    with sqlite3.connect(working_dir / "jobs.sqlite") as db:
        ids = [row[0] for row in db.execute("SELECT job_id FROM jobs ORDER BY submitted_at")]
    return [ledger(working_dir, job_id) for job_id in ids]


@pytest.mark.slow
def test_session_string_train_then_track_with_the_upstream_cli(lab, tmp_path):
    env = login(lab, "laptop")
    out = tmp_path / "cli"
    out.mkdir()
    result = upstream(env, "train", "--session-string", lab.session_string, "--config", str(lab.project["config"]),
                      "--labels", str(lab.project["labels"]), "--max-epochs", "2", "--non-interactive", cwd=out)
    text = result.stdout + result.stderr
    assert result.returncode == 0, text
    assert "Completed Successfully" in text, text
    [job] = jobs_of(lab.worker_dir)
    assert job["state"] == P.COMPLETED and job["submitter"].startswith("anon-"), job
    model = Path(job["outputs"][0]["path"])
    assert (model / "best.ckpt").is_file()
    assert "sitecustomize: WebRTC host candidates on 127.0.0.1 only" in text
    assert lab.stun.requests > 0  # the CLI gathered through the loopback STUN server our server handed out
    assert "sitecustomize: ICE servers" not in text  # and was handed no other

    # A laptop that signed in to upstream's own service before holds a key pair and
    # answers the challenge with an Ed25519 signature, which is not the room secret's HMAC.
    from sleap_rtc.auth.keypair import generate_keypair, private_key_to_b64

    credentials_file = Path(env["HOME"]) / ".sleap-rtc" / "credentials.json"
    credentials = json.loads(credentials_file.read_text())
    credentials["private_key"] = private_key_to_b64(generate_keypair()[0])
    credentials_file.write_text(json.dumps(credentials))
    result = upstream(env, "track", "--session-string", lab.session_string, "--data-path", str(lab.project["labels"]),
                      "--model-paths", str(model), cwd=out)
    text = result.stdout + result.stderr
    assert result.returncode == 0, text
    assert "Sent Ed25519 AUTH_RESPONSE" in text, text
    track = jobs_of(lab.worker_dir)[-1]
    assert track["state"] == P.COMPLETED, track
    predictions = Path(track["outputs"][0]["path"])
    received = out / predictions.name
    assert received.is_file(), text
    assert sha256(received) == sha256(predictions)

    # A job the worker refuses: the CLI hears why, and is let go.
    result = upstream(env, "train", "--session-string", lab.session_string, "--config", str(lab.project["config"]),
                      "--labels", "/etc/passwd", "--non-interactive", cwd=out, timeout=60)
    text = result.stdout + result.stderr
    assert "'field': 'labels'" in text and "/etc/passwd" in text and "outside" in text, text
    assert len(jobs_of(lab.worker_dir)) == 2


@pytest.mark.slow
def test_room_and_worker_id_with_two_models_and_the_room_secret(lab, tmp_path):
    strict_dir = lab.tmp / "strict"
    strict_worker, strict = lab.start_worker("--mount", f"{lab.project['config'].parent}:data", "--require-room-secret",
                                 working_dir=strict_dir)
    env = login(lab, "laptop", "--room", lab.room_id, f"--token={lab.token}")  # stores the room secret too
    second = lab.project["config"].with_name("second.yaml")
    second.write_text(lab.project["config"].read_text())
    result = upstream(env, "train", "--room", lab.room_id, "--worker-id", strict, "--config",
                      str(lab.project["config"]), "--config", str(second), "--max-epochs", "1", "--non-interactive",
                      cwd=tmp_path)
    text = result.stdout + result.stderr
    assert result.returncode == 0, text
    assert "P2P authentication successful" in text and "Training model 2/2" in text, text
    [job] = jobs_of(strict_dir)
    assert job["state"] == P.COMPLETED, job
    assert [step["name"] for step in job["steps"]] == ["config", "second"]
    models = [Path(o["path"]) for o in job["outputs"]]
    assert len(models) == 2 and all((m / "best.ckpt").is_file() for m in models)
    # Our own client lists the job like any other.
    listed = lab.client("jobs")
    assert job["job_id"] in listed.stdout, listed.stdout + listed.stderr
    # Without the room secret, that worker refuses the job and lets the client go.
    session = re.search(r"--session-string (\S+)", strict_worker.output()).group(1)
    result = upstream(login(lab, "stranger"), "train", "--session-string", session, "--config",
                      str(lab.project["config"]), "--non-interactive", cwd=tmp_path, timeout=60)
    text = result.stdout + result.stderr
    assert "authentication failed: this worker requires the room secret" in text, text
    assert len(jobs_of(strict_dir)) == 1


API_TRAINING = """
import json, sys
from sleap_rtc import api

room, worker, config, labels = sys.argv[1:5]
listed = [w.id for w in api.list_workers(room)]
reports, send, stopped = [], [], []

def on_raw_progress(payload):
    reports.append(json.loads(payload))
    ended = [r for r in reports if r.get("event") == "epoch_end"]
    if len(ended) >= 2 and send and not stopped:
        send[0]('CONTROL_COMMAND::{"command": "stop"}')
        stopped.append(len(ended))

inference = []  # the SLEAP GUI passes this, and then waits for the end of inference after training
result = api.run_training(config_path=config, room_id=room, worker_id=worker, max_epochs=500,
                          on_raw_progress=on_raw_progress, on_channel_ready=send.append, timeout=300,
                          on_inference_message=lambda kind, data: inference.append(kind))
predicted = api.run_inference(data_path=labels, model_paths=[result.model_path], room_id=room, worker_id=worker)
print(json.dumps({"listed": listed, "success": result.success, "job_id": result.job_id,
                  "model_path": result.model_path, "events": [r.get("event") for r in reports],
                  "stopped_after": stopped, "inference": inference, "predictions": predicted.predictions_path,
                  "predicted": predicted.success}))
"""


@pytest.mark.slow
def test_python_api_lists_trains_stops_early_and_tracks(lab, tmp_path):
    env = login(lab, "gui", "--room", lab.room_id, f"--token={lab.token}")
    result = subprocess.run([PY, "-c", API_TRAINING, lab.room_id, lab.worker_id, str(lab.project["config"]),
                             str(lab.project["labels"])],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    # The API asks aiortc for its default, Google's STUN server; the test's guard took it away.
    assert "sitecustomize: ICE servers default (Google STUN) not used" in result.stderr, result.stderr
    assert outcome["listed"] == [lab.worker_id]
    assert outcome["success"] is True
    assert outcome["events"][0] == "train_begin" and "epoch_end" in outcome["events"]
    assert outcome["stopped_after"] == [2] and outcome["inference"] == ["INFERENCE_SKIPPED"]
    job = ledger(lab.worker_dir, outcome["job_id"])
    assert job["state"] == P.COMPLETED and job["stopped_early"] == 1, job
    epochs = [e for e in outcome["events"] if e == "epoch_end"]
    assert len(epochs) < 10  # far short of the 500 asked for
    assert Path(outcome["model_path"], "best.ckpt").is_file()
    assert outcome["predicted"] is True and Path(outcome["predictions"]).is_file()
    assert jobs_of(lab.worker_dir)[-1]["outputs"][0]["path"] == outcome["predictions"]


@pytest.mark.slow
def test_upstream_worker_registers_with_a_room_key_and_a_wrong_key_is_refused(lab):
    from conftest import Proc

    env = login(lab, "gpu-box", "--room", lab.room_id, f"--token={lab.token}")
    credentials = json.loads((Path(env["HOME"]) / ".sleap-rtc" / "credentials.json").read_text())
    key = credentials["tokens"][lab.room_id]["api_key"]

    def start(name: str, account_key: str) -> Proc:
        proc = Proc([str(SLEAP_RTC), "worker", "--room", lab.room_id, "--account-key", account_key],
                    lab.tmp / f"{name}.log", env, lab.tmp)
        lab.procs.append(proc)
        return proc

    good = start("upstream-worker", key)
    wait_until(lambda: "worker-" + key[4:12] in lab.client("workers").stdout, 60, "the upstream worker listed")
    bad = start("upstream-worker-bad", "slp_" + "0" * 48)
    bad.wait_for(r"is not a worker key of room", timeout=60)
    listed = lab.client("workers").stdout
    assert "worker-" + key[4:12] in listed and "worker-00000000" not in listed, listed
    assert good.popen.poll() is None, good.output()


# -- the signaling server admits upstream registrations, and refuses the rest -------------


def sign_in(room) -> tuple[str, str]:
    status, body = P.http_call("POST", room.http_url + "/anonymous-signin", {})
    assert status == 200
    return body["id_token"], body["username"]


def test_id_token_is_a_standard_signed_jwt(room):
    import jwt as pyjwt  # what sleap-rtc 0.0.7 reads it with

    id_token, username = sign_in(room)
    claims = pyjwt.decode(id_token, options={"verify_signature": False})
    assert claims["sub"] == claims["username"] == username and claims["exp"] > time.time() + 86400
    assert pyjwt.get_unverified_header(id_token)["alg"] == "HS256"


def test_jwt_registration_needs_a_member_and_a_jwt_this_server_signed(room, raw):
    import jwt as pyjwt

    id_token, username = sign_in(room)

    def register(peer_id: str, **credentials) -> dict:
        return raw().ask({"type": "register", "peer_id": peer_id, "room_id": room.room_id, "role": "client",
                          **credentials})

    refused = register("a", jwt=id_token, token="")  # the upstream CLI sends an empty token with --room
    assert refused["code"] == P.NOT_A_MEMBER and refused["reason"] == refused["message"]
    assert "has not joined room" in refused["reason"]
    # Joining takes the room's token once.
    status, body = P.http_call("POST", room.http_url + "/join-room", {"room_id": room.room_id, "token": "wrong"},
                               bearer=id_token)
    assert status == 403 and "wrong token" in body["error"]
    status, _ = P.http_call("POST", room.http_url + "/join-room", {"room_id": room.room_id, "token": room.token})
    assert status == 401  # and a signed-in user
    status, _ = P.http_call("POST", room.http_url + "/join-room", {"room_id": room.room_id, "token": room.token},
                            bearer=id_token)
    assert status == 200
    registered = register("b", jwt=id_token)
    assert registered["type"] == P.REGISTERED_AUTH and "token" not in registered
    # A jwt with changed claims, one signed with another key, one with alg none, one expired.
    header, claims, signature = id_token.split(".")
    other = pyjwt.decode(id_token, options={"verify_signature": False})
    forged = ".".join([header, pyjwt.encode({**other, "sub": "someone-else"}, "k" * 32).split(".")[1], signature])
    for bad in (forged, pyjwt.encode(other, "not-the-server-key" * 2, algorithm="HS256"),
                pyjwt.encode(other, None, algorithm="none"), "x.y.z", "nonsense"):
        refused = register("c", jwt=bad)
        assert refused["code"] == P.INVALID_TOKEN and "not signed by this server" in refused["reason"], bad
    refused = register("d")
    assert refused["code"] == P.INVALID_MESSAGE and "needs the room's 'token'" in refused["reason"]


def test_an_expired_jwt_is_refused():
    from signaling import SignalingServer

    server = SignalingServer()
    good, username = server.directory.issue_id_token()
    assert server.directory.check_id_token(good) == username
    header = good.split(".")[0]
    claims = P.b64url(json.dumps({"sub": username, "exp": int(time.time()) - 1}).encode())
    assert server.directory.check_id_token(f"{header}.{claims}.{server.directory._sign(f'{header}.{claims}')}") is None


def test_room_creator_enters_with_its_jwt_and_workers_with_a_room_key(world, raw):
    world.start_server()
    id_token, username = sign_in(world)
    room = P.create_room(world.http_url, id_token)
    world.room_id, world.token = room["room_id"], room["token"]
    frame = {"type": "register", "room_id": room["room_id"]}
    assert raw().ask({**frame, "peer_id": "owner", "jwt": id_token})["type"] == P.REGISTERED_AUTH
    status, body = P.http_call("POST", world.http_url + "/create-api-key", {"room_id": room["room_id"], "token": "no"})
    assert status == 403
    status, body = P.http_call("POST", world.http_url + "/create-api-key",
                               {"room_id": room["room_id"], "token": room["token"]})
    assert status == 200 and body["api_key"].startswith("slp_")
    worker = {**frame, "role": "worker", "is_admin": True}
    assert raw().ask({**worker, "peer_id": "w1", "api_key": body["api_key"]})["type"] == P.REGISTERED_AUTH
    refused = raw().ask({**worker, "peer_id": "w2", "api_key": "slp_" + "0" * 48})
    assert refused["code"] == P.INVALID_TOKEN and "not a worker key of room" in refused["reason"]
    refused = raw().ask({**worker, "peer_id": "w3", "api_key": room["token"][:-1]})
    assert refused["code"] == P.INVALID_TOKEN


def test_delete_peer_removes_only_what_the_caller_may(room, raw):
    id_token, username = sign_in(room)
    P.http_call("POST", room.http_url + "/join-room", {"room_id": room.room_id, "token": room.token}, bearer=id_token)
    peer = raw()
    peer.register(username, room.room_id, room.token)  # entered with the token: no user of its own
    other = raw()
    assert other.ask({"type": "register", "peer_id": "mine", "room_id": room.room_id, "jwt": id_token})["type"] \
        == P.REGISTERED_AUTH
    delete = room.http_url + "/delete-peer"
    status, body = P.http_call("POST", delete, {"peer_id": username, "token": room.token})
    assert status == 403 and "Bearer" in body["error"]  # the room's token makes a member, not an owner
    status, body = P.http_call("POST", delete, {"peer_id": username}, bearer=id_token)
    assert status == 403 and "may delete it" in body["error"]  # the user is not that peer's
    status, body = P.http_call("POST", delete, {"peer_id": "mine"}, bearer=id_token)
    assert status == 200 and body["deleted"] is True
    status, body = P.http_call("POST", delete, {"peer_id": username}, bearer=room.owner_id_token)
    assert status == 200 and body["deleted"] is True  # the room's creator may
    status, body = P.http_call("POST", delete, {"peer_id": "gone"}, bearer=id_token)
    assert status == 200 and body["deleted"] is False and "no peer" in body["reason"]


# -- the codec ----------------------------------------------------------------------------


def test_upstream_specs_map_onto_ours():
    from sleap_rtc.jobs.spec import TrackJobSpec, TrainJobSpec  # the real upstream classes

    spec = TrainJobSpec(config_paths=["/d/a.yaml", "/d/b.yaml"], labels_path="C:/lab/l.slp", max_epochs=3,
                        resume_ckpt_path="/d/m/best.ckpt", model_types=["centroid", "centered_instance"],
                        path_mappings={"C:/lab/l.slp": "/d/l.slp", "C:/lab/v.mp4": "/d/v.mp4"})
    submit = U.parse_upstream_submit(f"JOB_SUBMIT::c1::{spec.to_json()}")
    assert submit.client_id == "c1" and submit.errors == []
    assert [s["config"] for s in submit.specs] == ["/d/a.yaml", "/d/b.yaml"]
    assert [s["run_name"] for s in submit.specs] == ["centroid", "centered_instance"]
    assert submit.specs[0]["labels"] == "/d/l.slp" and submit.specs[0]["resume"] == "/d/m/best.ckpt"
    assert submit.specs[0]["path_map"] == [["C:/lab/v.mp4", "/d/v.mp4"]]
    inline = U.parse_upstream_submit(f"JOB_SUBMIT::c2::{TrainJobSpec(config_content='a: 1').to_json()}")
    assert inline.contents == ["a: 1"] and inline.errors == []
    track = TrackJobSpec(data_path="/d/v.mp4", model_paths=["/d/m"], output_path="p.slp", peak_threshold=0.3)
    assert U.parse_upstream_submit(f"JOB_SUBMIT::c3::{track.to_json()}").specs == [
        {"type": "track", "data_path": "/d/v.mp4", "model_paths": ["/d/m"], "output": "p.slp", "peak_threshold": 0.3}]
    odd = U.parse_upstream_submit('JOB_SUBMIT::c9::{"type": "track", "data_path": "/d/v.mp4", '
                                  '"model_paths": ["/d/m"], "frame_filter": "0-10"}')
    assert [e["field"] for e in odd.errors] == ["frame_filter"]
    for text, field in (("JOB_SUBMIT::c4::{nope", "spec"), ("JOB_SUBMIT::c5", "spec"),
                        ('JOB_SUBMIT::c6::{"type": "rm -rf"}', "type"),
                        ('JOB_SUBMIT::c7::{"type": "train", "config_path": "/a.yaml", "max_epochs": "many"}',
                         "max_epochs"),
                        ('JOB_SUBMIT::c8::{"type": "train"}', "config_paths")):
        assert [e["field"] for e in U.parse_upstream_submit(text).errors] == [field], text


def test_session_string_room_secret_and_controls_match_upstream():
    import base64

    from sleap_rtc.auth.psk import compute_hmac, generate_nonce

    text = U.upstream_session_string("r1", "tok", "w1")
    assert text.startswith("sleap-session:")
    assert json.loads(base64.urlsafe_b64decode(text[len("sleap-session:"):])) == {"r": "r1", "t": "tok", "p": "w1"}
    secret, nonce = U.upstream_room_secret("tok"), generate_nonce()
    assert U.upstream_auth_ok(secret, nonce, compute_hmac(secret, nonce))
    assert not U.upstream_auth_ok(secret, nonce, compute_hmac(U.upstream_room_secret("other"), nonce))
    assert not U.upstream_auth_ok(secret, nonce, "missing") and not U.upstream_auth_ok(secret, nonce, "é")
    assert U.upstream_control('CONTROL_COMMAND::{"command": "stop"}') == P.ZMQ_CTRL
    assert U.upstream_control("JOB_STOP") == U.upstream_control("ZMQ_CTRL::STOP") == P.ZMQ_CTRL
    assert U.upstream_control("JOB_CANCEL") == P.JOB_CANCEL
    assert U.upstream_control("CONTROL_COMMAND::[1]") is None and U.upstream_control("JOB_STOPPED") is None
    assert U.upstream_log([["o", "a"], ["e", "b"]], "50%") == ["a\n[stderr] b\n", "CR::50%"]
    assert U.upstream_file_meta("x:y.slp", 5) == "FILE_META::x_y.slp:5:predictions"


def _upstream_frames(link: P.Link, until: tuple[str, ...], timeout: float = 240) -> list[str]:
    """The text frames an upstream-dialect link gets, up to one whose name is in `until`."""
    frames: list[str] = []
    deadline = time.monotonic() + timeout
    while not frames or U.upstream_split(frames[-1])[0] not in until:
        frames.append(link.expect(lambda item: isinstance(item, str), max(1, deadline - time.monotonic()),
                                  f"one of {until} (got {[f[:40] for f in frames[-5:]]})"))
    return frames


def _names(frames: list[str]) -> list[str]:
    return [U.upstream_split(f)[0] for f in frames if "::" in f or f in (U.UP_END_OF_FILE, U.UP_AUTH_SUCCESS)]


@pytest.mark.slow
def test_newer_clients_get_inference_after_training_and_a_batch_of_tracks_on_one_link(lab, tmp_path):
    """What sleap-rtc's clients after 0.0.7 expect (its main branch, 2026-04): a training
    that names its labels ends in inference whose predictions stream back before
    INFERENCE_COMPLETE; track jobs log as JOB_LOG::; run_inference_batch and the sleap-app
    desktop client send several track specs, one after another, over one link."""
    from sleap_rtc.jobs.spec import TrainJobSpec

    signaling = lab.signaling_client("newer-api")
    try:
        [worker] = signaling.discover(role="worker")  # where the newer clients read a worker's name
        assert worker["metadata"]["properties"]["worker_name"] == socket.gethostname()
        link = P.open_link(signaling, lab.worker_id, tmp_path, label="training")
        assert U.upstream_split(link.expect(lambda i: isinstance(i, str), 15, "the challenge"))[0] == "AUTH_CHALLENGE"
        link.send_raw("AUTH_RESPONSE::missing")
        train = TrainJobSpec(config_path=str(lab.project["config"]), labels_path=str(lab.project["labels"]),
                             max_epochs=1)
        link.send_raw(f"JOB_SUBMIT::t-1::{train.to_json()}")
        frames = _upstream_frames(link, ("INFERENCE_COMPLETE", "INFERENCE_FAILED", "INFERENCE_SKIPPED"))
        names = _names(frames)
        assert names[-1] == "INFERENCE_COMPLETE", frames[-10:]
        order = [n for n in names if n in ("JOB_ACCEPTED", "JOB_COMPLETE", "INFERENCE_BEGIN", "FILE_META",
                                           "END_OF_FILE", "INFERENCE_COMPLETE")]
        assert order == ["JOB_ACCEPTED", "JOB_COMPLETE", "INFERENCE_BEGIN", "FILE_META", "END_OF_FILE",
                         "INFERENCE_COMPLETE"], names
        done = json.loads(U.upstream_split(frames[-1])[1])
        predictions = Path(done["predictions_path"])
        assert predictions.name == "labels.predictions.slp" and predictions.is_file()
        meta = next(f for f in frames if f.startswith("FILE_META::"))
        assert meta == f"FILE_META::labels.predictions.slp:{predictions.stat().st_size}:predictions"
        record = jobs_of(lab.worker_dir)[-1]
        assert record["state"] == P.COMPLETED and [o["kind"] for o in record["outputs"]] == ["model", "predictions"]
        inference = json.loads(record["command"])  # the last run's
        assert inference[1] == "track" and "--only_suggested_frames" in inference
        assert str(lab.project["labels"]) in inference
        link.close()

        # A batch of two track specs over one link, as run_inference_batch and sleap-app send them.
        model = record["outputs"][0]["path"]
        batch = P.open_link(signaling, lab.worker_id, tmp_path, label="sleap-app")
        batch.expect(lambda i: isinstance(i, str) and i.startswith("AUTH_CHALLENGE::"), 15, "the challenge")
        batch.send_raw("AUTH_RESPONSE::missing")
        specs = [{"type": "track", "data_path": str(lab.project["labels"]), "model_paths": [model],
                  "frame_filter": "user", "video_index": 0},
                 {"type": "track", "data_path": str(lab.project["labels"]), "model_paths": [model],
                  "exclude_user_labeled": True, "frames": "0-3"}]
        answers = []
        for index, spec in enumerate(specs):
            batch.send_raw(f"JOB_SUBMIT::b-{index}::{json.dumps(spec)}")
            answers.append(_upstream_frames(batch, ("JOB_COMPLETE", "JOB_FAILED", "JOB_REJECTED")))
        batch.close()
    finally:
        signaling.close()
    for frames in answers:
        names = _names(frames)
        assert names[-1] == "JOB_COMPLETE" and "JOB_LOG" in names and "FILE_META" in names, frames[-8:]
        assert json.loads(U.upstream_split(frames[-1])[1])["job_type"] == "track"
    first, second = (json.loads(job["command"]) for job in jobs_of(lab.worker_dir)[-2:])
    assert "--only_labeled_frames" in first and first[first.index("--video_index") + 1] == "0"
    assert "--exclude_user_labeled" in second and second[second.index("--frames") + 1] == "0-3"


class _Written:
    """What the adapter writes to a link (a stand-in for one: text frames only)."""

    peer_id = "client"

    def __init__(self):
        self.frames: list[str] = []

    def send_raw(self, frame) -> None:
        self.frames.append(frame)

    def drain(self, timeout: float) -> None:
        pass


class _Session:
    """The little of a Session an UpstreamAdapter touches in deliver and control."""

    def __init__(self):
        self.outbox = type("Outbox", (), {"put": lambda box, item: None})()
        self.quits: list[dict] = []
        signaling = type("Signaling", (), {"send": lambda _, frame: self.quits.append(frame)})()
        self.worker = type("Worker", (), {"signaling": signaling, "peer_id": "w"})()
        self.controls: list[tuple[str, dict]] = []

    def control(self, action: str, payload: dict) -> None:
        self.controls.append((action, payload))


def test_the_newer_dialect_from_upstreams_main_branch_examples(tmp_path, monkeypatch):
    """Message shapes of sleap-rtc's main branch after 0.0.7 (jobs/spec.py, job_executor.py,
    worker_class.py, sleap-app's sleapConnect.ts), against our codec and adapter."""
    from worker import track_step

    # TrackJobSpec.to_json on main, as its GUI sends it for one video of a batch.
    text = ('JOB_SUBMIT::batch1-0::{"type": "track", "data_path": "/d/l.slp", "model_paths": ["/d/m"], '
            '"frame_filter": "suggested", "video_index": 0, "exclude_user_labeled": true, "frames": "3,17,42"}')
    submit = U.parse_upstream_submit(text)
    assert submit.errors == [] and submit.specs == [{
        "type": "track", "data_path": "/d/l.slp", "model_paths": ["/d/m"], "frame_filter": "suggested",
        "video_index": 0, "exclude_user_labeled": True, "frames": "3,17,42"}]
    args = track_step("sleap-nn", {**submit.specs[0], "_resolved": {"data_path": "/d/l.slp", "model_paths": ["/d/m"]}},
                      tmp_path).args
    assert args[args.index("--video_index") + 1] == "0" and args[args.index("--frames") + 1] == "3,17,42"
    assert "--only_suggested_frames" in args and "--exclude_user_labeled" in args
    for value, flag in (("user", "--only_labeled_frames"), ("predicted", "--only_predicted_frames")):
        spec = {"type": "track", "data_path": "/d/l.slp", "model_paths": ["/d/m"], "frame_filter": value}
        assert flag in track_step("sleap-nn", {**spec, "_resolved": spec}, tmp_path).args
    random = U.parse_upstream_submit(text.replace('"suggested"', '"random"'))
    assert [e["field"] for e in random.errors] == ["frame_filter"] and "'frames'" in random.errors[0]["message"]
    assert [e["field"] for e in U.parse_upstream_submit('JOB_SUBMIT::job123::{"type":"track"}').errors] == \
        ["data_path", "model_paths"]  # sleap-app's unit-test frame: refused field by field

    # JOB_LOG for track jobs: one frame a line, CR:: before a carriage-return update, and the
    # progress line their GUI reads N/TOTAL, FPS and ETA: H:MM:SS from.
    assert U.upstream_track_log([["o", "Loading model"], ["e", "a warning"]], "50%|##") == [
        "JOB_LOG::Loading model", "JOB_LOG::a warning", "JOB_LOG::CR::50%|##"]
    line = U.upstream_inference_line({"n_processed": 17, "n_total": 35, "rate": 12.5, "eta": 3725})
    assert re.search(r"(\d+)/(\d+)", line).groups() == ("17", "35") and "12.5 FPS" in line
    assert re.search(r"ETA: (\d+):(\d+):(\d+)", line).groups() == ("1", "02", "05")

    # After training: JOB_COMPLETE for the model, INFERENCE_BEGIN, then INFERENCE_COMPLETE,
    # INFERENCE_FAILED or INFERENCE_SKIPPED, with the payloads upstream's worker sends.
    monkeypatch.setattr(U, "UPSTREAM_QUIT_MARGIN_S", 0)
    session, link = _Session(), _Written()
    adapter = U.UpstreamAdapter(session)

    def job(job_id: str, kind: str = P.TRAIN) -> None:
        adapter._jobs[job_id] = {"client_id": f"c-{job_id}", "kind": kind, "models": 1, "done": 0,
                                 "started": time.time(), "ended": False, "inferring": False}

    def said(job_id: str, *messages: tuple[str, dict]) -> list[str]:
        link.frames.clear()
        for name, payload in messages:
            adapter.deliver(link, name, {"job_id": job_id, **payload})
        return link.frames

    job("j1")
    frames = said("j1", (P.TRAIN_JOB_END, {"stopped_early": True, "model_dir": "/m"}), (P.INFERENCE_START, {}),
                  (P.JOB_LOG, {"lines": [["o", "Predicting"]], "progress": None}),
                  (P.JOB_PROGRESS, {"event": "inference", "n_processed": 1, "n_total": 2}),
                  (P.JOB_COMPLETE, {"outputs": [{"kind": "model", "path": "/m"},
                                                {"kind": "predictions", "path": "/p.slp"}]}))
    assert [U.upstream_split(f)[0] for f in frames] == ["JOB_COMPLETE", "INFERENCE_BEGIN", "INFERENCE_LOG",
                                                        "INFERENCE_PROGRESS", "INFERENCE_COMPLETE"]
    assert json.loads(U.upstream_split(frames[0])[1])["stopped_early"] is True
    assert json.loads(U.upstream_split(frames[0])[1])["output_path"] == "/m"
    assert frames[1] == "INFERENCE_BEGIN::{}" and frames[2] == "INFERENCE_LOG::Predicting"
    assert json.loads(U.upstream_split(frames[3])[1]) == {"n_processed": 1, "n_total": 2}
    assert json.loads(U.upstream_split(frames[4])[1]) == {"predictions_path": "/p.slp"}
    job("j2")  # the inference failed; the model trained, so the job completed with a warning
    frames = said("j2", (P.INFERENCE_START, {}), (P.JOB_COMPLETE, {
        "outputs": [{"kind": "model", "path": "/m"}], "warning": "the inference after them failed: exit 1"}))
    assert frames[-1] == 'INFERENCE_FAILED::{"error": "the inference after them failed: exit 1"}'
    job("j2c")
    frames = said("j2c", (P.INFERENCE_START, {}), (P.JOB_FAILED, {"state": P.CANCELLED, "error": "cancelled by x"}))
    assert frames[-1] == 'INFERENCE_FAILED::{"error": "cancelled"}'
    for state, reason in ((P.FAILED, "training_failed"), (P.CANCELLED, "cancelled")):
        job("j3")
        frames = said("j3", (P.JOB_FAILED, {"state": state, "exit_code": 1}))
        assert [U.upstream_split(f)[0] for f in frames] == ["JOB_FAILED", "INFERENCE_SKIPPED"]
        assert json.loads(U.upstream_split(frames[1])[1]) == {"reason": reason}
    job("j4")
    frames = said("j4", (P.JOB_COMPLETE, {"outputs": [{"kind": "model", "path": "/m"}]}))
    assert frames[-1] == 'INFERENCE_SKIPPED::{"reason": "no_labels_path"}'

    # sleap-app cancels by its own job id; upstream's bare JOB_CANCEL takes the latest.
    job("j5", P.TRACK)
    job("j6", P.TRACK)
    adapter.handle("JOB_CANCEL::c-j5")
    adapter.handle("JOB_STOP::j6")  # our id, as JOB_ACCEPTED told it
    adapter.handle("JOB_CANCEL::j1")  # a job that ended: nothing is cancelled
    adapter.handle("JOB_CANCEL::someone-elses")
    adapter.handle("JOB_CANCEL")
    assert session.controls == [(P.JOB_CANCEL, {"job_id": "j5"}), (P.ZMQ_CTRL, {"job_id": "j6"}),
                                (P.JOB_CANCEL, {"job_id": "j6"})]
