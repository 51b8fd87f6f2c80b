"""The two-file HPC copy: worker.py and protocol.py alone, next to sleap-nn.

A worker copied without its optional role files (packages.py, replicas.py, slurm.py,
upstream.py) still runs structured train and track jobs, commands, prune and the ledger.
It says at start-up what it lacks, leaves "package" and "replicate" out of its job types,
and refuses each missing capability with a reason naming the file. The full checkout
offers all of them.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

import protocol as P
from conftest import ROOT, job_id_of, ledger
from tiny_data import make_project

PACKAGE = Path(__file__).parent / "fixtures" / "sleap-1.6.6" / "single_instance.training_job.zip"


def bare_copy(directory: Path) -> Path:
    """worker.py and protocol.py copied alone into `directory`: the copy's worker.py."""
    directory.mkdir()
    for name in ("worker.py", "protocol.py"):
        shutil.copy(ROOT / name, directory / name)
    return directory / "worker.py"


def start_bare_worker(room, tmp_path: Path, *extra: str):
    worker_py = bare_copy(tmp_path / "hpc")
    proc = room.spawn("worker", [str(worker_py), "--working-dir", str(tmp_path / "w"), *extra], room.peer_env())
    return proc, proc.wait_for(r"registered as (\S+)", timeout=60).group(1)


def job_types(room, peer_id: str) -> tuple[list, list]:
    """What a worker's registration says it offers: (job_types, capabilities)."""
    signaling = room.signaling_client("looker")
    try:
        workers = signaling.discover(role="worker")
    finally:
        signaling.close()
    worker = next(p for p in workers if p["peer_id"] == peer_id)
    properties = worker["metadata"]["properties"]
    return properties["job_types"], properties["capabilities"]


def test_the_full_checkout_offers_every_capability(room, tmp_path):
    proc, worker_id = room.start_worker("--mount", str(tmp_path))
    line = proc.wait_for(r"worker: serves [^\n]*").group(0)
    assert line == ("worker: serves structured train and track jobs, commands, prune, SLEAP training packages, "
                    "replicas, SLURM (--slurm), sleap-rtc 0.0.7 clients")
    assert "--session-string sleap-session:" in proc.output()
    offered, capabilities = job_types(room, worker_id)
    assert {P.TRAIN, P.TRACK, P.PRUNE, P.PACKAGE, P.REPLICATE} <= set(offered)
    assert capabilities == ["package", "replicate", "slurm", "upstream"]


def test_a_bare_copy_refuses_what_needs_a_missing_file_and_names_it(room, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    package = data / PACKAGE.name
    shutil.copy(PACKAGE, package)
    proc, worker_id = start_bare_worker(room, tmp_path, "--mount", str(data), "--allow-command", "echo=/bin/echo")
    line = proc.wait_for(r"worker: serves [^\n]*").group(0)
    assert line == ("worker: serves structured train and track jobs, commands, prune; not SLEAP training packages "
                    "(no packages.py), replicas (no replicas.py), SLURM (--slurm) (no slurm.py), sleap-rtc 0.0.7 "
                    "clients (no upstream.py)")
    assert "--session-string" not in proc.output()
    offered, capabilities = job_types(room, worker_id)
    assert sorted(offered) == sorted([P.TRAIN, P.TRACK, P.PRUNE, "command:echo"])
    assert capabilities == []

    # The client looks for a worker that offers packages, and finds none.
    chosen = room.client("train", "--worker-pkg-path", str(package), "--non-interactive")
    assert chosen.returncode != 0 and "package" in chosen.stderr, chosen.stdout + chosen.stderr

    # A member who skips negotiation is refused by the worker itself, naming the file.
    signaling = room.signaling_client("bypasser")
    try:
        signaling.send_to_peer(worker_id, P.app_job_request("j9", {"type": P.TRAIN, "package": str(package)},
                                                            P.PACKAGE, 0, {}))
        answer = signaling.next(lambda f: (f.get("payload") or {}).get(P.APP_MESSAGE_TYPE) == P.APP_JOB_RESPONSE,
                                timeout=15)["payload"]
        assert not answer["accepted"] and answer["reason"] == "incompatible"
        assert answer["message"].startswith("this worker does not serve SLEAP training packages: packages.py is "
                                            "not beside its worker.py; it offers train, track")
        link = P.open_link(signaling, worker_id, tmp_path)
        link.send(*P.job_submit("pkg-1", {"type": P.TRAIN, "package": str(package)}))
        rejected = link.expect(lambda m: m.name == P.JOB_REJECTED, 15, "the rejection").payload
        link.send(*P.job_submit("rep-1", {"type": P.REPLICATE, "source_job": "j", "to": "w"}))
        no_replicate = link.expect(lambda m: m.name == P.JOB_REJECTED, 15, "the rejection").payload
        # Another worker sending a replica hears why it cannot.
        link.send(*P.replica_begin("r1", {"worker": "w", "job_id": "j"}, []))
        no_replica = link.expect(lambda m: m.name == P.REPLICA_READY, 15, "the answer").payload
        link.close()
        # A sleap-rtc 0.0.7 client's link gets one line saying why, then the link ends.
        upstream = P.open_link(signaling, worker_id, tmp_path, label="training")
        said = upstream.expect(lambda item: isinstance(item, str), 15, "the refusal")
        with pytest.raises(P.LinkClosed):
            upstream.expect(lambda item: False, 15, "the end of the link")
    finally:
        signaling.close()
    assert rejected["errors"] == [{"field": "package", "code": "UNSUPPORTED", "message":
                                   "this worker does not serve SLEAP training packages: "
                                   "packages.py is not beside its worker.py"}]
    assert no_replicate["errors"] == [{"field": "type", "code": "UNSUPPORTED", "message":
                                       "this worker does not serve replicas: replicas.py is not beside its worker.py"}]
    assert no_replica == {"request_id": "r1",
                          "error": "this worker does not serve replicas: replicas.py is not beside its worker.py"}
    assert said == "this worker does not serve sleap-rtc 0.0.7 clients: upstream.py is not beside its worker.py\n"
    assert ledger(tmp_path / "w", "pkg-1") == ledger(tmp_path / "w", "rep-1") == {}  # refused: no record

    # --slurm without slurm.py: the worker does not start, and says why.
    refused = room.spawn("worker", [str(tmp_path / "hpc" / "worker.py"), "--working-dir", str(tmp_path / "w2"),
                                    "--slurm"], room.peer_env())
    assert refused.popen.wait(timeout=60) == 1
    assert "error: --slurm: this worker does not serve SLURM (--slurm): slurm.py is not beside its worker.py" \
        in refused.output()


@pytest.mark.slow
def test_a_bare_copy_trains_tracks_runs_commands_and_prunes(room, tmp_path):
    project = make_project(tmp_path / "project", frames=16, epochs=1, steps=4)
    data = project["config"].parent
    proc, worker_id = start_bare_worker(room, tmp_path, "--mount", f"{data}:data", "--allow-command",
                                        "echo=/bin/echo")
    trained = room.client("train", "--config", str(project["config"]), "--max-epochs", "1", "--run-name", "bare",
                          timeout=300)
    assert trained.returncode == 0, trained.stdout + trained.stderr
    model_dir = Path(re.search(r"model on the worker: (\S+)", trained.stdout).group(1))
    assert (model_dir / "best.ckpt").is_file()
    train_id = job_id_of(trained.stdout)

    tracked = room.client("track", "--data-path", str(project["labels"]), "--model-paths", str(model_dir),
                          "--peak-threshold", "0", "--download", str(tmp_path / "predictions"), timeout=300)
    assert tracked.returncode == 0, tracked.stdout + tracked.stderr
    assert list((tmp_path / "predictions").glob("*.slp"))

    echoed = room.client("run", "--non-interactive", "echo", "--", "from", "the", "node")
    assert echoed.returncode == 0 and "from the node" in echoed.stdout, echoed.stdout + echoed.stderr

    assert ledger(tmp_path / "w", train_id)["state"] == P.COMPLETED
    listed = room.client("jobs")
    assert train_id in listed.stdout and job_id_of(echoed.stdout) in listed.stdout

    pruned = room.client("prune", "--older-than", "0")
    assert pruned.returncode == 0, pruned.stdout + pruned.stderr
    assert not (tmp_path / "w" / "jobs" / job_id_of(echoed.stdout)).exists()
    assert ledger(tmp_path / "w", job_id_of(echoed.stdout))["pruned"]["by"] == job_id_of(pruned.stdout)
    assert f"kept job {train_id}" in pruned.stdout  # the track job used its model
    assert [line for line in proc.output().splitlines() if " ERROR " in line] == []
