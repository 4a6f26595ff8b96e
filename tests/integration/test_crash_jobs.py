# SPDX-License-Identifier: LGPL-2.1-or-later
"""kill -9 of the daemon at random moments during stream, commit and backup jobs:
afterwards every image passes qemu-img check without corruption, the
chain's guest-visible data is unchanged, and the backing pointer is either
the old one or the new one, never anything else."""
import json
import os
import random
import shutil
import signal
import time

import pytest

from bustest import kill_daemon, qemu_img, qemu_io

M = "/org/diskchain/DiskChain1"
ROUNDS = int(os.environ.get("DISKCHAIN_CRASH_ROUNDS", "6"))


def build_pristine(d):
    qemu_img("create", "-q", "-f", "qcow2", os.path.join(d, "A.qcow2"), "16M")
    qemu_io(os.path.join(d, "A.qcow2"), "write -P 0xa 0 16M")
    for lower, name, cmd in (("A", "B", "write -P 0xb 2M 6M"), ("B", "C", "write -P 0xc 4M 6M"),
                             ("C", "D", "write -P 0xd 6M 2M")):
        qemu_img("create", "-q", "-f", "qcow2", "-b", f"{lower}.qcow2", "-F", "qcow2", os.path.join(d, f"{name}.qcow2"))
        qemu_io(os.path.join(d, f"{name}.qcow2"), cmd)
    qemu_img("convert", "-O", "raw", os.path.join(d, "D.qcow2"), os.path.join(d, "D.ref"))


@pytest.mark.parametrize("kind", ["stream", "commit", "backup"])
def test_kill_during_job(bus, kind):
    pristine = os.path.join(bus.dir, "pristine")
    os.mkdir(pristine)
    build_pristine(pristine)
    rng = random.Random({"stream": 1234, "commit": 4321, "backup": 2468}[kind])
    for _ in range(ROUNDS):
        for n in "ABCD":
            shutil.copy(os.path.join(pristine, f"{n}.qcow2"), os.path.join(bus.root, f"{n}.qcow2"))
        target = os.path.join(bus.root, "backup.qcow2")
        if os.path.exists(target):
            os.unlink(target)
        time.sleep(0.4)  # the daemon's model catches up with the new files
        chain = json.loads(bus.call(M, "Manager", "GetChain", "s", "D.qcow2").stdout)["data"][0]
        if kind == "stream":
            args = ["Stream", "a{sv}", "2", "base", "s", "A.qcow2", "speed", "t", str(8 << 20)]
        elif kind == "commit":
            args = ["Commit", "a{sv}", "3", "top", "s", "C.qcow2", "base", "s", "A.qcow2", "speed", "t", str(8 << 20)]
        else:
            args = ["Backup", "sa{sv}", "backup.qcow2", "2", "compress", "b", rng.choice(["true", "false"]),
                    "speed", "t", str(8 << 20)]
        bus.call(chain, "Chain", *args)
        time.sleep(rng.uniform(0.0, 1.8))
        kill_daemon(bus)
        for n in "ABCD" + ("T" if kind == "backup" else ""):
            f = os.path.join(bus.root, "backup.qcow2" if n == "T" else f"{n}.qcow2")
            p = qemu_img("check", f, check=False)
            assert p.returncode in (0, 3), f"{kind}: {n} after kill: exit {p.returncode}\n{p.stdout}{p.stderr}"
        p = qemu_img("compare", "-F", "raw", os.path.join(bus.root, "D.qcow2"), os.path.join(pristine, "D.ref"),
                     check=False)
        assert p.returncode == 0, f"{kind}: guest data changed after kill: {p.stdout}"
        info = json.loads(qemu_img("info", "--output=json", os.path.join(bus.root, "D.qcow2")).stdout)
        # stream rewrites D's backing, commit rewrites D's too (C's overlay):
        # either the old pointer or the new one, whole; backup leaves it alone
        expect = ("C.qcow2",) if kind == "backup" else ("C.qcow2", "A.qcow2")
        assert info.get("backing-filename") in expect, info.get("backing-filename")


@pytest.mark.parametrize("kind", ["mirror", "active-commit"])
def test_kill_during_job_with_pivot(bus, kind):
    """A mirror or active commit killed at any moment, also around Complete():
    the pivot is done on disk entirely (recorded in the daemon's records, the
    new active layer holding the guest's data) or not at all (the old chain as
    it was), and the restarted daemon publishes exactly one of the two chains.
    The next round copies fresh files over the old ones: a layer written in
    place after a pivot is no longer superseded."""
    pristine = os.path.join(bus.dir, "pristine")
    os.mkdir(pristine)
    build_pristine(pristine)
    rng = random.Random({"mirror": 1357, "active-commit": 7531}[kind])
    new_top = "E.qcow2" if kind == "mirror" else "A.qcow2"
    pivots = 0
    for _ in range(ROUNDS):
        for n in "ABCD":
            shutil.copy(os.path.join(pristine, f"{n}.qcow2"), os.path.join(bus.root, f"{n}.qcow2"))
        if os.path.exists(os.path.join(bus.root, "E.qcow2")):
            os.unlink(os.path.join(bus.root, "E.qcow2"))
        time.sleep(0.4)
        chain = json.loads(bus.call(M, "Manager", "GetChain", "s", "D.qcow2").stdout)["data"][0]
        if kind == "mirror":
            args = ["Mirror", "sa{sv}", "E.qcow2", "3", "sync", "s", rng.choice(["full", "top"]), "speed", "t",
                    str(16 << 20), "job-id", "s", "cj"]
        else:
            args = ["Commit", "a{sv}", "2", "speed", "t", str(16 << 20), "job-id", "s", "cj"]
        job = json.loads(bus.call(chain, "Chain", *args).stdout)["data"][0]
        deadline = time.monotonic() + rng.uniform(0.2, 2.0)
        completed = False
        while time.monotonic() < deadline:
            st = bus.busctl("--json=short", "get-property", "org.diskchain.DiskChain1", job,
                            "org.diskchain.DiskChain1.Job", "Ready", check=False).stdout
            if not completed and '"data":true' in st and rng.random() < 0.5:
                bus.call(job, "Job", "Complete", check=False)
                completed = True
                deadline = time.monotonic() + rng.uniform(0.0, 0.3)
            time.sleep(0.05)
        kill_daemon(bus)
        files = [f for f in ("A", "B", "C", "D", "E") if os.path.exists(os.path.join(bus.root, f"{f}.qcow2"))]
        for n in files:
            p = qemu_img("check", os.path.join(bus.root, f"{n}.qcow2"), check=False)
            assert p.returncode in (0, 3), f"{kind}: {n} after kill: exit {p.returncode}\n{p.stdout}{p.stderr}"
        # the restarted daemon (bus activation) says whether the pivot happened: its record of it
        # is the pivot's commit point
        g = bus.call(M, "Manager", "GetChain", "s", "D.qcow2", check=False)
        assert g.returncode == 0 or "was replaced by" in g.stderr, g.stderr
        pivoted = g.returncode != 0
        # the guest's data is where the published chain says it is
        p = qemu_img("compare", "-U", "-F", "raw", os.path.join(bus.root, new_top if pivoted else "D.qcow2"),
                     os.path.join(pristine, "D.ref"), check=False)
        assert p.returncode == 0, f"{kind}: guest data changed after kill (pivoted={pivoted}): {p.stdout}"
        if not pivoted:
            info = json.loads(qemu_img("info", "--output=json", os.path.join(bus.root, "D.qcow2")).stdout)
            assert info.get("backing-filename") == "C.qcow2"
        pivots += pivoted
        # the daemon comes back (bus activation) with the old chain or the new one, not both
        # (a target left half-copied by an unfinished mirror is an image of its own)
        want = (new_top if pivoted else "D.qcow2").replace(".", "_2e")
        for _ in range(50):
            chains = json.loads(bus.call(M, "Manager", "ListChains").stdout)["data"][0]
            if any(c.endswith("_2f" + want) for c in chains):
                break
            time.sleep(0.1)
        assert any(c.endswith("_2f" + want) for c in chains), (want, chains)
        if pivoted:
            assert not any(c.endswith("_2fD_2eqcow2") for c in chains), chains
    print(f"{kind}: {pivots} of {ROUNDS} rounds were killed after the pivot")
