# SPDX-License-Identifier: LGPL-2.1-or-later
"""Job faults under each on-error policy: a full target (a small tmpfs, or a
small ext4 on a loop device where job data goes around the page cache, inside
the storage root) and a read error (a corrupted compressed cluster in a
backing file).  Signals come in QEMU's order; stop/enospc pause the job with
io-status, and Resume() after space is freed completes it with correct data."""
import json
import os
import subprocess
import time

import pytest

from bustest import qemu_img, qemu_io, sh
from test_bus import M, Monitor, data, prop, wait_gone, wait_status


FILLER = ".filler"


@pytest.fixture(params=["tmpfs", "ext4"])
def small_fs(bus, request):
    """About 3 MiB free.  tmpfs has no direct I/O, ext4 has: both write paths
    of a job's target meet ENOSPC."""
    mnt = os.path.join(bus.root, "small")
    os.mkdir(mnt)
    if request.param == "tmpfs":
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3M", "tmpfs", mnt], capture_output=True, text=True)
    else:
        img = os.path.join(bus.dir, "small.ext4")
        sh("truncate", "-s", "64M", img)
        sh("mkfs.ext4", "-q", "-m", "0", img)
        p = subprocess.run(["mount", "-o", "loop", img, mnt], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a {request.param} here: {p.stderr.strip()}")
    if request.param == "ext4":
        st = os.statvfs(mnt)
        fd = os.open(os.path.join(mnt, FILLER), os.O_WRONLY | os.O_CREAT, 0o600)
        os.posix_fallocate(fd, 0, st.f_bfree * st.f_frsize - (3 << 20))
        os.close(fd)
        os.sync()
    yield mnt
    subprocess.run(["umount", "-l", mnt])


def free_space(mnt):
    if os.path.exists(os.path.join(mnt, FILLER)):
        os.unlink(os.path.join(mnt, FILLER))
        os.sync()
    else:
        sh("mount", "-o", "remount,size=64M", mnt)


def full_target_chain(bus, mnt):
    base = os.path.join(bus.root, "base.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", base, "16M")
    qemu_io(base, "write -P 0x5a 0 12M")
    top = os.path.join(mnt, "top.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "../base.qcow2", "-F", "qcow2", top)
    qemu_img("convert", "-O", "raw", top, os.path.join(bus.dir, "top.ref"))
    time.sleep(0.5)
    return top, data(bus.call(M, "Manager", "GetChain", "s", top))[0]


# QEMU's signal sequences around an I/O error
FAILED = ["JobStatusChange(created)", "JobStatusChange(running)", "BlockJobError", "JobStatusChange(aborting)",
          "BlockJobCompleted", "JobStatusChange(concluded)", "JobStatusChange(null)"]
PAUSED_ON_ERROR = ["JobStatusChange(created)", "JobStatusChange(running)", "BlockJobError", "JobStatusChange(paused)"]
COMPLETED = ["JobStatusChange(waiting)", "JobStatusChange(pending)", "BlockJobCompleted", "JobStatusChange(concluded)",
             "JobStatusChange(null)"]


def events(sigs):
    """Collapse repeated BlockJobError signals (one per failing chunk)."""
    out = []
    for s in sigs:
        if not out or s != out[-1] or not s.startswith("BlockJobError"):
            out.append(s)
    return out


@pytest.mark.parametrize("policy", ["report", "ignore"])
def test_full_target_fails(bus, small_fs, policy):
    top, chain = full_target_chain(bus, small_fs)
    mon = Monitor(bus)
    job = data(bus.call(chain, "Chain", "Stream", "a{sv}", "2", "on-error", "s", policy, "auto-dismiss", "b", "false"))[0]
    wait_status(bus, job, "concluded")
    err = prop(bus, job, "Job", "Error")
    assert "No space left" in err or "no space" in err.lower(), err
    bus.call(job, "Job", "Dismiss")
    wait_gone(bus, job)
    sigs = events(mon.stop())
    assert sigs == FAILED, sigs
    # the top keeps its backing and its data; leaks at worst
    assert json.loads(qemu_img("info", "--output=json", top).stdout)["backing-filename"] == "../base.qcow2"
    assert qemu_img("check", top, check=False).returncode in (0, 3)
    assert qemu_img("compare", "-F", "raw", top, os.path.join(bus.dir, "top.ref"), check=False).returncode == 0


@pytest.mark.parametrize("policy", ["stop", "enospc"])
def test_full_target_stops_then_resumes(bus, small_fs, policy):
    top, chain = full_target_chain(bus, small_fs)
    mon = Monitor(bus)
    job = data(bus.call(chain, "Chain", "Stream", "a{sv}", "1", "on-error", "s", policy))[0]
    wait_status(bus, job, "paused")
    assert prop(bus, job, "Job", "IoStatus") == "nospace"
    assert prop(bus, job, "Job", "Paused") is True
    free_space(small_fs)
    bus.call(job, "Job", "Resume")
    wait_gone(bus, job)
    sigs = events(mon.stop())
    assert sigs[:4] == PAUSED_ON_ERROR, sigs
    assert sigs[-5:] == COMPLETED, sigs
    assert "backing-filename" not in json.loads(qemu_img("info", "--output=json", top).stdout)
    assert qemu_img("check", top, check=False).returncode in (0, 3)
    assert qemu_img("compare", "-F", "raw", top, os.path.join(bus.dir, "top.ref"), check=False).returncode == 0


def corrupt_compressed_base(bus):
    src = os.path.join(bus.dir, "src.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", src, "4M")
    qemu_io(src, "write -P 0x33 0 4M")
    base = os.path.join(bus.root, "cbase.qcow2")
    qemu_img("convert", "-c", "-O", "qcow2", src, base)
    m = json.loads(qemu_img("map", "--output=json", base).stdout)
    assert m[0]["data"]
    # find the compressed data of cluster 1 through its L2 entry and smash it
    raw = open(base, "rb").read()
    l1_off = int.from_bytes(raw[40:48], "big")
    l2_off = int.from_bytes(raw[l1_off:l1_off + 8], "big") & 0x00fffffffffffe00
    e = int.from_bytes(raw[l2_off + 8:l2_off + 16], "big")
    coff = e & ((1 << 54) - 1)
    with open(base, "r+b") as f:
        f.seek(coff)
        f.write(os.urandom(64))
    top = os.path.join(bus.root, "ctop.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "cbase.qcow2", "-F", "qcow2", top)
    time.sleep(0.5)
    return top, data(bus.call(M, "Manager", "GetChain", "s", top))[0]


@pytest.mark.parametrize("policy", ["report", "ignore", "stop"])
def test_read_error(bus, policy):
    top, chain = corrupt_compressed_base(bus)
    mon = Monitor(bus)
    job = data(bus.call(chain, "Chain", "Stream", "a{sv}", "2", "on-error", "s", policy, "auto-dismiss", "b", "false"))[0]
    if policy == "stop":
        wait_status(bus, job, "paused")
        assert prop(bus, job, "Job", "IoStatus") == "failed"
        bus.call(job, "Job", "Cancel", "b", "true")  # the data will not heal: give up
    wait_status(bus, job, "concluded")
    err = prop(bus, job, "Job", "Error")
    bus.call(job, "Job", "Dismiss")
    wait_gone(bus, job)
    sigs = events(mon.stop())
    assert sigs[:3] == ["JobStatusChange(created)", "JobStatusChange(running)", "BlockJobError"], sigs
    if policy == "stop":
        assert "BlockJobCancelled" in sigs and err == "Operation canceled"
    else:
        assert sigs[-4:] == ["JobStatusChange(aborting)", "BlockJobCompleted", "JobStatusChange(concluded)",
                             "JobStatusChange(null)"], sigs
        assert "compressed" in err, err
    # the top keeps its backing: nothing was lost
    assert json.loads(qemu_img("info", "--output=json", top).stdout)["backing-filename"] == "cbase.qcow2"
    assert qemu_img("check", top, check=False).returncode in (0, 3)


def test_backup_full_target_stops_then_resumes(bus, small_fs):
    """on-target-error=stop applies to the target's writes (source errors would report)."""
    base = os.path.join(bus.root, "src.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", base, "16M")
    qemu_io(base, "write -P 0x6b 0 12M")
    time.sleep(0.5)
    chain = data(bus.call(M, "Manager", "GetChain", "s", base))[0]
    mon = Monitor(bus)
    job = data(bus.call(chain, "Chain", "Backup", "sa{sv}", os.path.join(small_fs, "bk.qcow2"), "2",
                        "on-source-error", "s", "report", "on-target-error", "s", "stop"))[0]
    wait_status(bus, job, "paused")
    assert prop(bus, job, "Job", "IoStatus") == "nospace"
    free_space(small_fs)
    bus.call(job, "Job", "Resume")
    wait_gone(bus, job)
    sigs = events(mon.stop())
    assert sigs[:4] == PAUSED_ON_ERROR, sigs
    assert sigs[-3:] == ["BlockJobCompleted", "JobStatusChange(concluded)", "JobStatusChange(null)"], sigs
    bk = os.path.join(small_fs, "bk.qcow2")
    assert qemu_img("check", bk, check=False).returncode in (0, 3)
    assert qemu_img("compare", bk, base, check=False).returncode == 0


def commit_into_small_base(bus, mnt):
    """base (on the small file system) <- mid (12 MiB of data) <- top."""
    base = os.path.join(mnt, "base.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", base, "16M")
    qemu_io(base, "write -P 0x11 0 1M")
    mid = os.path.join(bus.root, "mid.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "small/base.qcow2", "-F", "qcow2", mid)
    qemu_io(mid, "write -P 0x22 1M 12M")
    top = os.path.join(bus.root, "top.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", top)
    qemu_io(top, "write -P 0x33 14M 1M")
    qemu_img("convert", "-O", "raw", top, os.path.join(bus.dir, "top.ref"))
    time.sleep(0.5)
    return top, data(bus.call(M, "Manager", "GetChain", "s", top))[0]


def backing_of(path):
    return json.loads(qemu_img("info", "-U", "--output=json", path).stdout).get("backing-filename")


@pytest.mark.parametrize("policy", ["report", "stop"])
@pytest.mark.parametrize("active", [False, True])
def test_commit_into_a_full_base(bus, small_fs, policy, active):
    top, chain = commit_into_small_base(bus, small_fs)
    base = os.path.join(small_fs, "base.qcow2")
    mon = Monitor(bus)
    opts = ["base", "s", base, "on-error", "s", policy, "auto-dismiss", "b", "false"]
    if not active:
        opts += ["top", "s", "mid.qcow2"]
    job = data(bus.call(chain, "Chain", "Commit", "a{sv}", str(len(opts) // 3), *opts))[0]
    if policy == "report":
        wait_status(bus, job, "concluded")
        assert "space" in prop(bus, job, "Job", "Error").lower()
        bus.call(job, "Job", "Dismiss")
        wait_gone(bus, job)
        sigs = events(mon.stop())
        assert sigs == FAILED, sigs
        assert backing_of(top) == "mid.qcow2"  # nothing moved
    else:
        wait_status(bus, job, "paused")
        assert prop(bus, job, "Job", "IoStatus") == "nospace"
        free_space(small_fs)
        bus.call(job, "Job", "Resume")
        if active:
            wait_status(bus, job, "ready")
            bus.call(job, "Job", "Complete")
        wait_status(bus, job, "concluded")
        assert prop(bus, job, "Job", "Error") == ""
        bus.call(job, "Job", "Dismiss")
        wait_gone(bus, job)
        sigs = events(mon.stop())
        assert sigs[:4] == PAUSED_ON_ERROR, sigs
        assert sigs[-5:] == COMPLETED, sigs
        result = base if active else top
        if not active:
            assert backing_of(top) == "small/base.qcow2"
        p = qemu_img("compare", "-U", "-F", "raw", result, os.path.join(bus.dir, "top.ref"), check=False)
        assert p.returncode == 0, p.stdout
    for f in (base, top, os.path.join(bus.root, "mid.qcow2")):
        assert qemu_img("check", "-U", f, check=False).returncode in (0, 3)
    # the guest's view through the old top is intact whatever happened
    if policy == "report":
        p = qemu_img("compare", "-U", "-F", "raw", top, os.path.join(bus.dir, "top.ref"), check=False)
        assert p.returncode == 0, p.stdout


@pytest.mark.parametrize("policy", ["report", "stop"])
def test_mirror_onto_a_full_target(bus, small_fs, policy):
    base = os.path.join(bus.root, "src.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", base, "16M")
    qemu_io(base, "write -P 0x6b 0 12M")
    time.sleep(0.5)
    chain = data(bus.call(M, "Manager", "GetChain", "s", base))[0]
    tgt = os.path.join(small_fs, "m.qcow2")
    mon = Monitor(bus)
    job = data(bus.call(chain, "Chain", "Mirror", "sa{sv}", tgt, "3", "on-source-error", "s", "report",
                        "on-target-error", "s", policy, "auto-dismiss", "b", "false"))[0]
    if policy == "report":
        wait_status(bus, job, "concluded")
        assert "space" in prop(bus, job, "Job", "Error").lower()
        bus.call(job, "Job", "Dismiss")
        wait_gone(bus, job)
        assert events(mon.stop()) == FAILED
    else:
        wait_status(bus, job, "paused")
        assert prop(bus, job, "Job", "IoStatus") == "nospace"
        free_space(small_fs)
        bus.call(job, "Job", "Resume")
        wait_status(bus, job, "ready")
        bus.call(job, "Job", "Complete")
        wait_status(bus, job, "concluded")
        bus.call(job, "Job", "Dismiss")
        wait_gone(bus, job)
        sigs = events(mon.stop())
        assert sigs[:4] == PAUSED_ON_ERROR, sigs
        assert sigs[-7:] == ["JobStatusChange(ready)", "BlockJobReady", "JobStatusChange(waiting)",
                             "JobStatusChange(pending)", "BlockJobCompleted", "JobStatusChange(concluded)",
                             "JobStatusChange(null)"], sigs
        assert qemu_img("compare", "-U", tgt, base, check=False).returncode == 0
        g = bus.call(M, "Manager", "GetChain", "s", os.path.basename(base), check=False)
        assert g.returncode != 0 and "was replaced by" in g.stderr, g.stderr
    assert qemu_img("check", "-U", tgt, check=False).returncode in (0, 3)
    assert qemu_img("check", "-U", base, check=False).returncode == 0


def test_mirror_read_error_reports(bus):
    top, chain = corrupt_compressed_base(bus)
    mon = Monitor(bus)
    job = data(bus.call(chain, "Chain", "Mirror", "sa{sv}", "cm.qcow2", "2", "on-source-error", "s", "report",
                        "auto-dismiss", "b", "false"))[0]
    wait_status(bus, job, "concluded")
    assert "compressed" in prop(bus, job, "Job", "Error")
    bus.call(job, "Job", "Dismiss")
    wait_gone(bus, job)
    assert events(mon.stop()) == FAILED
    assert backing_of(top) == "cbase.qcow2"
