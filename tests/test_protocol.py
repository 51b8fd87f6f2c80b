"""Unit tests of the pure parts of the wire: framing, metadata, URLs, names, mounts."""

from __future__ import annotations

import os

import pytest

import protocol as P
import worker


def test_messages_round_trip_and_payloads_cannot_break_framing():
    tricky = {"job_id": "j1", "line": "epoch 1::loss=0.5\r\n", "nested": {"a": [1, "::"]}}
    text = P.encode("JOB_PROGRESS", tricky)
    assert text.startswith("JOB_PROGRESS::{")
    assert P.decode(text) == P.Message("JOB_PROGRESS", tricky)
    assert P.decode("INFERENCE_START") == P.Message("INFERENCE_START", {})


@pytest.mark.parametrize("text, why", [
    ("lower::{}", "upper-case"),
    ("JOB::not json", "not JSON"),
    ("JOB::[1, 2]", "JSON object"),
    ("", "upper-case"),
])
def test_malformed_messages_say_what_is_wrong(text, why):
    with pytest.raises(P.ProtocolError, match=why):
        P.decode(text)


def test_encode_rejects_bad_names():
    with pytest.raises(ValueError):
        P.encode("BAD NAME")


def test_merge_metadata_merges_properties_and_unions_tags():
    current = {"tags": ["a", "b"], "properties": {"x": 1, "y": 2}}
    merged = P.merge_metadata(current, {"tags": ["b", "c"], "properties": {"y": 3, "z": 4}})
    assert merged == {"tags": ["a", "b", "c"], "properties": {"x": 1, "y": 3, "z": 4}}
    assert current == {"tags": ["a", "b"], "properties": {"x": 1, "y": 2}}  # not mutated


def test_check_frame_names_the_field():
    assert "peer_id" in P.check_frame({"type": "register", "room_id": "r", "token": "t"})
    assert "must be a str" in P.check_frame({"type": "offer", "sender": "a", "target": 5, "sdp": "x"})
    assert P.check_frame({"type": "peer_message", "from_peer_id": "a", "to_peer_id": "b", "payload": None}) is None


def test_names_a_peer_sends_may_not_end_in_a_newline():
    """A pattern anchored with `$` matches before a trailing newline; each is used whole."""
    register = {"type": "register", "room_id": "r", "token": "t"}
    assert P.check_frame({**register, "peer_id": "worker-1"}) is None
    assert "peer_id must be" in P.check_frame({**register, "peer_id": "worker-1\n"})
    assert P.valid_job_id("job-1") and not P.valid_job_id("job-1\n")
    assert "command" not in {e["field"] for e in P.check_spec({"type": P.COMMAND, "command": "echo", "args": []})}
    assert "command" in {e["field"] for e in P.check_spec({"type": P.COMMAND, "command": "echo\n", "args": []})}
    track = {"type": P.TRACK, "data_path": "/d/l.slp", "model_paths": ["/m"]}
    assert "frames" not in {e["field"] for e in P.check_spec({**track, "frames": "0-9"})}
    assert "frames" in {e["field"] for e in P.check_spec({**track, "frames": "0-9\n"})}
    with pytest.raises(P.ProtocolError):
        P.decode("JOB_LOG\n::{}")


def test_http_base_url(monkeypatch):
    monkeypatch.delenv(P.ENV_HTTP, raising=False)
    assert P.http_base_url("ws://10.1.2.3:8080") == "http://10.1.2.3:8001"
    assert P.http_base_url("wss://rtc.example.org") == "https://rtc.example.org:8001"
    assert P.http_base_url("ws://h:1", "9000") == "http://h:9000"
    monkeypatch.setenv(P.ENV_HTTP, "https://api.example.org/")
    assert P.http_base_url("ws://h:1") == "https://api.example.org"


@pytest.mark.parametrize("name, safe", [("labels.slp", "labels.slp"), ("../../etc/passwd", "passwd"),
                                        ("C:\\data\\x.zip", "x.zip")])
def test_received_file_names_never_climb(name, safe):
    assert P.safe_file_name(name) == safe


@pytest.mark.parametrize("name", ["", "..", ".hidden", "dir/"])
def test_unusable_file_names_are_refused(name):
    with pytest.raises(P.TransferError):
        P.safe_file_name(name)


def test_mounts_resolve_symlinks(tmp_path):
    inside = tmp_path / "vast"
    inside.mkdir()
    (inside / "labels.slp").write_text("x")
    outside = tmp_path / "home"
    outside.mkdir()
    (outside / "secret").write_text("x")
    os.symlink(outside / "secret", inside / "escape")
    mount = worker.parse_mount(f"{inside}:vast")
    assert mount.label == "vast"
    assert worker.resolve_in_mounts(str(inside / "labels.slp"), [mount]) == inside / "labels.slp"
    for path in (outside / "secret", inside / "escape", inside / ".." / "home" / "secret"):
        with pytest.raises(worker.PathRefused, match="Access denied: .* is outside the worker's mounts") as refused:
            worker.resolve_in_mounts(str(path), [mount])
        assert refused.value.code == "ACCESS_DENIED"


def test_gpu_facts_fall_back_cleanly_without_a_gpu():
    facts = worker.gpu_facts(0)
    assert set(facts) == {"gpu_memory_mb", "gpu_model", "cuda_version"}
    assert isinstance(facts["gpu_memory_mb"], int)


def test_package_jobs_go_to_workers_that_offer_packages_and_to_those_from_before_capabilities():
    package = {"type": P.TRAIN, "package": "/data/job.zip"}
    assert P.capability(package) == P.PACKAGE
    assert P.capability({"type": P.TRACK, "data_path": "v.mp4", "model_paths": ["m"]}) == P.TRACK
    assert P.capability({"type": P.COMMAND, "command": "echo"}) == "command:echo"
    bare = {"properties": {"job_types": [P.TRAIN, P.TRACK, P.PRUNE], "capabilities": []}}
    full = {"properties": {"job_types": [P.TRAIN, P.TRACK, P.PACKAGE], "capabilities": [P.PACKAGE]}}
    older = {"properties": {"job_types": [P.TRAIN, P.TRACK, P.PRUNE, P.REPLICATE]}}  # served packages, unsaid
    assert P.PACKAGE not in P.offered(bare)
    assert P.offered(full).count(P.PACKAGE) == 1
    assert P.PACKAGE in P.offered(older) and P.PACKAGE in P.offered({})
    assert P.offered({"properties": {"job_types": ["command:echo"]}}) == ["command:echo"]


def test_builders_spell_each_message_as_the_receivers_read_it():
    assert P.job_submit("j1", {"type": P.TRAIN}) == (P.JOB_SUBMIT, {"job_id": "j1", "spec": {"type": P.TRAIN}})
    assert P.job_attached("j1", error="gone") == (P.JOB_ATTACHED, {"job_id": "j1", "error": "gone"})
    assert P.job_attached("j1", P.RUNNING, True) == (P.JOB_ATTACHED, {"job_id": "j1", "state": P.RUNNING,
                                                                       "following": True})
    assert P.replica_ready(None, error="no") == (P.REPLICA_READY, {"request_id": "None", "error": "no"})
    assert P.replica_done("r" * 100, []) == (P.REPLICA_DONE, {"replica_id": "r" * 64, "outputs": []})
    assert P.app_jobs_query("q1", job_id="j1") == {P.APP_MESSAGE_TYPE: P.APP_JOBS_QUERY, "request_id": "q1",
                                                   "job_id": "j1"}
    assert P.app_jobs_query("q2", state=None, sql="SELECT 1")["sql"] == "SELECT 1"
    assert P.app_jobs_query("q3", state=P.RUNNING)["state"] == P.RUNNING
    assert P.app_job_assigned("j1", 0)["reserved"] and not P.app_job_assigned("j1", 2)["reserved"]
    submitted = P.Submitted.read({"job_id": "../x", "spec": {"type": P.TRAIN}})
    assert submitted.problem and submitted.spec == {"type": P.TRAIN}
    assert P.Submitted.read({"job_id": "ok-1", "spec": 5}) == P.Submitted("ok-1", 5, None)


def test_builders_keep_what_a_peer_or_sleap_nn_says_from_overriding_their_own_fields():
    """sleap-nn's inference progress lines are copied into JOB_PROGRESS: a line that names
    an `event` or a `job_id` of its own must not change the message's; a pong answers with
    the ping's whole-number seq and nothing else."""
    name, payload = P.job_inference_progress("j1", {"n_processed": 3, "n_total": 9, "event": "queued",
                                                    "job_id": "someone-elses"})
    assert name == P.JOB_PROGRESS
    assert payload == {"n_processed": 3, "n_total": 9, "event": "inference", "job_id": "j1"}
    assert P.link_pong({"seq": 7, "echo": "x" * 1000}) == (P.LINK_PONG, {"seq": 7})
    assert P.link_pong({"seq": "x" * 1000}) == (P.LINK_PONG, {"seq": None})
    assert P.link_pong({"seq": True}) == (P.LINK_PONG, {"seq": None})


def test_readers_keep_a_members_fields_to_their_types_and_bound_what_is_echoed():
    big = "x" * 100_000
    assert P.request_id_in({"request_id": big}) == "x" * 64 and P.request_id_in({}) == ""
    assert P.Attach.read({"job_id": "j1", "follow": 1, "since": 7}) == P.Attach("j1", True, 7)
    for since in (-3, True, "5", None):
        assert P.Attach.read({"job_id": "j1", "since": since}).since == 0
    assert P.FilesQuery.read(P.FS_LIST, {"request_id": "r", "path": "/d", "offset": 2, "nearest": 1}) == \
        P.FilesQuery("r", "/d", 2, True)
    assert "whole number" in P.FilesQuery.read(P.FS_LIST, {"offset": True}).problem
    assert "expected a path" in P.FilesQuery.read(P.FS_LIST, {"path": ["/"]}).problem
    assert len(P.FilesQuery.read(P.FS_LIST, {"path": {"k": big}}).problem) < 200
    search = P.FilesQuery.read(P.FS_SEARCH, {"name": 5, "size": False})
    assert (search.name, search.size, search.problem) == ("5", None, None)
    good = P.UploadQuery.read({"sha256": "a" * 64, "size": 3, "name": "l.slp"})
    assert good == P.UploadQuery("a" * 64, 3, "l.slp")
    for odd in ({"sha256": big, "size": 3, "name": "n"}, {"sha256": "a" * 64, "size": True, "name": "n"},
                {"sha256": "A" * 64, "size": 3, "name": "n"}, {"sha256": "a" * 64, "size": 3, "name": ".."}):
        query = P.UploadQuery.read(odd)
        assert query.problem and len(query.sha256) <= 64, odd
    for almost in ("a" * 63 + "\n", "a" * 64 + "\n", "a" * 64 + "ZZZ"):  # nothing after the digest slips by
        assert P.UploadQuery.read({"sha256": almost, "size": 1, "name": "n"}).problem, almost
    too_long = P.UploadQuery.read({"sha256": "a" * 64, "size": 1, "name": "n" * 100_000})
    assert "refusing file name" in too_long.problem and len(too_long.problem) < 200
    request = P.JobRequest.read({"job_id": {"k": big}, "job_type": ["train"], "capability": {"k": 1},
                                 "requirements": {"min_gpu_memory_mb": True}})
    assert len(request.job_id) == 64 and request.job_type is None and isinstance(request.wanted, str)
    assert "must be a number" in request.problem
    assert P.JobRequest.read({"job_type": P.TRAIN, "requirements": {"min_gpu_memory_mb": 8000}}) == \
        P.JobRequest("", P.TRAIN, P.TRAIN, 8000, None)
    assert P.JobsQuery.read({"request_id": "q", "sql": None}).sql == ""  # asked for SQL: refused, not listed
    assert P.JobsQuery.read({"request_id": "q", "job_id": "j1"}) == P.JobsQuery("q", None, "j1", None)
    assert P.JobsQuery.read({"request_id": "q", "job_id": None}).job_id is None  # every job, as before
    offer = P.ReplicaOffer.read({"request_id": 5, "source": {"worker": big, "job_id": big}, "outputs": []})
    assert offer.request_id == "5" and len(offer.source["worker"]) == 100 and len(offer.source["job_id"]) == 64
    assert P.ReplicaOffer.read({"source": "x"}).source == {"worker": "None", "job_id": "None"}


def test_an_outcome_goes_out_as_job_complete_or_job_failed_and_reads_back_the_same():
    done = P.Outcome(P.COMPLETED, 0, 12.5, True, [{"kind": "model", "path": "/m"}], None, None, [], "/j/job.log",
                     [{"name": "m", "kind": P.TRAIN, "state": P.COMPLETED}])
    name, payload = done.message()
    assert name == P.JOB_COMPLETE and payload["outputs"] == [{"kind": "model", "path": "/m"}]
    assert P.Outcome.read({"job_id": "j1", **payload}) == done
    failed = P.Outcome(P.CANCELLED, None, 1.0, error="cancelled on request", stderr_tail=["boom"])
    assert failed.message()[0] == P.JOB_FAILED and P.Outcome.read(failed.message()[1]) == failed
    odd = P.Outcome.read({"state": 5, "exit_code": True, "duration_s": "long", "stopped_early": "yes",
                          "outputs": ["x", {"kind": "model"}], "warning": 7, "stderr_tail": [1, "line"], "steps": {}})
    assert odd == P.Outcome("5", None, 0.0, False, [{"kind": "model"}], None, None, ["line"], None, [])


def test_a_log_batch_reads_back_as_built_and_leaves_out_what_is_not_a_line():
    name, payload = P.job_log("j1", [["o", "epoch 1"], ["e", "warn"]], "50%", 120)
    assert name == P.JOB_LOG
    assert P.LogBatch.read(payload) == P.LogBatch([("o", "epoch 1"), ("e", "warn")], "50%", 120)
    assert P.LogBatch.read(P.job_log("j1", [], None)[1]) == P.LogBatch([], None, None)
    odd = P.LogBatch.read({"lines": [["o"], "text", ["o", 5], ["e", "kept"], None], "progress": 3, "offset": True})
    assert odd == P.LogBatch([("e", "kept")], None, None)
    assert P.LogBatch.read({"lines": "not a list"}).lines == []
