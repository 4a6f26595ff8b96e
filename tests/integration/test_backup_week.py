# SPDX-License-Identifier: LGPL-2.1-or-later
"""A simulated week of backups of a VM disk that a guest writes through a writable export: a full
push backup anchoring a bitmap, push and pull incrementals (each into an overlay of the one before),
the daemon killed with -9 in the middle of the week (the bitmap is then inconsistent and the next
backup must be full, on a new bitmap), and at every point the backup chain's top compared byte for
byte with the disk as it was at that backup's moment; qemu-img check clean on every image."""
import json
import os
import random

import nbd

from bustest import kill_daemon, qemu_img, qemu_io
from test_bus import M, data
from test_export import export, read_all, uri_of
from test_pull_backup import pull_incremental

MiB = 1 << 20
SIZE = 48 * MiB


class Week:
    def __init__(self, bus, tmp_path):
        self.bus, self.tmp, self.r = bus, tmp_path, bus.root
        self.rng = random.Random(7)
        self.disk = os.path.join(self.r, "vm.qcow2")
        self.live = None
        self.prev = None
        self.points = []  # (backup image, what it must read as)

    def start_guest(self):
        chain = data(self.bus.call(M, "Manager", "GetChain", "s", "vm.qcow2"))[0]
        self.live = export(self.bus, chain, ("writable", "b", "true"), ("name", "s", "vm"))
        self.h = nbd.NBD()
        self.h.connect_uri(uri_of(self.bus, self.live))

    def day(self, n):
        """A day of the guest's writes: new data, zeros, a discard, fragmented over the disk."""
        for _ in range(25):
            off = self.rng.randrange(0, SIZE // 4096 - 64) * 4096
            self.h.pwrite(self.rng.randbytes(4096 * self.rng.randrange(1, 64)), off)
        self.h.zero(256 * 1024, self.rng.randrange(0, SIZE // MiB - 1) * MiB)
        self.h.trim(128 * 1024, self.rng.randrange(0, SIZE // MiB - 1) * MiB)
        self.h.flush()

    def now(self, name):
        """The disk as the guest sees it at this moment."""
        path = self.tmp / f"{name}.raw"
        path.write_bytes(bytes(read_all(uri_of(self.bus, self.live))))
        return path

    def overlay(self, name):
        path = os.path.join(self.r, name)
        qemu_img("create", "-q", "-f", "qcow2", "-b", self.prev, "-F", "qcow2", path)
        return path

    def push(self, name, *opts):
        want = self.now(name)
        out = self.bus.ctl("backup", "vm.qcow2", name, *opts).stdout
        assert "completed" in out, out
        self.record(name, want)

    def pull(self, name, bitmap, checkpoint):
        chain = data(self.bus.call(M, "Manager", "GetChain", "s", "vm.qcow2"))[0]
        want = self.now(name)
        view = export(self.bus, chain, ("snapshot", "b", "true"), ("bitmap", "s", bitmap),
                      ("checkpoint", "s", checkpoint), ("discard-after-read", "b", "true"))
        self.day(0)  # the guest goes on writing while the backup reads
        pull_incremental(uri_of(self.bus, view), bitmap, self.overlay(name), self.tmp)
        self.bus.call(view, "Export", "Stop")
        self.record(name, want)

    def record(self, name, want):
        path = os.path.join(self.r, name)
        self.points.append((path, want))
        self.prev = name
        self.check_all()

    def check_all(self):
        for path, want in self.points[-1:]:
            p = qemu_img("compare", "-q", "-U", "-F", "raw", path, want, check=False)
            assert p.returncode == 0, f"{path} does not read as the disk did: {p.stdout}{p.stderr}"
        for path, _ in self.points:
            qemu_img("check", "-U", path)

    def dirty(self):
        info = json.loads(self.bus.ctl("--json", "info", "vm.qcow2").stdout)
        return {b["name"]: b for b in info["bitmaps"]}


def test_a_week_of_backups(bus, tmp_path):
    w = Week(bus, tmp_path)
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", w.disk, str(SIZE))
    (tmp_path / "os").write_bytes(w.rng.randbytes(32 * MiB))
    qemu_io(w.disk, f"write -s {tmp_path / 'os'} 0 32M")
    bus.ctl("bitmap", "add", "vm.qcow2", "daily")
    w.start_guest()
    w.day(1)
    # Sunday: full push backup; 'daily' starts over at its point in time
    w.push("sun-full.qcow2", "--bitmap", "daily", "--bitmap-mode", "on-success")
    # Monday, Tuesday: push incrementals
    for n, name in [(2, "mon.qcow2"), (3, "tue.qcow2")]:
        w.day(n)
        w.overlay(name)
        w.push(name, "--mode", "existing", "--sync", "incremental", "--bitmap", "daily")
    # Wednesday: a pull incremental from a point-in-time view; 'wed' records from that moment
    w.day(4)
    w.pull("wed.qcow2", "daily", "wed")
    # Thursday: the guest writes, and the daemon is killed with the export open
    w.day(5)
    kill_daemon(bus)
    assert qemu_img("check", "-U", w.disk, check=False).returncode in (0, 3)
    info = json.loads(qemu_img("info", "-U", "--output=json", w.disk).stdout)
    flags = {b["name"]: b["flags"] for b in info["format-specific"]["data"]["bitmaps"]}
    assert "in-use" in flags["wed"], flags
    w.start_guest()  # the daemon comes back on the next call (bus activation)
    assert w.dirty()["wed"]["inconsistent"]
    w.overlay("thu.qcow2")
    p = bus.ctl("backup", "vm.qcow2", "thu.qcow2", "--mode", "existing", "--sync", "incremental", "--bitmap", "wed",
                check=False)
    assert p.returncode != 0 and "full backup is needed" in p.stderr, p.stderr
    os.unlink(os.path.join(w.r, "thu.qcow2"))
    # so Thursday is a full backup, anchoring a new bitmap added at its point in time
    bus.ctl("bitmap", "remove", "vm.qcow2", "wed")
    w.push("thu-full.qcow2", "--checkpoint", "daily2")
    # Friday: push incremental on the new chain; Saturday: pull
    w.day(6)
    w.overlay("fri.qcow2")
    w.push("fri.qcow2", "--mode", "existing", "--sync", "incremental", "--bitmap", "daily2")
    w.day(7)
    w.pull("sat.qcow2", "daily2", "daily3")
    w.h.shutdown()
    bus.call(w.live, "Export", "Stop")
    # every point of the week still restores to what the disk was then
    for path, want in w.points:
        assert qemu_img("compare", "-q", "-F", "raw", path, want, check=False).returncode == 0, path
        qemu_img("check", path)
    qemu_img("check", w.disk)
    # the bitmaps the crash caught are inconsistent; those added after it are not
    assert {n: b["inconsistent"] for n, b in w.dirty().items()} == {"daily": True, "daily2": False,
                                                                     "daily3": False}
