# SPDX-License-Identifier: LGPL-2.1-or-later
"""Mirror and active commit over the bus, on the seed chain
[A] <-- [B] <-- [C] <-- [D]: each reaches ready, Complete() pivots (the old
Chain object goes, the new one comes), Cancel(false) leaves a point-in-time
copy without pivot, Cancel(true) abandons; the signals are QEMU's sequence,
qemu-img judges every image."""
import os
import time

import pytest

from bustest import qemu_img, qemu_io
from test_bus import (M, Monitor, assert_chain_intact, create, data, make_seed_chain, prop, shape, wait_gone,
                      wait_status)

READY = ["JobStatusChange(created)", "JobStatusChange(running)", "JobStatusChange(ready)", "BlockJobReady"]
DONE = ["JobStatusChange(waiting)", "JobStatusChange(pending)", "BlockJobCompleted", "JobStatusChange(concluded)",
        "JobStatusChange(null)"]
ABANDONED = ["JobStatusChange(aborting)", "BlockJobCancelled", "JobStatusChange(concluded)", "JobStatusChange(null)"]


def chains(bus):
    """The active layers of the published chains, by file name."""
    return sorted(prop(bus, c, "Chain", "Active").rsplit("_2f", 1)[1].replace("_2e", ".")
                  for c in data(bus.call(M, "Manager", "ListChains"))[0])


def same(bus, img, ref):
    p = qemu_img("compare", "-U", "-F", "raw", os.path.join(bus.root, img), os.path.join(bus.dir, ref), check=False)
    assert p.returncode == 0, p.stdout + p.stderr


def all_clean(bus):
    for f in os.listdir(bus.root):
        if f.endswith(".qcow2"):
            p = qemu_img("check", os.path.join(bus.root, f), check=False)
            assert p.returncode == 0, (f, p.stdout, p.stderr)


def wait_chains(bus, want, timeout=10):
    for _ in range(timeout * 10):
        if chains(bus) == sorted(want):
            return
        time.sleep(0.1)
    raise AssertionError(f"chains are {chains(bus)}, not {want}")


@pytest.mark.parametrize("sync,expect", [("full", ["E.qcow2"]),
                                         ("top", ["E.qcow2", "C.qcow2", "B.qcow2", "A.qcow2"]),
                                         ("none", ["E.qcow2", "D.qcow2", "C.qcow2", "B.qcow2", "A.qcow2"])])
def test_mirror_complete_pivots(bus, sync, expect):
    chain = make_seed_chain(bus)
    mon = Monitor(bus)
    job = data(bus.call(chain, "Chain", "Mirror", "sa{sv}", "E.qcow2", "2", "sync", "s", sync, "job-id", "s",
                        "m0"))[0]
    wait_status(bus, job, "ready")
    assert prop(bus, job, "Job", "Ready") is True
    assert prop(bus, job, "Job", "Target").endswith("/E.qcow2")
    # while it runs, the target is no chain of its own and the source chain stays
    assert chains(bus) == ["D.qcow2"]
    bus.call(job, "Job", "Complete")
    wait_gone(bus, job)
    assert mon.stop() == READY + DONE
    assert shape(bus, "E.qcow2") == expect
    same(bus, "E.qcow2", "D.ref")
    all_clean(bus)
    # the old chain went away and the new one came
    wait_chains(bus, ["E.qcow2"])
    p = bus.call(M, "Manager", "GetChain", "s", "D.qcow2", check=False)
    assert p.returncode != 0 and ("replaced by" in p.stderr or "not the active layer" in p.stderr), p.stderr


@pytest.mark.parametrize("sync,copy_mode,expect", [
    ("full", "background", ["E.qcow2"]),
    ("full", "write-blocking", ["E.qcow2"]),
    ("top", "background", ["E.qcow2", "C.qcow2", "B.qcow2", "A.qcow2"]),
    ("none", "write-blocking", ["E.qcow2", "D.qcow2", "C.qcow2", "B.qcow2", "A.qcow2"])])
def test_mirror_soft_cancel_leaves_a_copy(bus, sync, copy_mode, expect):
    chain = make_seed_chain(bus)
    mon = Monitor(bus)
    job = data(bus.call(chain, "Chain", "Mirror", "sa{sv}", "E.qcow2", "2", "sync", "s", sync, "copy-mode", "s",
                        copy_mode))[0]
    wait_status(bus, job, "ready")
    assert prop(bus, job, "Job", "ActivelySynced") is (copy_mode == "write-blocking")
    bus.call(job, "Job", "Cancel", "b", "false")
    wait_gone(bus, job)
    assert mon.stop() == READY + DONE
    same(bus, "E.qcow2", "D.ref")
    assert shape(bus, "E.qcow2") == expect
    assert_chain_intact(bus, ["D.qcow2", "C.qcow2", "B.qcow2", "A.qcow2"])
    # the copy is a chain of its own now (over D itself for sync none, which D then is no top of)
    wait_chains(bus, ["E.qcow2"] if sync == "none" else ["D.qcow2", "E.qcow2"])


def test_mirror_hard_cancel_and_cancel_before_ready(bus):
    chain = make_seed_chain(bus)
    for force, name in ((True, "E1.qcow2"), (False, "E2.qcow2")):
        mon = Monitor(bus)
        # slow enough to be cancelled before it is ready: any cancel then is hard
        job = data(bus.call(chain, "Chain", "Mirror", "sa{sv}", name, "1", "speed", "t", str(64 << 10)))[0]
        wait_status(bus, job, "running")
        bus.call(job, "Job", "Cancel", "b", "true" if force else "false")
        wait_gone(bus, job)
        assert mon.stop() == READY[:2] + ABANDONED
    assert_chain_intact(bus, ["D.qcow2", "C.qcow2", "B.qcow2", "A.qcow2"])
    wait_chains(bus, ["D.qcow2", "E1.qcow2", "E2.qcow2"])


def test_mirror_existing_target_of_another_size_is_refused(bus):
    """QEMU fails such a mirror when it runs; diskchain refuses the call, before anything starts."""
    chain = make_seed_chain(bus)
    create(bus, "small.qcow2", 1 << 20)
    mon = Monitor(bus)
    p = bus.call(chain, "Chain", "Mirror", "sa{sv}", "small.qcow2", "3", "mode", "s", "existing",
                 "job-id", "s", "sz", "auto-dismiss", "b", "false", check=False)
    assert p.returncode != 0 and "different sizes" in p.stderr, p.stderr
    assert mon.stop() == []
    assert data(bus.call(M, "Manager", "ListJobs"))[0] == []
    assert_chain_intact(bus, ["D.qcow2", "C.qcow2", "B.qcow2", "A.qcow2"])


def test_mirror_existing_target_and_change_copy_mode(bus):
    chain = make_seed_chain(bus)
    # an existing target full of other data: sync=full must overwrite all of it
    create(bus, "E.qcow2", 8 << 20)
    qemu_io(os.path.join(bus.root, "E.qcow2"), "write -P 0x77 0 8M")
    job = data(bus.call(chain, "Chain", "Mirror", "sa{sv}", "E.qcow2", "4", "mode", "s", "existing",
                        "granularity", "u", "131072", "buf-size", "t", str(1 << 20), "unmap", "b", "false"))[0]
    bus.call(job, "Job", "Change", "a{sv}", "1", "copy-mode", "s", "write-blocking")
    p = bus.call(job, "Job", "Change", "a{sv}", "1", "copy-mode", "s", "background", check=False)
    assert p.returncode != 0 and "from background to write-blocking" in p.stderr
    wait_status(bus, job, "ready")
    for _ in range(20):  # write-blocking and nothing left dirty
        if prop(bus, job, "Job", "ActivelySynced"):
            break
        time.sleep(0.1)
    assert prop(bus, job, "Job", "ActivelySynced") is True
    bus.call(job, "Job", "Complete")
    wait_gone(bus, job)
    same(bus, "E.qcow2", "D.ref")
    all_clean(bus)


def test_mirror_refusals(bus):
    chain = make_seed_chain(bus)
    for target, opts, want in (
            ("D.qcow2", [], "Can't mirror node into itself"),
            ("B.qcow2", ["mode", "s", "existing"], "in the source's backing chain"),
            ("A.qcow2", [], "already exists"),
            ("x.qcow2", ["sync", "s", "incremental"], "Sync mode 'incremental' not supported"),
            ("x.qcow2", ["granularity", "u", "1000"], "Granularity must be a power of 2"),
            ("x.qcow2", ["buf-size", "t", "0"], "Invalid parameter 'buf-size'"),
            ("x.qcow2", ["copy-mode", "s", "eager"], "copy-mode"),
            ("x.raw", ["format", "s", "raw", "sync", "s", "top"], "needs a target with a backing file"),
            ("nope.qcow2", ["mode", "s", "existing"], "no such image")):
        p = bus.call(chain, "Chain", "Mirror", "sa{sv}", target, str(len(opts) // 3), *opts, check=False)
        assert p.returncode != 0 and want in p.stderr, (target, opts, p.stderr)
    assert not os.path.exists(os.path.join(bus.root, "x.qcow2"))
    # mirror is a copy: its own polkit action
    p = bus.call(chain, "Chain", "Mirror", "sa{sv}", "u.qcow2", "0", user="dctest", check=False)
    assert p.returncode != 0
    assert data(bus.call(M, "Manager", "ListJobs"))[0] == []


@pytest.mark.parametrize("base,expect", [("A.qcow2", ["A.qcow2"]),             # seed case 3
                                         ("B.qcow2", ["B.qcow2", "A.qcow2"])])  # seed case 5
def test_active_commit_complete(bus, base, expect):
    chain = make_seed_chain(bus)
    mon = Monitor(bus)
    opts = [] if base == "A.qcow2" else ["base", "s", base]  # base defaults to the bottom-most image
    job = data(bus.call(chain, "Chain", "Commit", "a{sv}", str(len(opts) // 3), *opts))[0]
    wait_status(bus, job, "ready")
    p = bus.call(job, "Job", "Finalize", check=False)
    assert "in state 'ready' cannot accept command verb 'finalize'" in p.stderr
    bus.call(job, "Job", "Complete")
    wait_gone(bus, job)
    assert mon.stop() == READY + DONE
    assert shape(bus, base) == expect
    same(bus, base, "D.ref")
    all_clean(bus)
    wait_chains(bus, [base])


def test_active_commit_soft_and_hard_cancel(bus):
    chain = make_seed_chain(bus)
    mon = Monitor(bus)
    job = data(bus.call(chain, "Chain", "Commit", "a{sv}", "0"))[0]
    wait_status(bus, job, "ready")
    bus.call(job, "Job", "Cancel", "b", "false")
    wait_gone(bus, job)
    assert mon.stop() == READY + DONE
    # no pivot: D is still the active layer and the chain reads the same; A has D's view
    assert_chain_intact(bus, ["D.qcow2", "C.qcow2", "B.qcow2", "A.qcow2"])
    same(bus, "A.qcow2", "D.ref")
    wait_chains(bus, ["D.qcow2"])
    mon = Monitor(bus)
    job = data(bus.call(chain, "Chain", "Commit", "a{sv}", "0"))[0]
    wait_status(bus, job, "ready")
    bus.call(job, "Job", "Cancel", "b", "true")
    wait_gone(bus, job)
    assert mon.stop() == READY + ABANDONED
    assert_chain_intact(bus, ["D.qcow2", "C.qcow2", "B.qcow2", "A.qcow2"])


def test_active_commit_refuses_backing_file(bus):
    chain = make_seed_chain(bus)
    p = bus.call(chain, "Chain", "Commit", "a{sv}", "1", "backing-file", "s", "x", check=False)
    assert p.returncode != 0 and "'backing-file' specified, but 'top' is the active layer" in p.stderr


def test_ready_verbs(bus):
    """The verb table in ready and standby, which only mirror and active commit reach."""
    chain = make_seed_chain(bus)
    job = data(bus.call(chain, "Chain", "Mirror", "sa{sv}", "E.qcow2", "1", "job-id", "s", "rv"))[0]
    wait_status(bus, job, "ready")
    for status in ("ready", "standby"):
        for method, args in (("SetSpeed", ["t", "0"]), ("Change", ["a{sv}", "0"])):
            bus.call(job, "Job", method, *args)
        for method, verb in (("Finalize", "finalize"), ("Dismiss", "dismiss")):
            p = bus.call(job, "Job", method, check=False)
            assert f"Job 'rv' in state '{status}' cannot accept command verb '{verb}'" in p.stderr, p.stderr
        if status == "ready":
            bus.call(job, "Job", "Pause")
            wait_status(bus, job, "standby")
            assert prop(bus, job, "Job", "Ready") is True
    # complete is accepted in standby and acts after resume, as in newer QEMU
    bus.call(job, "Job", "Complete")
    bus.call(job, "Job", "Resume")
    wait_gone(bus, job)
    same(bus, "E.qcow2", "D.ref")


def test_diskchainctl_mirror_and_active_commit(bus):
    make_seed_chain(bus)
    # by default the client returns once the job is ready, and says what next
    p = bus.ctl("mirror", "D.qcow2", "E.qcow2", "--sync", "top", "--job-id", "cm1")
    assert p.stdout.startswith("cm1: ready") and "diskchainctl job complete cm1" in p.stdout
    assert prop(bus, "/org/diskchain/DiskChain1/job/cm1", "Job", "Status") in ("ready", "standby")
    bus.ctl("job", "change", "cm1", "--copy-mode", "write-blocking")
    bus.ctl("job", "complete", "cm1")
    p = bus.ctl("wait", "cm1", check=False)  # over, or about to be
    wait_gone(bus, "/org/diskchain/DiskChain1/job/cm1")
    assert shape(bus, "E.qcow2") == ["E.qcow2", "C.qcow2", "B.qcow2", "A.qcow2"]
    wait_chains(bus, ["E.qcow2"])
    # --copy: a point-in-time copy, the chain stays
    p = bus.ctl("mirror", "E.qcow2", "F.qcow2", "--copy", "--granularity", "64K", "--buf-size", "1M", "--no-unmap")
    assert "completed" in p.stdout
    same(bus, "F.qcow2", "D.ref")
    # --complete on an active commit: E into A, then A is the chain
    p = bus.ctl("commit", "E.qcow2", "--complete")
    assert "completed" in p.stdout
    assert shape(bus, "A.qcow2") == ["A.qcow2"]
    same(bus, "A.qcow2", "D.ref")
    wait_chains(bus, ["A.qcow2", "F.qcow2"])
    all_clean(bus)
