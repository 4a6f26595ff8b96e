# SPDX-License-Identifier: LGPL-2.1-or-later
"""Backup plans (diskchain.plan(5)): months of nightly runs simulated with the plans' test clock
(DISKCHAIN_TEST_CLOCK_FILE, never a sleep), writes between them, a run killed half-way, a backup
file damaged on purpose; at the end the kept restore points are exactly the ones the retention rules
name (computed here independently, as restic computes them), each restores byte-identical to the
disk at its time, and qemu-img check is clean on every file. Also: creating, changing and deleting
plans over the bus, polkit's word on each, runs that would overlap, and bad plans."""
import calendar
import hashlib
import json
import os
import random
import subprocess
import time
from pathlib import Path

import pytest

from bustest import CTL, TEST_USER, Bus, finish, kill_daemon, qemu_img, qemu_io
from nbdservers import servers, start, stop, wait_socket  # noqa: F401 (servers: autouse, no server outlives its test)
from test_bus import M, data, prop
from test_export import wait_for

MiB = 1 << 20
SIZE = 24 * MiB
T0 = calendar.timegm((2026, 1, 5, 1, 30, 0))  # a Monday night, 01:30 UTC
DAY = 86400


@pytest.fixture
def pbus(request, tmp_path):
    clock = tmp_path / "clock"
    clock.write_text(str(T0))
    b = Bus(prefix=f"TZ=UTC DISKCHAIN_TEST_CLOCK_FILE={clock} ")
    b.clock, b.plans = clock, Path(b.dir) / "plans.d"
    yield b
    finish(request, b)


def set_clock(bus, t):
    bus.clock.write_text(str(int(t)))


def plan_obj(name):
    return f"{M}/plan/{name}"


def points(bus, name="vm"):
    return prop(bus, plan_obj(name), "Plan", "RestorePoints")


def content_hash(tmp, img):
    raw = tmp / "content.raw"
    qemu_img("convert", "-U", "-O", "raw", img, raw)
    h = hashlib.sha256(raw.read_bytes()).hexdigest()
    raw.unlink()
    return h


def restic_keep(times, keep):
    """restic's policy (internal/data/snapshot_policy.go, 0.16+), newest first: a point is kept when it
    opens a new period of a rule that has periods left, and the oldest while a rule has; no rule keeps all
    (as Proxmox; restic refuses); the newest is always kept (ours)."""
    rules = [("last", lambda t, i: i), ("hourly", lambda t, i: time.strftime("%Y%m%d%H", time.gmtime(t))),
             ("daily", lambda t, i: time.strftime("%Y%m%d", time.gmtime(t))),
             ("weekly", lambda t, i: time.strftime("%G%V", time.gmtime(t))),
             ("monthly", lambda t, i: time.strftime("%Y%m", time.gmtime(t))),
             ("yearly", lambda t, i: time.strftime("%Y", time.gmtime(t)))]
    left = {r: keep.get(r, 0) for r, _ in rules}
    last = {r: None for r, _ in rules}
    kept = set()
    order = sorted(times, reverse=True)
    for i, t in enumerate(order):
        for r, f in rules:
            if left[r] > 0:
                v = f(t, i)
                if v != last[r] or i == len(order) - 1:  # restic >= 0.16 keeps the oldest while a count is left
                    last[r] = v
                    left[r] -= 1
                    kept.add(t)
    if not any(keep.values()):
        kept = set(times)
    if order:
        kept.add(order[0])
    return kept


def test_months_of_nightly_backups(pbus, tmp_path):
    """Ten weeks of nightly runs (auto: a full backup every 7 runs, incrementals between; keep 7 daily,
    4 weekly and 2 monthly), a guest's writes between runs; day 23's run killed with -9 while it
    copies (the next run must be full, and its leftover file goes); day 40's newest backup file
    damaged (Verify fails and names it; put back, it verifies again); every kept point restored."""
    bus = pbus
    r = bus.root
    disk = os.path.join(r, "vm.qcow2")
    rng = random.Random(42)
    qemu_img("create", "-q", "-f", "qcow2", disk, str(SIZE))
    (tmp_path / "fill").write_bytes(rng.randbytes(16 * MiB))
    qemu_io(disk, f"write -s {tmp_path / 'fill'} 0 16M")
    out = bus.ctl("plan", "create", "vm", "--chain", "vm.qcow2", "--destination", "backups/vm", "--schedule",
                  "*-*-* 01:30:00", "--level", "auto", "--full-every", "7", "--keep-daily", "7", "--keep-weekly",
                  "4", "--keep-monthly", "2").stdout
    assert "created" in out, out
    text = (bus.plans / "vm.conf").read_text()
    assert "Chain=" + disk in text and "KeepWeekly=4" in text and "Schedule=*-*-* 01:30:00" in text, text
    want = {}          # point time -> content hash at that time
    levels = []
    for day in range(70):
        t = T0 + day * DAY + rng.randrange(0, 3600)
        set_clock(bus, t)
        # the guest's day: new data here and there, zeros, a discard
        ops = []
        for _ in range(rng.randrange(3, 9)):
            off = rng.randrange(0, SIZE // 4096 - 64) * 4096
            blob = tmp_path / "blob"
            blob.write_bytes(rng.randbytes(rng.randrange(1, 64) * 4096))
            ops.append(f"write -s {blob} {off} {blob.stat().st_size}")
            qemu_io(disk, ops[-1])
        if day % 9 == 4:
            qemu_io(disk, f"write -z {rng.randrange(0, SIZE // MiB - 1)}M 64k")
        if day == 23:
            # a run killed while it copies: slow it down, start it, kill the daemon
            qemu_io(disk, f"write -s {tmp_path / 'fill'} 0 8M")
            bus.ctl("plan", "edit", "vm", "--speed", str(2 * MiB))
            run = subprocess.Popen([CTL, "plan", "run", "vm"], env={**os.environ, **bus.env}, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            wait_for(lambda: prop(bus, plan_obj("vm"), "Plan", "Job") != "/", "the run starts")
            job = prop(bus, plan_obj("vm"), "Plan", "Job")
            wait_for(lambda: prop(bus, job, "Job", "CurrentProgress") > 0, "the run copies")
            leftover = prop(bus, job, "Job", "Target")
            kill_daemon(bus)
            _, err = run.communicate(timeout=60)
            assert run.returncode == 1 and "without an outcome" in err, (run.returncode, err)
            assert os.path.exists(leftover)
            bus.ctl("plan", "edit", "vm", "--speed", "0")
            assert prop(bus, plan_obj("vm"), "Plan", "Running") is False
            set_clock(bus, t + 600)
            t += 600
        h = content_hash(tmp_path, disk)
        p = bus.ctl("plan", "run", "vm", check=False)
        assert p.returncode == 0, (day, p.stdout, p.stderr)
        res = prop(bus, plan_obj("vm"), "Plan", "LastResult")
        assert res.startswith("success"), res
        level = res.split()[1]
        levels.append(level)
        if day == 23:
            assert level == "full", res  # the killed run's bitmap cannot be trusted
            assert not os.path.exists(leftover)
        want[t] = h
        assert prop(bus, plan_obj("vm"), "Plan", "LastRun") == t * 1000000
        if day == 40:
            newest = points(bus)[-1]
            f = newest[3]
            saved = (tmp_path / "saved").write_bytes(open(f, "rb").read())
            with open(f, "r+b") as fd:
                fd.seek(os.path.getsize(f) - 4096)
                fd.write(rng.randbytes(4096))
            p = bus.ctl("plan", "verify", "vm", check=False)
            assert p.returncode != 0 and newest[0] in p.stderr and f in p.stderr, p.stderr
            assert [x[5] for x in points(bus) if x[0] == newest[0]] == ["damaged"]
            p = bus.ctl("plan", "restore", "vm", newest[0], "nope.qcow2", check=False)
            assert p.returncode != 0 and "damaged" in p.stderr, p.stderr
            with open(f, "wb") as fd:
                fd.write((tmp_path / "saved").read_bytes())
            assert saved
            bus.ctl("plan", "verify", "vm", "--point", newest[0])
            assert [x[5] for x in points(bus) if x[0] == newest[0]] == ["verified"]
    # auto: a full every 7 runs, incrementals between (and the one after the kill)
    assert levels[0] == "full" and levels.count("full") >= 10 and levels.count("incremental") >= 50, levels
    kept = points(bus)
    assert {x[1] // 1000000 for x in kept} == restic_keep(list(want), {"daily": 7, "weekly": 4, "monthly": 2})
    files = sorted(os.listdir(os.path.join(r, "backups/vm")))
    assert files == sorted(os.path.basename(x[3]) for x in kept), files  # nothing pruned is left behind
    bus.ctl("plan", "verify", "vm")
    for x in kept:
        qemu_img("check", x[3])
        target = f"restored-{x[0]}.qcow2"
        out = bus.ctl("plan", "restore", "vm", x[0], target).stdout
        assert "completed" in out, out
        qemu_img("check", os.path.join(r, target))
        assert content_hash(tmp_path, os.path.join(r, target)) == want[x[1] // 1000000], x
    # a dry run says what would go, and nothing more goes now
    out = bus.ctl("plan", "prune", "vm", "--dry-run").stdout
    assert "remove" not in out and out.count(": keep") == len(kept), out
    assert f"{kept[-1][0]}: keep (daily weekly monthly)" in out, out
    # the runs' structured journal fields
    log = open(bus.log).read()
    assert "DISKCHAIN_PLAN=vm DISKCHAIN_CHAIN=" + disk in log and "DISKCHAIN_RESULT=success" in log


def test_plan_lifecycle_and_refusals(pbus, tmp_path):
    """Create, change and delete over the bus (the daemon writes the file), each its own polkit
    action; a run while the last one goes is refused with its own error (diskchainctl exits 75);
    bad settings are refused with what is wrong; a hand-written plan that does not parse is left
    out, and the daemon says why."""
    bus = pbus
    r = bus.root
    disk = os.path.join(r, "vm.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", disk, "16M")
    qemu_io(disk, "write -P 7 0 12M")
    bus.plans.mkdir()
    (bus.plans / "broken.conf").write_text("[Plan]\nChain=vm.qcow2\nDestination=/etc\n")
    (bus.plans / "typo.conf").write_text(f"[Plan]\nChain=vm.qcow2\nDestination={r}/b\nKeepDailly=3\n")
    assert data(bus.call(M, "Manager", "ListPlans")) == [[]]
    log = open(bus.log).read()
    assert "plan 'broken' (" in log and "not inside the storage roots" in log, log[-2000:]
    assert "unknown key KeepDailly=" in log
    # refusals, each naming the problem
    for args, err in [(["--chain", "vm.qcow2", "--destination", "/etc/x"], "not inside the storage roots"),
                      (["--chain", "nosuch.qcow2", "--destination", "b"], "nosuch.qcow2"),
                      (["--chain", "vm.qcow2", "--destination", "b", "--level", "weekly"], "level 'weekly'"),
                      (["--chain", "vm.qcow2", "--destination", "b", "--schedule", "every tuesday-ish"],
                       "no calendar event"),
                      (["--chain", "vm.qcow2", "--destination", "b", "--full-every", "0"], "FullEvery=")]:
        p = bus.ctl("plan", "create", "p1", *args, check=False)
        assert p.returncode != 0 and err in p.stderr, (args, p.stderr)
    p = bus.gdbus("--object-path", M, "--method", "org.diskchain.DiskChain1.Manager.CreatePlan", "../x",
                  "{'chain': <'vm.qcow2'>}", check=False)
    assert "InvalidArgs" in p.stderr and "must be 1..64" in p.stderr, p.stderr
    # polkit: the unprivileged test user may do none of it
    p = bus.gdbus("--object-path", M, "--method", "org.diskchain.DiskChain1.Manager.CreatePlan", "vm",
                  "{'chain': <'vm.qcow2'>, 'destination': <'b'>}", check=False, user=TEST_USER)
    assert ("AccessDenied" in p.stderr or "InteractiveAuthorizationRequired" in p.stderr) and \
        "plan-create" in p.stderr, p.stderr
    assert not (bus.plans / "vm.conf").exists()
    bus.ctl("plan", "create", "vm", "--chain", "vm.qcow2", "--destination", "b", "--keep-last", "2", "--speed",
            str(4 * MiB))
    p = bus.ctl("plan", "create", "vm", "--chain", "vm.qcow2", "--destination", "b", check=False)
    assert p.returncode != 0 and "exists already" in p.stderr
    for method, args, action in [("Run", [], "plan-run"), ("Delete", [], "plan-delete"),
                                 ("Change", ["{'level': <'full'>}"], "plan-change"),
                                 ("Prune", ["{}"], "plan-prune"), ("Verify", ["{}"], "plan-verify")]:
        p = bus.gdbus("--object-path", plan_obj("vm"), "--method", f"org.diskchain.DiskChain1.Plan.{method}", *args,
                      check=False, user=TEST_USER)
        assert p.returncode != 0 and action in p.stderr, (method, p.stderr)
    # two runs never overlap: the second says so, with its own exit status
    job = bus.ctl("plan", "run", "vm", "--no-wait").stdout.strip()
    p = bus.ctl("plan", "run", "vm", check=False)
    assert p.returncode == 75 and "still going" in p.stderr, (p.returncode, p.stderr)
    p = bus.gdbus("--object-path", plan_obj("vm"), "--method", "org.diskchain.DiskChain1.Plan.Run", check=False)
    assert "org.diskchain.DiskChain1.Error.PlanRunning" in p.stderr, p.stderr
    p = bus.ctl("plan", "delete", "vm", check=False)
    assert p.returncode != 0 and "running" in p.stderr
    assert prop(bus, plan_obj("vm"), "Plan", "Job") == job
    wait_for(lambda: prop(bus, plan_obj("vm"), "Plan", "Running") is False, "the run ends", timeout=30)
    assert prop(bus, plan_obj("vm"), "Plan", "LastResult").startswith("success: full backup")
    # changed: the file says so, the properties too
    bus.ctl("plan", "edit", "vm", "--level", "full", "--keep-daily", "3", "--schedule", "weekly")
    text = (bus.plans / "vm.conf").read_text()
    assert "Level=full" in text and "KeepDaily=3" in text and "KeepLast=2" in text and "Schedule=weekly" in text
    assert prop(bus, plan_obj("vm"), "Plan", "Retention") == {"KeepLast": 2, "KeepDaily": 3}
    assert prop(bus, plan_obj("vm"), "Plan", "NextRun") > 0
    show = json.loads(bus.ctl("--json", "plan", "show", "vm").stdout)
    assert show["level"] == "full" and len(show["restore_points"]) == 1, show
    # deleted: the file and the object go, the backups stay
    backups = os.listdir(os.path.join(r, "b"))
    bus.ctl("plan", "delete", "vm")
    assert not (bus.plans / "vm.conf").exists()
    assert data(bus.call(M, "Manager", "ListPlans")) == [[]]
    assert os.listdir(os.path.join(r, "b")) == backups and len(backups) == 1


def test_instant_recovery(pbus, tmp_path):
    """Restore with live: the point is served at once over NBD, writable, its writes going to the new
    overlay, while a stream copies the backup in; a client reads the point's content and writes
    through it all along; when the copy is done the image stands alone (no backing file) and holds the
    point plus the client's writes; meanwhile the plan's files are held, so a prune cannot take them."""
    import nbd
    bus = pbus
    r = bus.root
    disk = os.path.join(r, "vm.qcow2")
    rng = random.Random(5)
    qemu_img("create", "-q", "-f", "qcow2", disk, str(SIZE))
    (tmp_path / "fill").write_bytes(rng.randbytes(SIZE))
    qemu_io(disk, f"write -s {tmp_path / 'fill'} 0 {SIZE}")
    bus.ctl("plan", "create", "vm", "--chain", "vm.qcow2", "--destination", "backups/vm", "--keep-last", "2")
    bus.ctl("plan", "run", "vm")
    set_clock(bus, T0 + DAY)
    qemu_io(disk, "write -P 9 1M 3M")
    bus.ctl("plan", "run", "vm")
    qemu_io(disk, "write -P 10 5M 1M")  # after the point: not in it
    point = points(bus)[-1]
    want = bytearray((tmp_path / "fill").read_bytes())
    want[MiB:4 * MiB] = b"\x09" * (3 * MiB)
    bus.ctl("plan", "edit", "vm", "--speed", str(8 * MiB))  # (a restore has its own speed: none)
    out = bus.ctl("plan", "restore", "vm", point[0], "live.qcow2", "--live", "--name", "rescue", "--no-wait").stdout
    assert "served at nbd+unix:///rescue?socket=" in out, out
    uri = prop(bus, f"{M}/export/rescue", "Export", "Uri")
    h = nbd.NBD()
    h.connect_uri(uri)
    got = bytearray()
    for off in range(0, SIZE, 4 * MiB):
        got += h.pread(4 * MiB, off)
    assert got == want  # the point, at once
    h.pwrite(b"\x0b" * 65536, 7 * MiB)
    want[7 * MiB:7 * MiB + 65536] = b"\x0b" * 65536
    h.flush()
    # the backups are held while the copy needs them
    bus.ctl("plan", "edit", "vm", "--keep-last", "1")
    p = bus.ctl("plan", "prune", "vm", check=False)
    assert p.returncode != 0 and "exported over NBD as 'rescue'" in p.stderr, (p.stdout, p.stderr)
    wait_for(lambda: "backing-filename" not in json.loads(qemu_img("info", "-U", "--output=json",
                                                                 os.path.join(r, "live.qcow2")).stdout),
             "the copy ends and the overlay stands alone", timeout=60)
    got = bytearray()
    for off in range(0, SIZE, 4 * MiB):
        got += h.pread(4 * MiB, off)
    assert got == want  # the point plus the client's write, after the copy too
    h.shutdown()
    bus.call(f"{M}/export/rescue", "Export", "Stop")
    qemu_img("check", os.path.join(r, "live.qcow2"))
    out = bus.ctl("plan", "prune", "vm").stdout  # free now: the recovered image needs no backup
    assert "removed" in out, out
    raw = tmp_path / "live.raw"
    qemu_img("convert", "-O", "raw", os.path.join(r, "live.qcow2"), raw)
    assert raw.read_bytes() == bytes(want)
    # the refusals: raw, an existing target
    p = bus.ctl("plan", "restore", "vm", point[0], "live.qcow2", "--live", check=False)
    assert p.returncode != 0 and "already exists" in p.stderr, p.stderr
    p = bus.ctl("plan", "restore", "vm", point[0], "x.raw", "--live", "--format", "raw", check=False)
    assert p.returncode != 0 and "raw does not go with live" in p.stderr, p.stderr


@pytest.mark.parametrize("case", ["restic-a", "restic-b"])
def test_retention_examples(pbus, case):
    """restic's own arithmetic, worked by hand: ten daily points with keep-last 2 and keep-daily 3 keep
    the newest three (Proxmox would keep five); two points on one day and one the next with keep-daily
    5 keep all three, the oldest because a rule still has room (restic 0.16)."""
    bus = pbus
    qemu_img("create", "-q", "-f", "qcow2", os.path.join(bus.root, "d.qcow2"), "1M")
    if case == "restic-a":
        times = [T0 + d * DAY + 10 * 3600 for d in range(10)]
        keep = ["--keep-last", "2", "--keep-daily", "3"]
        want = times[-3:]
    else:
        times = [T0 + 8 * 3600, T0 + 20 * 3600, T0 + DAY + 12 * 3600]
        keep = ["--keep-daily", "5"]
        want = times
    bus.ctl("plan", "create", "d", "--chain", "d.qcow2", "--destination", "b", "--level", "full", *keep)
    for t in times:
        set_clock(bus, t)
        bus.ctl("plan", "run", "d")
    assert [x[1] // 1000000 for x in points(bus, "d")] == want
    assert sorted(restic_keep(times, {"last": 2, "daily": 3} if case == "restic-a" else {"daily": 5})) == want


def test_restore_as_a_chain_keeps_its_backup(pbus, tmp_path):
    """Restore with chain: a new overlay of the backup, ready at once (the call answers '/', no job),
    reading as the disk did; while it exists its point is kept by the prune, whatever the rules say,
    and the dry run says why."""
    bus = pbus
    r = bus.root
    disk = os.path.join(r, "vm.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", disk, "8M")
    qemu_io(disk, "write -P 3 0 8M")
    bus.ctl("plan", "create", "vm", "--chain", "vm.qcow2", "--destination", "backups", "--keep-last", "1",
            "--level", "full")
    bus.ctl("plan", "run", "vm")
    first = points(bus)[0]
    want = content_hash(tmp_path, disk)
    out = bus.ctl("plan", "restore", "vm", first[0], "backups/thin.qcow2", "--chain").stdout
    assert "restored as an overlay of the backup" in out, out
    thin = os.path.join(r, "backups/thin.qcow2")
    assert json.loads(qemu_img("info", "--output=json", thin).stdout)["backing-filename"] == \
        os.path.basename(first[3])
    assert content_hash(tmp_path, thin) == want
    qemu_io(disk, "write -P 4 0 1M")
    set_clock(bus, T0 + DAY)
    bus.ctl("plan", "run", "vm")  # keep-last 1 would drop the first point: the overlay keeps it
    assert [x[0] for x in points(bus)] == [first[0], points(bus)[1][0]]
    out = bus.ctl("plan", "prune", "vm", "--dry-run").stdout
    assert f"{first[0]}: keep (the backing file of '{thin}')" in out, out
    assert content_hash(tmp_path, thin) == want
    os.unlink(thin)
    wait_for(lambda: "remove" in bus.ctl("plan", "prune", "vm", "--dry-run").stdout, "the overlay is gone")
    bus.ctl("plan", "prune", "vm")
    assert len(points(bus)) == 1


def test_pull_mode_runs_under_a_writing_guest(pbus, tmp_path):
    """Mode=pull: each run reads a point-in-time view of the disk whose copy-before-write data goes
    into a fleecing image beside the disk (removed at the end), not into the backup; a guest writing
    through a live export all over the disk while a slowed run copies does not reach the point, which
    restores as the disk was when the run started; the incremental after it too."""
    import nbd
    from test_bus import data as _data
    from test_export import export, uri_of
    bus = pbus
    r = bus.root
    disk = os.path.join(r, "vm.qcow2")
    rng = random.Random(9)
    qemu_img("create", "-q", "-f", "qcow2", disk, str(16 * MiB))
    (tmp_path / "fill").write_bytes(rng.randbytes(16 * MiB))
    qemu_io(disk, f"write -s {tmp_path / 'fill'} 0 16M")
    bus.ctl("plan", "create", "vm", "--chain", "vm.qcow2", "--destination", "backups", "--mode", "pull",
            "--speed", str(4 * MiB))
    assert "Mode=pull" in (bus.plans / "vm.conf").read_text()
    assert prop(bus, plan_obj("vm"), "Plan", "Mode") == "pull"
    chain = _data(bus.call(M, "Manager", "GetChain", "s", "vm.qcow2"))[0]
    fleece = os.path.join(r, "vm.fleece-plan-vm.qcow2")
    # a file of the fleecing image's name is somebody's: the run fails, saying so, and leaves it
    with open(fleece, "wb") as f:
        f.write(b"not ours")
    p = bus.ctl("plan", "run", "vm", check=False)
    assert p.returncode != 0 and "in the way of the plan's fleecing image" in p.stderr, p.stderr
    assert open(fleece, "rb").read() == b"not ours"
    os.unlink(fleece)
    # a run whose job cannot start (the chain is another job's) leaves no fleecing image behind
    other = _data(bus.call(chain, "Chain", "Backup", "sa{sv}", "other.qcow2", "1", "speed", "t", str(MiB)))[0]
    p = bus.ctl("plan", "run", "vm", check=False)
    assert p.returncode != 0 and "in use by job" in p.stderr, p.stderr
    wait_for(lambda: not os.path.exists(fleece), "the run's fleecing image is removed")
    assert prop(bus, plan_obj("vm"), "Plan", "Running") is False  # and the plan can run again
    assert "in use by job" in prop(bus, plan_obj("vm"), "Plan", "LastResult")
    bus.call(other, "Job", "Cancel", "b", "false")
    wait_for(lambda: prop(bus, chain, "Chain", "Jobs") == [], "the other job ends")
    exp = export(bus, chain, ("writable", "b", "true"), ("name", "s", "vm"))
    h = nbd.NBD()
    h.connect_uri(uri_of(bus, exp))
    for day in range(2):
        set_clock(bus, T0 + day * DAY)
        want = content_hash(tmp_path, disk)
        job = bus.ctl("plan", "run", "vm", "--no-wait").stdout.strip()
        if day == 0:
            wait_for(lambda: prop(bus, job, "Job", "CurrentProgress") > 0, "the run copies")
            assert os.path.exists(fleece)
            for off in range(0, 16 * MiB, MiB):  # the guest writes all over while the copy goes on
                h.pwrite(bytes([day + 1]) * 65536, off + 65536)
            h.flush()
            assert prop(bus, job, "Job", "Status") == "running", "the writes came while the run copied"
        wait_for(lambda: prop(bus, plan_obj("vm"), "Plan", "Running") is False, "the run ends", timeout=60)
        res = prop(bus, plan_obj("vm"), "Plan", "LastResult")
        assert res.startswith("success: " + ("full" if day == 0 else "incremental")), res
        assert not os.path.exists(fleece)
        point = points(bus)[-1]
        target = f"restored{day}.qcow2"
        bus.ctl("plan", "restore", "vm", point[0], target)
        assert content_hash(tmp_path, os.path.join(r, target)) == want, day
        qemu_img("check", point[3])
        # the next day's writes
        h.pwrite(b"\x07" * 4096, (day + 3) * MiB)
        h.flush()
    h.shutdown()


def test_replica_on_an_nbd_server(pbus, tmp_path):
    """Destination= an NBD URI: a replica, one export on another server (qemu-nbd) updated in place.
    The first run is full, the next ones send only what the bitmap says changed; the one restore point
    is the export's latest state, with checksums read back; a byte changed on the server fails Verify,
    naming the URI and the range, and makes the next run full; a run killed half-way leaves no point
    and the next run full; a restore copies the export into a new image, byte-identical; what a
    replica cannot do is refused with the reason."""
    import nbd
    bus = pbus
    r = bus.root
    disk = os.path.join(r, "vm.qcow2")
    rng = random.Random(11)
    qemu_img("create", "-q", "-f", "qcow2", disk, str(SIZE))
    (tmp_path / "fill").write_bytes(rng.randbytes(SIZE))
    qemu_io(disk, f"write -s {tmp_path / 'fill'} 0 {SIZE}")
    remote = tmp_path / "remote.qcow2"  # on "another host": outside the storage roots
    qemu_img("create", "-q", "-f", "qcow2", remote, str(SIZE))
    sock = tmp_path / "nbd.sock"
    server = start(["qemu-nbd", "-f", "qcow2", "-t", "-e", "4", "-x", "replica", "--socket", sock, remote])
    wait_socket(str(sock), server)
    uri = f"nbd+unix:///replica?socket={sock}"

    # what a replica cannot be
    for extra, why in ((["--keep-daily", "7"], "retention needs a directory"),
                       (["--level", "differential"], "Level=incremental or auto"),
                       (["--compress"], "compressed clusters")):
        p = bus.ctl("plan", "create", "rep", "--chain", "vm.qcow2", "--destination", uri, *extra, check=False)
        assert p.returncode != 0 and why in p.stderr, (extra, p.stderr)
    p = bus.ctl("plan", "create", "rep", "--chain", "vm.qcow2", "--destination", "nbd+unix:///x?bogus=1",
                check=False)
    assert p.returncode != 0 and "Destination=" in p.stderr, p.stderr
    bus.ctl("plan", "create", "rep", "--chain", "vm.qcow2", "--destination", uri, "--level", "auto",
            "--full-every", "4")
    assert prop(bus, plan_obj("rep"), "Plan", "Destination") == uri
    assert f"Destination={uri}" in (bus.plans / "rep.conf").read_text()

    def run(day, level):
        set_clock(bus, T0 + day * DAY)
        want = content_hash(tmp_path, disk)
        bus.ctl("plan", "run", "rep")
        res = prop(bus, plan_obj("rep"), "Plan", "LastResult")
        assert res.startswith(f"success: {level} backup"), (day, res)
        pts = points(bus, "rep")
        assert len(pts) == 1 and pts[0][2] == level and pts[0][3] == uri, pts
        return want, res

    def remote_content():
        h = nbd.NBD()
        h.connect_uri(uri)
        c = hashlib.sha256()
        for off in range(0, SIZE, 4 * MiB):
            c.update(h.pread(4 * MiB, off))
        h.shutdown()
        return c.hexdigest()

    want, _ = run(0, "full")
    assert remote_content() == want
    # a day of writes: the incremental sends those, not the disk
    qemu_io(disk, "write -P 3 2M 1M")
    qemu_io(disk, "write -z 9M 256k")
    want, res = run(1, "incremental")
    assert remote_content() == want
    sent = int(res.split(", ")[1].split()[0])
    assert sent <= 2 * MiB, res
    out = bus.ctl("plan", "verify", "rep").stdout
    assert "read back over NBD" in out, out
    assert points(bus, "rep")[0][5] == "verified"

    # the server's disk changes behind the plan's back: Verify says where, and the next run is full
    h = nbd.NBD()
    h.connect_uri(uri)
    h.pwrite(b"\xee" * 4096, 70 * MiB % SIZE)
    h.flush()
    h.shutdown()
    p = bus.ctl("plan", "verify", "rep", check=False)
    assert p.returncode != 0 and uri in p.stderr and "bytes 0..25165824 changed" in p.stderr, p.stderr
    point = points(bus, "rep")[0]
    assert point[5] == "damaged"
    p = bus.ctl("plan", "restore", "rep", point[0], "nope.qcow2", check=False)
    assert p.returncode != 0 and "damaged" in p.stderr, p.stderr
    qemu_io(disk, "write -P 4 5M 64k")
    want, _ = run(2, "full")
    assert remote_content() == want

    # a run killed while it writes the export: no point survives it, and the next run is full
    qemu_io(disk, f"write -s {tmp_path / 'fill'} 0 8M")
    bus.ctl("plan", "edit", "rep", "--level", "incremental", "--speed", str(2 * MiB))
    set_clock(bus, T0 + 3 * DAY)
    job = bus.ctl("plan", "run", "rep", "--no-wait").stdout.strip()
    assert prop(bus, job, "Job", "Speed") == 2 * MiB  # the plan's speed reaches a replica's job too
    wait_for(lambda: prop(bus, job, "Job", "CurrentProgress") > 0, "the run copies")
    assert points(bus, "rep") == []  # the export is no point while it changes
    kill_daemon(bus)
    bus.ctl("plan", "edit", "rep", "--speed", "0")
    assert points(bus, "rep") == []
    qemu_io(disk, "write -P 6 12M 64k")
    want, _ = run(4, "full")
    assert remote_content() == want
    qemu_io(disk, "write -P 7 1M 64k")
    want, _ = run(5, "incremental")
    assert remote_content() == want

    # restore: flattened only, into a new image, byte-identical; the export stays as it was
    point = points(bus, "rep")[0]
    for opt, why in (("--live", "no image can have as its backing file"), ("--chain", "restore it flattened")):
        p = bus.ctl("plan", "restore", "rep", point[0], "x.qcow2", opt, check=False)
        assert p.returncode != 0 and why in p.stderr, (opt, p.stderr)
    bus.ctl("plan", "restore", "rep", point[0], "restored.qcow2")
    restored = os.path.join(r, "restored.qcow2")
    qemu_img("check", restored)
    assert content_hash(tmp_path, restored) == want
    bus.ctl("plan", "restore", "rep", point[0], "restored.raw", "--format", "raw")
    assert hashlib.sha256(open(os.path.join(r, "restored.raw"), "rb").read()).hexdigest() == want
    stop(server)
    qemu_img("check", remote)
    assert content_hash(tmp_path, remote) == want
