# SPDX-License-Identifier: LGPL-2.1-or-later
"""Backups from a persistent dirty bitmap that QEMU recorded (sync=bitmap, bitmap-mode=never), through
diskchainctl and the bus: the differential target, an overlay of the full backup, reads exactly as the
disk did (qemu-img compare), holds only what the bitmap marked, and QEMU's argument rules are kept."""
import json
import os
import random
import re
import time

import nbd

from bustest import TEST_USER, qemu_img, qemu_io, sh
from test_bus import M, data, prop
from test_export import export, uri_of, wait_for

MiB = 1 << 20


def allocated_top(path):
    """Bytes the image itself holds (not its backing files), as qemu-img map says."""
    return sum(e["length"] for e in json.loads(qemu_img("map", "--output=json", path).stdout)
               if e["data"] and e["depth"] == 0)


def test_differential_backup_from_a_qemu_bitmap(bus, tmp_path):
    r = bus.root
    disk = os.path.join(r, "disk.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", disk, "64M")
    rng = random.Random(9)
    (tmp_path / "fill").write_bytes(rng.randbytes(24 * MiB))
    qemu_io(disk, f"write -s {tmp_path / 'fill'} 0 24M", "write -P 0x33 40M 8M")
    # the full backup and the bitmap's start are one point in time (nothing writes in between)
    qemu_img("bitmap", "--add", disk, "daily")
    bus.ctl("backup", "disk.qcow2", "full.qcow2")
    assert qemu_img("compare", "-q", disk, os.path.join(r, "full.qcow2"), check=False).returncode == 0
    # a day of guest writes, recorded by QEMU: new data, zeros over data, a discard, data past the old end
    (tmp_path / "day").write_bytes(rng.randbytes(3 * MiB))
    qemu_io(disk, f"write -s {tmp_path / 'day'} 5M 1M", f"write -s {tmp_path / 'day'} {17 * MiB + 4096} 2M",
            "write -z 41M 512k", "discard 44M 1M", "write -P 0x77 60M 64k", f"write -P 0x78 {63 * MiB + 512} 4k")
    want = tmp_path / "day1.raw"
    qemu_img("convert", "-O", "raw", disk, want)
    dirty = json.loads(bus.ctl("--json", "info", "disk.qcow2").stdout)["bitmaps"][0]
    assert dirty["name"] == "daily" and not dirty["inconsistent"] and 0 < dirty["dirty"] < 6 * MiB, dirty
    qemu_img("create", "-q", "-f", "qcow2", "-b", "full.qcow2", "-F", "qcow2", os.path.join(r, "inc1.qcow2"))
    out = bus.ctl("backup", "disk.qcow2", "inc1.qcow2", "--mode", "existing", "--sync", "bitmap",
                  "--bitmap", "daily", "--bitmap-mode", "never").stdout
    assert "completed" in out, out
    inc1 = os.path.join(r, "inc1.qcow2")
    qemu_img("check", inc1)
    assert qemu_img("compare", "-q", "-F", "raw", inc1, want, check=False).returncode == 0
    # only what the bitmap marked (rounded out to the target's clusters) was copied
    assert 0 < allocated_top(inc1) <= dirty["dirty"] + 8 * 65536, (allocated_top(inc1), dirty)
    # never: the bitmap is as it was
    assert json.loads(bus.ctl("--json", "info", "disk.qcow2").stdout)["bitmaps"][0]["dirty"] == dirty["dirty"]


def test_bitmap_backup_arguments(bus):
    """QEMU's rules, in its words; a bitmap left in use by a writer that died is refused, with what to
    do instead."""
    disk = os.path.join(bus.root, "disk.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", disk, "8M")
    qemu_img("bitmap", "--add", disk, "b0")
    qemu_io(disk, "write 0 64k")

    def refused(*opts):
        p = bus.ctl("backup", "disk.qcow2", "t.qcow2", *opts, check=False)
        assert p.returncode != 0, (opts, p.stdout)
        assert not os.path.exists(os.path.join(bus.root, "t.qcow2")), (opts, "the target made for the job stays")
        return p.stderr
    assert "must provide a valid bitmap name for 'bitmap' sync mode" in refused("--sync", "bitmap")
    assert "must provide a valid bitmap name for 'incremental' sync mode" in refused("--sync", "incremental")
    assert "Cannot specify bitmap sync mode without a bitmap" in refused("--bitmap-mode", "never")
    assert "Bitmap sync mode must be given when providing a bitmap" in refused("--bitmap", "b0")
    assert "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'" in \
        refused("--sync", "incremental", "--bitmap", "b0", "--bitmap-mode", "never")
    assert "sync mode 'none' does not produce meaningful bitmap outputs" in \
        refused("--sync", "none", "--bitmap", "b0", "--bitmap-mode", "always")
    assert "Bitmap sync mode 'never' has no meaningful effect when combined with sync mode 'full'" in \
        refused("--bitmap", "b0", "--bitmap-mode", "never")
    chain = data(bus.call(M, "Manager", "GetChain", "s", "disk.qcow2"))[0]
    p = bus.gdbus("--object-path", chain, "--method", "org.diskchain.DiskChain1.Chain.Backup", "t.qcow2",
                  "{'sync': <'incremental'>, 'bitmap': <'b0'>, 'bitmap-mode': <'always'>}", check=False)
    assert p.returncode != 0 and "org.freedesktop.DBus.Error.InvalidArgs" in p.stderr, p.stderr
    err = refused("--sync", "bitmap", "--bitmap", "nosuch", "--bitmap-mode", "never")
    assert "no bitmap named 'nosuch'" in err, err
    p = bus.ctl("mirror", "disk.qcow2", "m.qcow2", "--sync", "bitmap", check=False)
    assert p.returncode != 0 and "Sync mode 'bitmap' not supported" in p.stderr, p.stderr
    # a writer that dies with the image open leaves the bitmap in use: inconsistent
    sh("qemu-io", "-f", "qcow2", "-c", "write 1M 4k", "-c", "sigraise 9", disk, check=False)
    info = json.loads(qemu_img("info", "-U", "--output=json", disk).stdout)
    assert "in-use" in info["format-specific"]["data"]["bitmaps"][0]["flags"], info
    for opts in [("--sync", "bitmap", "--bitmap-mode", "never"), ("--sync", "incremental")]:
        err = refused("--bitmap", "b0", *opts)
        assert "inconsistent" in err and "full backup is needed" in err, err
    # a full backup still works, and does not touch the bitmap
    bus.ctl("backup", "disk.qcow2", "full.qcow2")


def test_enable_and_disable_a_bitmap(bus):
    """EnableBitmap and DisableBitmap flip the flag QEMU reads (qemu-img info), QEMU then records or
    not, the image stays clean; an unprivileged caller is refused, as is an inconsistent bitmap."""
    disk = os.path.join(bus.root, "disk.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", disk, "8M")
    qemu_img("bitmap", "--add", disk, "b0")
    qemu_img("bitmap", "--add", disk, "b1")

    def flags():
        bms = json.loads(qemu_img("info", "--output=json", disk).stdout)["format-specific"]["data"]["bitmaps"]
        return {b["name"]: b["flags"] for b in bms}

    assert "bitmap b0 of disk.qcow2: disabled" in bus.ctl("bitmap", "disable", "disk.qcow2", "b0").stdout
    assert flags() == {"b0": [], "b1": ["auto"]}
    qemu_io(disk, "write 0 64k")
    dirty = {b["name"]: b["dirty"] for b in json.loads(bus.ctl("--json", "info", "disk.qcow2").stdout)["bitmaps"]}
    assert dirty == {"b0": 0, "b1": 65536}
    bus.ctl("bitmap", "disable", "disk.qcow2", "b0")  # already: nothing to do
    bus.ctl("bitmap", "enable", "disk.qcow2", "b0")
    assert flags() == {"b0": ["auto"], "b1": ["auto"]}
    qemu_io(disk, "write 1M 64k")
    dirty = {b["name"]: b["dirty"] for b in json.loads(bus.ctl("--json", "info", "disk.qcow2").stdout)["bitmaps"]}
    assert dirty == {"b0": 65536, "b1": 2 * 65536}
    qemu_img("check", disk)
    # the same through busctl and gdbus
    o = data(bus.call(M, "Manager", "GetImage", "s", "disk.qcow2"))[0]
    bus.call(o, "Image", "DisableBitmap", "s", "b1")
    assert flags()["b1"] == []
    bus.gdbus("--object-path", o, "--method", "org.diskchain.DiskChain1.Image.EnableBitmap", "b1")
    assert flags()["b1"] == ["auto"]
    p = bus.gdbus("--object-path", o, "--method", "org.diskchain.DiskChain1.Image.EnableBitmap", "nosuch", check=False)
    assert "org.diskchain.DiskChain1.Error.NotFound" in p.stderr, p.stderr
    p = bus.ctl("bitmap", "disable", "disk.qcow2", "nosuch", check=False)
    assert p.returncode == 1 and "no bitmap named 'nosuch'" in p.stderr, p.stderr
    p = bus.ctl("bitmap", "disable", "disk.qcow2", "b0", user=TEST_USER, check=False)
    assert p.returncode == 1 and re.search(r"(?i)authenticat|denied|not authorized", p.stderr), p.stderr
    assert flags()["b0"] == ["auto"]
    sh("qemu-io", "-f", "qcow2", "-c", "write 2M 4k", "-c", "sigraise 9", disk, check=False)
    p = bus.ctl("bitmap", "disable", "disk.qcow2", "b0", check=False)
    assert p.returncode == 1 and "inconsistent" in p.stderr and "can only be removed" in p.stderr, p.stderr


def test_bitmap_set_through_the_bus_and_export_writes(bus):
    """AddBitmap (diskchainctl, busctl, gdbus), then a client's writes through a writable export are
    recorded into the enabled bitmaps and stored when the export stops (QEMU serves the same ranges);
    MergeBitmaps, ClearBitmap and RemoveBitmap change what qemu-img info lists; bad arguments, a busy
    image and an unprivileged caller are refused with named errors, and the image stays clean."""
    disk = os.path.join(bus.root, "disk.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", disk, "8M")
    o = data(bus.call(M, "Manager", "GetImage", "s", "disk.qcow2"))[0]
    assert "bitmap b0 of disk.qcow2: added" in bus.ctl("bitmap", "add", "disk.qcow2", "b0").stdout
    bus.call(o, "Image", "AddBitmap", "sa{sv}", "fine", "2", "granularity", "u", "4096", "disabled", "b", "true")
    bus.gdbus("--object-path", o, "--method", "org.diskchain.DiskChain1.Image.AddBitmap", "wk",
              "{'granularity': <uint64 1048576>}")
    want = [["b0", 65536, 0, True, False, True, False], ["fine", 4096, 0, False, False, True, False],
            ["wk", MiB, 0, True, False, True, False]]
    wait_for(lambda: prop(bus, o, "Image", "Bitmaps") == want, "three bitmaps listed")
    info = json.loads(qemu_img("info", "--output=json", disk).stdout)["format-specific"]["data"]["bitmaps"]
    assert {b["name"]: (b["granularity"], b["flags"]) for b in info} == {
        "b0": (65536, ["auto"]), "fine": (4096, []), "wk": (MiB, ["auto"])}

    for args, err in [(["b0", "{}"], "Error.Exists"),
                      (["x", "{'granularity': <uint32 1000>}"], "InvalidArgs"),
                      (["x", "{'persistent': <false>}"], "Error.NotSupported"),
                      (["", "{}"], "InvalidArgs"),
                      (["x", "{'colour': <'red'>}"], "InvalidArgs")]:
        p = bus.gdbus("--object-path", o, "--method", "org.diskchain.DiskChain1.Image.AddBitmap", *args,
                      check=False)
        assert err in p.stderr, (args, p.stderr)
    p = bus.gdbus("--object-path", o, "--method", "org.diskchain.DiskChain1.Image.ClearBitmap", "nosuch",
                  check=False)
    assert "Error.NotFound" in p.stderr and "no bitmap named 'nosuch'" in p.stderr, p.stderr
    p = bus.ctl("bitmap", "remove", "disk.qcow2", "b0", user=TEST_USER, check=False)
    assert p.returncode == 1 and re.search(r"(?i)authenticat|denied|not authorized", p.stderr), p.stderr
    p = bus.ctl("bitmap", "merge", "disk.qcow2", "b0", check=False)
    assert p.returncode == 2 and "bitmap merge IMAGE TARGET SOURCE" in p.stderr

    # writes through a writable export: recorded, stored at the stop
    chain = data(bus.call(M, "Manager", "GetChain", "s", "disk.qcow2"))[0]
    exp = export(bus, chain, ("writable", "b", "true"), ("name", "s", "bm"))
    # a change through the live export (as QEMU changes a running VM's bitmaps)
    bus.ctl("bitmap", "clear", "disk.qcow2", "b0")
    h = nbd.NBD()
    h.connect_uri(uri_of(bus, exp))
    h.pwrite(b"\x11" * 4096, 3 * MiB + 512)
    h.zero(2 * 65536, 5 * MiB)
    h.flush()
    h.shutdown()
    bus.call(exp, "Export", "Stop")
    dirty = [(3 * MiB, 65536), (5 * MiB, 2 * 65536)]
    wait_for(lambda: [b[2] for b in prop(bus, o, "Image", "Bitmaps")] == [3 * 65536, 0, 2 * MiB], "recorded")
    assert qemu_img("check", disk).returncode == 0
    out = sh("nbdinfo", "--map=qemu:dirty-bitmap:b0", "--json", "--", "[", "qemu-nbd", "-r", "-f", "qcow2",
             "-B", "b0", disk, "]").stdout
    assert [(e["offset"], e["length"]) for e in json.loads(out) if e["type"] & 1] == dirty

    # merge, clear, remove
    assert "merged into fine" in bus.ctl("bitmap", "merge", "disk.qcow2", "fine", "b0").stdout
    bus.gdbus("--object-path", o, "--method", "org.diskchain.DiskChain1.Image.MergeBitmaps", "fine", "['wk']")
    wait_for(lambda: prop(bus, o, "Image", "Bitmaps")[1][2] == 2 * MiB, "fine has b0 and wk")
    bus.call(o, "Image", "ClearBitmap", "s", "wk")
    bus.ctl("bitmap", "remove", "disk.qcow2", "b0")
    wait_for(lambda: [b[:3] for b in prop(bus, o, "Image", "Bitmaps")] == [["fine", 4096, 2 * MiB], ["wk", MiB, 0]],
             "b0 removed, wk cleared")
    info = json.loads(qemu_img("info", "--output=json", disk).stdout)["format-specific"]["data"]["bitmaps"]
    assert sorted(b["name"] for b in info) == ["fine", "wk"]
    check = json.loads(qemu_img("check", "--output=json", disk).stdout)
    assert check.get("leaks", 0) == 0 and check.get("corruptions", 0) == 0


def dirty_of(bus, name="disk.qcow2"):
    return {b["name"]: b["dirty"] for b in json.loads(bus.ctl("--json", "info", name).stdout)["bitmaps"]}


def test_incremental_backup_chain(bus, tmp_path):
    """QEMU's push workflow (bitmaps.rst): a full backup anchors the bitmap (sync full, bitmap-mode
    on-success resets it at the backup's point in time), then incrementals into overlays of the
    previous backup, each of whose top reads as the disk did (qemu-img compare), with the writes
    coming from QEMU (qemu-io) and from a client of a writable export (our recording). A cancelled
    on-success backup gives the bitmap back its bits (plus new writes); a cancelled always backup
    keeps only what it did not copy, and a retry into the same target completes it."""
    r = bus.root
    disk = os.path.join(r, "disk.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", disk, "64M")
    rng = random.Random(11)
    (tmp_path / "fill").write_bytes(rng.randbytes(32 * MiB))
    qemu_io(disk, f"write -s {tmp_path / 'fill'} 0 32M")
    bus.ctl("bitmap", "add", "disk.qcow2", "b0")
    qemu_io(disk, "write -P 1 50M 1M")
    assert dirty_of(bus) == {"b0": MiB}
    out = bus.ctl("backup", "disk.qcow2", "full.qcow2", "--bitmap", "b0", "--bitmap-mode", "on-success").stdout
    assert "completed" in out, out
    assert dirty_of(bus) == {"b0": 0}
    assert qemu_img("compare", "-q", disk, os.path.join(r, "full.qcow2"), check=False).returncode == 0
    prev = "full.qcow2"

    def incremental(n, *opts, want_dirty=0):
        nonlocal prev
        want = tmp_path / f"day{n}.raw"
        qemu_img("convert", "-O", "raw", disk, want)
        target = f"inc{n}.qcow2"
        if not os.path.exists(os.path.join(r, target)):
            qemu_img("create", "-q", "-f", "qcow2", "-b", prev, "-F", "qcow2", os.path.join(r, target))
        out = bus.ctl("backup", "disk.qcow2", target, "--mode", "existing", "--sync", "incremental",
                      "--bitmap", "b0", *opts).stdout
        assert "completed" in out, out
        qemu_img("check", os.path.join(r, target))
        assert qemu_img("compare", "-q", "-F", "raw", os.path.join(r, target), want, check=False).returncode == 0
        assert dirty_of(bus) == {"b0": want_dirty}
        prev = target

    # day 1: QEMU writes
    (tmp_path / "d1").write_bytes(rng.randbytes(2 * MiB))
    qemu_io(disk, f"write -s {tmp_path / 'd1'} {3 * MiB + 512} 2M", "write -z 20M 1M", "discard 40M 2M")
    assert dirty_of(bus)["b0"] > 0
    incremental(1)
    assert allocated_top(os.path.join(r, "inc1.qcow2")) <= 5 * MiB
    # day 2: a client writes through a writable export; the bitmap records it, stored at the stop
    chain = data(bus.call(M, "Manager", "GetChain", "s", "disk.qcow2"))[0]
    exp = export(bus, chain, ("writable", "b", "true"), ("name", "s", "day2"))
    h = nbd.NBD()
    h.connect_uri(uri_of(bus, exp))
    h.pwrite(rng.randbytes(256 * 1024), 10 * MiB)
    h.pwrite(b"\x42" * 4096, 63 * MiB)
    h.flush()
    h.shutdown()
    bus.call(exp, "Export", "Stop")
    assert dirty_of(bus) == {"b0": 256 * 1024 + 65536}
    incremental(2)
    # day 3: a backup cancelled half-way (on-success): the bitmap gets its bits back
    qemu_io(disk, f"write -s {tmp_path / 'd1'} 12M 2M")
    before = dirty_of(bus)["b0"]
    qemu_img("create", "-q", "-f", "qcow2", "-b", prev, "-F", "qcow2", os.path.join(r, "inc3.qcow2"))
    bus.ctl("backup", "disk.qcow2", "inc3.qcow2", "--mode", "existing", "--sync", "incremental", "--bitmap", "b0",
            "--speed", "256K", "--job-id", "c3", "--no-wait")
    bus.ctl("job", "cancel", "c3")
    assert bus.ctl("wait", "c3", check=False).returncode != 0
    assert dirty_of(bus) == {"b0": before}
    incremental(3)
    # day 4: always, cancelled: what was copied is no longer marked; a retry into the same target finishes
    qemu_io(disk, f"write -s {tmp_path / 'd1'} 30M 2M", f"write -s {tmp_path / 'd1'} 44M 2M")
    before = dirty_of(bus)["b0"]
    qemu_img("create", "-q", "-f", "qcow2", "-b", prev, "-F", "qcow2", os.path.join(r, "inc4.qcow2"))
    bus.ctl("backup", "disk.qcow2", "inc4.qcow2", "--mode", "existing", "--sync", "bitmap", "--bitmap", "b0",
            "--bitmap-mode", "always", "--speed", "1M", "--job-id", "c4", "--no-wait")
    time.sleep(1.5)
    bus.ctl("job", "cancel", "c4")
    assert bus.ctl("wait", "c4", check=False).returncode != 0
    left = dirty_of(bus)["b0"]
    assert 0 < left < before, (left, before)
    assert 0 < allocated_top(os.path.join(r, "inc4.qcow2")) < before
    incremental(4, "--bitmap-mode", "on-success")
    # the whole chain, from the full backup up, is a valid image
    for n in ["full", "inc1", "inc2", "inc3", "inc4"]:
        qemu_img("check", os.path.join(r, f"{n}.qcow2"))
    qemu_img("check", disk)


def test_bitmaps_across_snapshot_and_commit(bus):
    """As in QEMU: a snapshot leaves the old active layer's bitmaps where they are, consistent and
    readable, holding the writes made before it (the new overlay has none until one is added); a
    commit's writes into the base are recorded in the base's enabled bitmaps, so after committing
    the overlay they cover what changed in it."""
    r = bus.root
    base = os.path.join(r, "base.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", base, "16M")
    qemu_io(base, "write -P 1 0 16M")
    bus.ctl("bitmap", "add", "base.qcow2", "daily")
    chain = data(bus.call(M, "Manager", "GetChain", "s", "base.qcow2"))[0]
    exp = export(bus, chain, ("writable", "b", "true"), ("name", "s", "vm"))
    h = nbd.NBD()
    h.connect_uri(uri_of(bus, exp))
    h.pwrite(b"\x02" * 65536, MiB)
    h.flush()
    bus.ctl("snapshot", "base.qcow2", "top.qcow2")  # through the export: the clients move to top.qcow2
    h.pwrite(b"\x03" * 65536, 5 * MiB)
    h.flush()
    bus.ctl("bitmap", "add", "top.qcow2", "frozen", "--granularity", "4096")
    h.pwrite(b"\x03" * 4096, 9 * MiB)
    h.flush()
    bus.ctl("bitmap", "disable", "top.qcow2", "frozen")
    h.pwrite(b"\x03" * 4096, 9 * MiB + 65536 - 4096)
    h.flush()
    h.shutdown()
    bus.call(exp, "Export", "Stop")
    base_img = data(bus.call(M, "Manager", "GetImage", "s", "base.qcow2"))[0]
    wait_for(lambda: [b[:3] + b[6:] for b in prop(bus, base_img, "Image", "Bitmaps")] == [["daily", 65536, 65536,
                                                                                           False]],
             "the old active layer's bitmap: the write before the snapshot only, consistent")
    top_img = data(bus.call(M, "Manager", "GetImage", "s", "top.qcow2"))[0]
    assert [b[:4] for b in prop(bus, top_img, "Image", "Bitmaps")] == [["frozen", 4096, 4096, False]]
    # commit the overlay into the base: the base's bitmap records what the commit wrote, and the
    # overlay's bitmaps move into the base (libvirt's merge around QEMU's commit): "frozen" keeps its
    # granularity, its disabled state and exactly its bits
    out = bus.ctl("commit", "top.qcow2", "--complete").stdout
    assert "completed" in out, out
    wait_for(lambda: [b[:4] for b in prop(bus, base_img, "Image", "Bitmaps")] ==
             [["daily", 65536, 3 * 65536, True], ["frozen", 4096, 4096, False]], "the committed writes recorded")

    def qemu_map(name):
        out = sh("nbdinfo", f"--map=qemu:dirty-bitmap:{name}", "--json", "--", "[", "qemu-nbd", "-r", "-f", "qcow2",
                 "-B", name, base, "]").stdout
        return [(e["offset"], e["length"]) for e in json.loads(out) if e["type"] & 1]
    assert qemu_map("daily") == [(MiB, 65536), (5 * MiB, 65536), (9 * MiB, 65536)]
    assert qemu_map("frozen") == [(9 * MiB, 4096)]
    qemu_img("check", base)


def test_transient_bitmap_on_a_live_raw_disk(bus, tmp_path):
    """A transient bitmap (AddBitmap persistent false, QEMU's non-persistent one) lives in the open image
    of a live export, as long as the export: on a raw disk too, which can hold no persistent one. It
    records the clients' writes, Image.Bitmaps lists it (persistent false) with its count, an
    incremental push backup copies only what it marked, a point-in-time view offers it as
    qemu:dirty-bitmap, and it is gone when the export stops, leaving the file as it was."""
    r = bus.root
    disk = os.path.join(r, "vm.raw")
    qemu_img("create", "-q", "-f", "raw", disk, "16M")
    sh("qemu-io", "-f", "raw", "-c", "write -P 1 0 16M", disk)
    chain = data(bus.call(M, "Manager", "GetChain", "s", "vm.raw"))[0]
    img = data(bus.call(M, "Manager", "GetImage", "s", "vm.raw"))[0]
    # no live export: nothing holds the image open for it to live in; no persistent one on raw
    p = bus.ctl("bitmap", "add", "vm.raw", "t", "--transient", check=False)
    assert p.returncode != 0 and "export the chain first" in p.stderr, p.stderr
    p = bus.gdbus("--object-path", img, "--method", "org.diskchain.DiskChain1.Image.AddBitmap", "t", "{}",
                  check=False)
    assert "org.diskchain.DiskChain1.Error.NotSupported" in p.stderr and "only qcow2" in p.stderr, p.stderr

    exp = export(bus, chain, ("writable", "b", "true"), ("name", "s", "vm"))
    out = bus.ctl("backup", "vm.raw", "full.qcow2").stdout  # through the export, no writes meanwhile
    assert "completed" in out, out
    bus.ctl("bitmap", "add", "vm.raw", "t", "--transient")
    p = bus.ctl("bitmap", "add", "vm.raw", "t", "--transient", check=False)
    assert p.returncode != 0 and "already exists" in p.stderr, p.stderr
    h = nbd.NBD()
    h.connect_uri(uri_of(bus, exp))
    h.pwrite(b"\x02" * 65536, MiB)
    h.pwrite(b"\x03" * 4096, 5 * MiB + 8192)
    h.flush()
    bus.ctl("bitmap", "add", "vm.raw", "x", "--transient")  # any bitmap change refreshes the model
    wait_for(lambda: prop(bus, img, "Image", "Bitmaps") == [["t", 65536, 2 * 65536, True, False, False, False],
                                                             ["x", 65536, 0, True, False, False, False]],
             "the transient bitmaps listed, with t's count")
    assert "transient (gone when the export stops)" in bus.ctl("info", "vm.raw").stdout
    # an incremental backup from it, into an overlay of the full one
    want = tmp_path / "now.raw"
    qemu_img("convert", "-U", "-f", "raw", "-O", "raw", disk, want)
    qemu_img("create", "-q", "-f", "qcow2", "-b", "full.qcow2", "-F", "qcow2", os.path.join(r, "inc.qcow2"))
    out = bus.ctl("backup", "vm.raw", "inc.qcow2", "--mode", "existing", "--sync", "incremental",
                  "--bitmap", "t").stdout
    assert "completed" in out, out
    inc = os.path.join(r, "inc.qcow2")
    qemu_img("check", inc)
    assert qemu_img("compare", "-q", "-F", "raw", inc, want, check=False).returncode == 0
    assert allocated_top(inc) == 2 * 65536
    # on-success: t holds only what came after; a view offers it frozen
    h.pwrite(b"\x04" * 512, 9 * MiB)
    h.flush()
    view = export(bus, chain, ("snapshot", "b", "true"), ("bitmap", "s", "t"))
    out = sh("nbdinfo", "--map=qemu:dirty-bitmap:t", "--json", uri_of(bus, view)).stdout
    assert [(e["offset"], e["length"]) for e in json.loads(out) if e["type"] & 1] == [(9 * MiB, 65536)]
    bus.call(view, "Export", "Stop")
    h.shutdown()
    bus.call(exp, "Export", "Stop")
    wait_for(lambda: prop(bus, img, "Image", "Bitmaps") == [], "gone with the export")
    p = bus.ctl("bitmap", "remove", "vm.raw", "t", check=False)
    assert p.returncode != 0 and "no bitmap named 't'" in p.stderr, p.stderr
