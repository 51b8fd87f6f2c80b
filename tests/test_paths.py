"""Paths that differ between machines: looking at the worker's files, fixing a rejected
path and submitting again, and the videos a labels file points at. Interactive flows run
in a real terminal (tmux), driven with keystrokes as a person would."""

from __future__ import annotations

import os
import re
import secrets
import shlex
import subprocess
import time
from pathlib import Path

import pytest

import protocol as P
import worker as W
from conftest import ROOT, PY, ledger, sha256, stand_in, wait_until
from tiny_data import make_project

LAPTOP = "/Users/ana/data"


class Terminal:
    """A command in a detached tmux session of its own, 160x50."""

    def __init__(self, room, command: list[str]):
        self.socket = f"sleap-rtc-test-{secrets.token_hex(4)}"
        script = room.tmp / f"terminal-{self.socket}.sh"
        exports = "".join(f"export {key}={shlex.quote(value)}\n" for key, value in room.peer_env().items()
                          if key.startswith("SLEAP_RTC") or key in ("HOME", "PATH", "PYTHONUNBUFFERED"))
        script.write_text(f"cd {shlex.quote(str(room.tmp))}\n{exports}{shlex.join(command)}\necho EXIT=$?\n"
                          "sleep 300\n")
        subprocess.run(["tmux", "-L", self.socket, "new-session", "-d", "-s", "t", "-x", "160", "-y", "50",
                        f"bash {shlex.quote(str(script))}"], check=True)

    def screen(self) -> str:
        """What the terminal shows and showed (its scrollback), lines without trailing blanks."""
        shown = subprocess.run(["tmux", "-L", self.socket, "capture-pane", "-p", "-J", "-S", "-3000", "-t", "t"],
                               capture_output=True, text=True, check=True).stdout
        return "\n".join(line.rstrip() for line in shown.splitlines())

    def wait_for(self, pattern: str, timeout: float = 60) -> re.Match:
        try:
            return wait_until(lambda: re.search(pattern, self.screen()), timeout, f"/{pattern}/ on the terminal")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the terminal shows:\n{self.screen()}") from None

    def keys(self, *keys: str) -> None:
        for key in keys:
            subprocess.run(["tmux", "-L", self.socket, "send-keys", "-t", "t", key], check=True)
            time.sleep(0.2)

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True)


@pytest.fixture
def terminals():
    opened: list[Terminal] = []
    yield opened
    for terminal in opened:
        terminal.close()


@pytest.fixture
def lab(room, tmp_path):
    """A mount holding a tiny project in proj/, a link inside it that leads out, and a
    file outside it."""
    mount = room.tmp / "lab"
    made = make_project(mount / "proj", frames=16)
    (mount / "proj" / "sub").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "config.yaml").write_text("secret: 1\n")
    os.symlink(outside, mount / "escape")
    os.symlink(outside / "config.yaml", mount / "proj" / "linked.yaml")
    return mount, made, outside


def start(room, mount: Path, *extra: str) -> Path:
    worker_dir = room.tmp / "w"
    room.start_worker("--mount", str(mount), *extra, working_dir=worker_dir)
    return worker_dir


# -- looking at the worker's files -----------------------------------------------------------


def test_ls_shows_the_mounts_and_directories_and_nothing_outside_them(room, lab):
    mount, made, outside = lab
    start(room, mount)
    mounts = room.client("ls")
    assert mounts.returncode == 0, mounts.stderr
    assert re.search(rf"^{re.escape(str(mount))}\s+lab$", mounts.stdout, re.M), mounts.stdout
    proj = room.client("ls", str(mount / "proj"))
    assert proj.returncode == 0, proj.stderr
    names = [line.split()[-1] for line in proj.stdout.splitlines()[1:]]
    assert names == ["sub/", "config.yaml", "labels.slp", "video.mp4"]  # directories first; the link out is left out
    assert re.search(r"^-\s+\d{4}-\d\d-\d\d [\d:]+\s+16\.\d kB\s+labels\.slp$", proj.stdout, re.M), proj.stdout
    top = room.client("ls", str(mount))
    assert "escape" not in top.stdout and "proj/" in top.stdout
    for path in ("/etc", f"{mount}/../outside", str(mount / "escape"), str(mount / "proj" / "linked.yaml")):
        refused = room.client("ls", path)
        assert refused.returncode == 1 and ("outside the worker's mounts" in refused.stderr
                                            or "is not a directory" in refused.stderr), (path, refused.stderr)
        assert "secret" not in refused.stdout + refused.stderr
    # A long directory comes in pages; without a terminal every page is printed.
    many = mount / "many"
    many.mkdir()
    for i in range(1200):
        (many / f"f{i:04d}.txt").write_text("x")
    listed = room.client("ls", str(many))
    assert listed.returncode == 0 and len(listed.stdout.splitlines()) == 1 + 1200
    assert f"{many}  (1200 entries)" in listed.stdout


def test_the_name_search_is_bounded_and_stays_inside_the_mounts(tmp_path):
    mount = tmp_path / "lab"
    for i in range(200):
        folder = mount / f"d{i % 20}" / f"e{i // 20}"
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(100):
            (folder / f"frame{i:03d}_{j:02d}.png").write_bytes(b"")
    (mount / "d3" / "e4" / "mouse1_labels.slp").write_bytes(b"x" * 123)
    (mount / "d7" / "mouse1_label.slp").write_bytes(b"y" * 50)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "mouse1_labels.slp").write_bytes(b"z" * 123)
    os.symlink(outside, mount / "escape")
    mounts = [W.Mount(mount, "lab")]

    found = W.search_files("/Users/ana/mouse1_labels.slp", mounts, size=123)
    assert found["complete"] and found["scanned"] == 20_002
    assert [Path(c["path"]) for c in found["candidates"]] == [mount / "d3" / "e4" / "mouse1_labels.slp",
                                                               mount / "d7" / "mouse1_label.slp"]
    assert not any(str(outside) in c["path"] or "escape" in c["path"] for c in found["candidates"])
    globbed = W.search_files("mouse1*.slp", mounts)
    assert len(globbed["candidates"]) == 2

    started = time.monotonic()
    cut = W.search_files("mouse1_labels.slp", mounts, seconds=0.02)
    assert time.monotonic() - started < 1.0 and not cut["complete"] and cut["scanned"] < 20_002
    shallow = W.search_files("mouse1_labels.slp", [W.Mount(mount, "lab")], seconds=10)
    assert shallow["complete"]
    for broad in ("*", "*.slp", "a*", "??", "", "..", "a?.slp"):
        with pytest.raises(W.PathRefused, match="too broad"):
            W.search_files(broad, mounts)


def test_a_file_name_typed_exactly_is_found_whatever_its_length_and_ranks_first(tmp_path):
    mount = tmp_path / "lab"
    (mount / "configs").mkdir(parents=True)
    (mount / "configs" / "si.yaml").write_text("a: 1\n")
    (mount / "old" / "deep").mkdir(parents=True)
    (mount / "old" / "deep" / "SI.yaml").write_text("a: 2\n")
    (mount / "s.yaml").write_text("near, not the name")
    (mount / "configs" / "mouse1_labels.slp").write_bytes(b"x" * 10)
    (mount / "configs" / "mouse1_label.slp").write_bytes(b"y" * 123)
    mounts = [W.Mount(mount, "lab")]

    found = W.search_files("lab/config/si.yaml", mounts)  # the wrong directory, the right name
    assert sorted(Path(c["path"]) for c in found["candidates"]) == [mount / "configs" / "si.yaml",
                                                                   mount / "old" / "deep" / "SI.yaml"]
    assert found["complete"]
    assert W.search_files("x.slp", mounts)["candidates"] == []  # short, and no such name: nothing, no error
    # The exact name outranks a near name of exactly the size asked for.
    ranked = W.search_files("/elsewhere/mouse1_labels.slp", mounts, size=123)["candidates"]
    assert [Path(c["path"]).name for c in ranked] == ["mouse1_labels.slp", "mouse1_label.slp"]


def test_browse_moves_filters_and_picks_with_keystrokes(room, lab, terminals):
    mount, made, _ = lab
    start(room, mount)
    out = room.tmp / "picked.txt"
    browse = Terminal(room, ["bash", "-c", f"{shlex.quote(PY)} {shlex.quote(str(ROOT / 'client.py'))} browse "
                             f"{shlex.quote(str(mount))} --filter '*.yaml' > {shlex.quote(str(out))}"])
    terminals.append(browse)
    browse.wait_for(rf"{re.escape(str(mount))}\n", 60)
    assert "escape" not in browse.screen()
    browse.keys("Enter")  # proj/, the only entry shown
    browse.wait_for(r"proj\nfilter: \*\.yaml   2 shown")
    assert "labels.slp" not in browse.screen() and "linked.yaml" not in browse.screen()
    browse.keys("BSpace", "BSpace", "BSpace", "BSpace", "s", "l", "p")  # filter: *.slp
    browse.wait_for(r"filter: \*\.slp   2 shown")
    browse.keys("Down", "Enter")
    browse.wait_for(r"EXIT=0")
    assert out.read_text().strip() == str(mount / "proj" / "labels.slp")

    cancel = Terminal(room, ["bash", "-c", f"{shlex.quote(PY)} {shlex.quote(str(ROOT / 'client.py'))} browse "
                             f"> {shlex.quote(str(room.tmp / 'none.txt'))}"])
    terminals.append(cancel)
    cancel.wait_for(r"mounts\nfilter:", 60)
    cancel.keys("Left", "Escape")
    cancel.wait_for(r"EXIT=1")
    assert (room.tmp / "none.txt").read_text() == ""


# -- fixing a rejected path -------------------------------------------------------------------


def test_without_a_terminal_a_wrong_path_prints_candidates_and_a_distinct_code(room, lab):
    mount, made, _ = lab
    start(room, mount)
    result = room.client("train", "--config", str(mount / "proj" / "confg.yaml"))
    assert result.returncode == 4, result.stdout + result.stderr
    assert f"config: {mount / 'proj' / 'confg.yaml'} does not exist on the worker" in result.stderr
    assert re.search(rf"1\. {re.escape(str(made['config']))}  \(\d+ B, ", result.stderr), result.stderr
    elsewhere = room.client("train", "--config", "/etc/config.yaml", "--non-interactive")
    assert elsewhere.returncode == 4 and "Access denied" in elsewhere.stderr
    assert f"1. {made['config']}" in elsewhere.stderr  # found by name inside the mounts, never the one outside
    # A short name typed exactly, in the wrong directory: found, not "too broad".
    (mount / "configs").mkdir()
    (mount / "configs" / "si.yaml").write_text(made["config"].read_text())
    short = room.client("train", "--config", str(mount / "config" / "si.yaml"), "--non-interactive")
    assert short.returncode == 4 and "too broad" not in short.stderr, short.stderr
    assert f"1. {mount / 'configs' / 'si.yaml'}" in short.stderr, short.stderr


@pytest.mark.slow
def test_a_person_picks_a_candidate_and_the_job_runs(room, lab, terminals):
    mount, made, _ = lab
    worker_dir = start(room, mount)
    wrong = mount / "proj" / "confg.yaml"
    train = Terminal(room, [PY, str(ROOT / "client.py"), "train", "--config", str(wrong), "--max-epochs", "1"])
    terminals.append(train)
    train.wait_for(r"choose \[1\] the candidate, \[b\] browse the worker, \[q\] give up:", 60)
    assert f"1. {made['config']}" in train.screen()
    train.keys("1", "Enter")
    screen = train.wait_for(r"EXIT=\d+", 120).string
    assert "EXIT=0" in screen and re.search(r"job \S+ completed", screen), screen
    job_id = re.search(r"job (\S+) accepted", screen).group(1)
    assert f"python client.py train --config {made['config']} --max-epochs 1" in screen
    assert ledger(worker_dir, job_id)["state"] == P.COMPLETED


def test_a_person_browses_to_the_file_instead(room, lab, terminals, tmp_path):
    mount, made, _ = lab
    fast = stand_in(tmp_path, "fast-sleap-nn", "print('trained')\n")
    start(room, mount, "--sleap-nn", str(fast))
    train = Terminal(room, [PY, str(ROOT / "client.py"), "train", "--config", str(mount / "proj" / "sub" / "x.yml")])
    terminals.append(train)
    train.wait_for(r"choose \[b\] browse the worker, \[q\] give up:", 60)
    train.keys("b", "Enter")
    train.wait_for(rf"{re.escape(str(mount / 'proj' / 'sub'))}\n", 30)  # the deepest existing directory
    train.keys("Left")
    train.wait_for(rf"{re.escape(str(mount / 'proj'))}\nfilter: \*\.yml")
    train.keys("BSpace", "BSpace", "BSpace", "y", "a", "m", "l", "Down", "Enter")  # *.yaml: sub/, config.yaml
    screen = train.wait_for(r"EXIT=\d+", 60).string
    assert "EXIT=0" in screen and f"python client.py train --config {made['config']}" in screen, screen


# -- videos inside labels files ---------------------------------------------------------------


def laptop_labels(made: dict, path: Path, videos: list[str]) -> Path:
    """The project's labels with one video per name in `videos` (as the laptop stored them)."""
    import sleap_io as sio

    labels = sio.load_slp(str(made["labels"]))
    frames = list(labels.labeled_frames)
    copies = [labels.video] + [sio.Video(filename=str(made["video"]), open_backend=False) for _ in videos[1:]]
    for video in copies[1:]:
        labels.videos.append(video)
        for frame in frames[:4]:
            labels.append(sio.LabeledFrame(video=video, frame_idx=frame.frame_idx,
                                           instances=[i for i in frame.instances]))
    labels.replace_filenames(new_filenames=videos, open_videos=False)
    labels.save(str(path), embed=False)
    return path


@pytest.mark.slow
def test_laptop_video_paths_are_named_mapped_and_trained_on_a_copy(room, lab):
    mount, made, _ = lab
    worker_dir = start(room, mount)
    for day in ("day1", "day2"):
        (mount / "ana" / "data" / day).mkdir(parents=True)
        os.link(made["video"], mount / "ana" / "data" / day / "mouse.mp4")
    labels = laptop_labels(made, mount / "proj" / "laptop.slp",
                           [f"{LAPTOP}/day1/mouse.mp4", f"{LAPTOP}/day2/mouse.mp4"])
    before = sha256(labels)

    rejected = room.client("train", "--config", str(made["config"]), "--labels", str(labels), "--max-epochs", "1")
    assert rejected.returncode == 4, rejected.stdout + rejected.stderr
    for index, day in enumerate(("day1", "day2")):
        assert f"labels: {labels}: video {index} {LAPTOP}/{day}/mouse.mp4 does not exist on the worker" \
            in rejected.stderr
        assert f"found: {mount}/ana/data/{day}/mouse.mp4" in rejected.stderr
    proposal = f"--path-map {LAPTOP}={mount}/ana/data (resolves 2 of 2 missing videos)"
    assert proposal in rejected.stderr, rejected.stderr

    ran = room.client("train", "--config", str(made["config"]), "--labels", str(labels), "--max-epochs", "1",
                      "--path-map", f"{LAPTOP}={mount}/ana/data", timeout=180)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    job_id = re.search(r"job (\S+) accepted", ran.stdout).group(1)
    assert sha256(labels) == before  # the original is byte-identical
    copy = mount / "proj" / f"laptop.resolved-{job_id}.slp"
    assert f"videos mapped with {LAPTOP}={mount}/ana/data; sleap-nn reads the copy {copy}" in ran.stderr
    import sleap_io as sio

    assert [v.filename for v in sio.load_slp(str(copy), open_videos=False).videos] == [
        f"{mount}/ana/data/day1/mouse.mp4", f"{mount}/ana/data/day2/mouse.mp4"]
    record = ledger(worker_dir, job_id)
    assert record["state"] == P.COMPLETED
    spec = record["spec"]
    assert spec["path_map"] == [[LAPTOP, f"{mount}/ana/data"]] and spec["_relabel"][0]["copy"] == str(copy)


def test_windows_paths_map_and_a_map_out_of_the_mounts_is_refused(room, lab, tmp_path):
    mount, made, outside = lab
    fast = stand_in(tmp_path, "fast-sleap-nn", "print('trained')\n")
    worker_dir = start(room, mount, "--sleap-nn", str(fast))
    labels = laptop_labels(made, mount / "proj" / "windows.slp", ["D:\\lab\\videos\\video.mp4"])
    rejected = room.client("train", "--config", str(made["config"]), "--labels", str(labels))
    assert rejected.returncode == 4
    # sleap-io reads a Windows path with forward slashes; a map written either way matches it.
    assert f"--path-map D:/lab/videos={mount / 'proj'} (resolves 1 of 1" in rejected.stderr, rejected.stderr
    ran = room.client("train", "--config", str(made["config"]), "--labels", str(labels),
                      "--path-map", f"D:\\lab\\videos={mount / 'proj'}")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    job_id = re.search(r"job (\S+) accepted", ran.stdout).group(1)
    import sleap_io as sio

    copy = mount / "proj" / f"windows.resolved-{job_id}.slp"
    assert sio.load_slp(str(copy), open_videos=False).videos[0].filename == str(made["video"])
    assert ledger(worker_dir, job_id)["state"] == P.COMPLETED

    (outside / "video.mp4").write_bytes(made["video"].read_bytes())
    out = room.client("train", "--config", str(made["config"]), "--labels", str(labels),
                      "--path-map", f"D:\\lab\\videos={outside}")
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"path_map: D:\\lab\\videos={outside}: Access denied" in out.stderr
