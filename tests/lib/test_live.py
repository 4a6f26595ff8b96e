# SPDX-License-Identifier: LGPL-2.1-or-later
"""Jobs under a live writer: dc-live runs a job on a chain while an
in-process writer keeps writing through the chain's write path (dc_disk)
and keeps a model of the guest's disk.  It fails by itself when the disk
read back differs from the model (a lost write); here qemu-img judges the
files: a backup holds the data as of its start, a mirror that completes
leaves the target equal to the guest's disk and the writers on it, a soft
cancel leaves a point-in-time copy, an active commit pivots to base, and a
stream never copies backing data over a newer write."""
import json
import os

import pytest

from imgtest import BUILD, assert_clean, qemu_img, qemu_io, run

DC_LIVE = os.path.join(BUILD, "tests", "dc-live")
DONE = ["status waiting", "status pending", "completed ok", "status concluded", "status null"]


def live(tmp, *args):
    p = run(DC_LIVE, tmp, *args, check=False, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.split("\n")
    keys = ("top", "writes", "failures", "pivot")
    info = dict(line.split(" ", 1) for line in lines if line.split(" ", 1)[0] in keys)
    assert int(info["writes"]) > 50, "the writer must really have written while the job ran"
    return [line for line in lines if line and line.split(" ", 1)[0] not in keys], info


def dropped(info):
    """The layers the pivot reported dropped (bottom first), by name; None without a pivot."""
    if "pivot" not in info:
        return None
    return [p.rsplit("/", 1)[1] for p in info["pivot"].split(" ")[1:]]


def same(img, ref):
    p = qemu_img("compare", "-F", "raw", img, ref, check=False)
    assert p.returncode == 0, p.stdout + p.stderr


def differs(img, ref):
    return qemu_img("compare", "-F", "raw", img, ref, check=False).returncode == 1


def shape(path):
    info = json.loads(qemu_img("info", "--output=json", "--backing-chain", path).stdout)
    return [i["filename"].rsplit("/", 1)[1] for i in info]


@pytest.fixture
def chain(tmp):
    """[A] <-- [B] <-- [C], 32 MiB, C the active layer."""
    qemu_img("create", "-q", "-f", "qcow2", tmp / "A.qcow2", "32M")
    qemu_io(tmp / "A.qcow2", "write -P 0xa 0 20M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "A.qcow2", "-F", "qcow2", tmp / "B.qcow2")
    qemu_io(tmp / "B.qcow2", "write -P 0xb 8M 8M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "B.qcow2", "-F", "qcow2", tmp / "C.qcow2")
    qemu_io(tmp / "C.qcow2", "write -P 0xc 12M 2M")
    return tmp


def make_target(t, sync):
    """T.qcow2 as drive-backup/drive-mirror create it for SYNC over the chain topped by C."""
    if sync == "full":
        qemu_img("create", "-q", "-f", "qcow2", t / "T.qcow2", "32M")
    else:
        qemu_img("create", "-q", "-f", "qcow2", "-b", "B.qcow2" if sync == "top" else "C.qcow2", "-F", "qcow2",
                 t / "T.qcow2")


def check_all(t):
    for f in t.glob("*.qcow2"):
        assert_clean(f)


@pytest.mark.parametrize("sync", ["full", "top", "none"])
def test_backup_is_the_disk_at_its_start(chain, sync):
    t = chain
    make_target(t, sync)
    events, info = live(t, "backup", t / "C.qcow2", t / "T.qcow2", sync)
    if sync == "none":
        assert events[-4:] == ["status aborting", "cancelled", "status concluded", "status null"]
        assert differs(t / "point.raw", t / "model.raw")
        # what the target holds is the old data of every cluster the guest wrote since:
        # over the disk as it was, it is the disk as it was
        assert_clean(t / "T.qcow2")
        qemu_img("rebase", "-u", "-b", "point.raw", "-F", "raw", t / "T.qcow2")
        same(t / "T.qcow2", t / "point.raw")
        assert json.loads(qemu_img("info", "--output=json", t / "T.qcow2").stdout)["actual-size"] > 1 << 20
        return
    assert events[-5:] == DONE
    assert info["top"].endswith("C.qcow2")
    assert differs(t / "point.raw", t / "model.raw"), "the writer changed the disk during the backup"
    same(t / "T.qcow2", t / "point.raw")
    same(t / "C.qcow2", t / "model.raw")
    check_all(t)


@pytest.mark.parametrize("sync", ["full", "top"])
def test_pull_backup_is_the_disk_at_its_start(chain, sync, monkeypatch):
    """A pull backup (fleece): the copy reads a point-in-time view whose copy-before-write data goes into
    the fleecing image, never into the target; under a writer the target still holds the disk as it
    was at the job's start."""
    t = chain
    make_target(t, sync)
    qemu_img("create", "-q", "-f", "qcow2", t / "F.qcow2", "32M")
    monkeypatch.setenv("DC_LIVE_FLEECE", str(t / "F.qcow2"))
    events, info = live(t, "backup", t / "C.qcow2", t / "T.qcow2", sync)
    assert events[-5:] == DONE
    assert differs(t / "point.raw", t / "model.raw"), "the writer changed the disk during the backup"
    same(t / "T.qcow2", t / "point.raw")
    same(t / "C.qcow2", t / "model.raw")
    check_all(t)


@pytest.mark.parametrize("mode", ["background", "write-blocking"])
@pytest.mark.parametrize("sync", ["full", "top", "none"])
def test_mirror_complete_moves_the_writers(chain, sync, mode):
    t = chain
    make_target(t, sync)
    events, info = live(t, "mirror", t / "C.qcow2", t / "T.qcow2", sync, mode, "complete")
    assert events == ["status created", "status running", "status ready", "ready"] + DONE
    assert info["top"].endswith("T.qcow2")
    same(t / "T.qcow2", t / "model.raw")
    assert shape(t / "T.qcow2") == {"full": ["T.qcow2"], "top": ["T.qcow2", "B.qcow2", "A.qcow2"],
                                    "none": ["T.qcow2", "C.qcow2", "B.qcow2", "A.qcow2"]}[sync]
    # the pivot was reported with the layers it dropped, bottom first: the old top is dropped unless
    # it is the target's backing now
    assert info["pivot"].split(" ")[0].endswith("T.qcow2")
    assert dropped(info) == {"full": ["A.qcow2", "B.qcow2", "C.qcow2"], "top": ["C.qcow2"], "none": []}[sync]
    check_all(t)


@pytest.mark.parametrize("mode", ["background", "write-blocking"])
def test_mirror_soft_cancel_leaves_a_point_in_time_copy(chain, mode):
    t = chain
    qemu_img("create", "-q", "-f", "qcow2", t / "T.qcow2", "32M")
    events, info = live(t, "mirror", t / "C.qcow2", t / "T.qcow2", "full", mode, "cancel")
    assert events == ["status created", "status running", "status ready", "ready"] + DONE
    assert info["top"].endswith("C.qcow2")
    same(t / "T.qcow2", t / "point.raw")
    same(t / "C.qcow2", t / "model.raw")
    assert differs(t / "point.raw", t / "model.raw"), "writes after the cancel must stay out of the copy"
    assert dropped(info) is None, "a soft cancel pivots nothing"
    check_all(t)


@pytest.mark.parametrize("action", ["complete", "cancel"])
def test_active_commit(chain, action):
    t = chain
    events, info = live(t, "commit", t / "C.qcow2", t / "A.qcow2", action)
    assert events == ["status created", "status running", "status ready", "ready"] + DONE
    if action == "complete":
        assert info["top"].endswith("A.qcow2")
        same(t / "A.qcow2", t / "model.raw")
        assert shape(t / "A.qcow2") == ["A.qcow2"]
        assert dropped(info) == ["B.qcow2", "C.qcow2"]
    else:
        assert info["top"].endswith("C.qcow2")
        same(t / "C.qcow2", t / "model.raw")
        same(t / "A.qcow2", t / "point.raw")  # base holds the disk as of the cancel
        assert dropped(info) is None
    check_all(t)


@pytest.mark.parametrize("base", [None, "A.qcow2"])
def test_stream_under_writes(chain, base):
    t = chain
    events, info = live(t, "stream", t / "C.qcow2", *([t / base] if base else []))
    assert events[-5:] == DONE
    same(t / "C.qcow2", t / "model.raw")
    assert shape(t / "C.qcow2") == (["C.qcow2", "A.qcow2"] if base else ["C.qcow2"])
    check_all(t)
