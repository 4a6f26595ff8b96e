# SPDX-License-Identifier: LGPL-2.1-or-later
"""Backups from a persistent dirty bitmap that QEMU recorded (sync=bitmap, bitmap-mode=never), through
diskchainctl and the bus: the differential target, an overlay of the full backup, reads exactly as the
disk did (qemu-img compare), holds only what the bitmap marked, and QEMU's argument rules are kept."""
import json
import os
import random
import re

from bustest import TEST_USER, qemu_img, qemu_io, sh
from test_bus import M, data

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
    """QEMU's rules, in its words; what would rewrite the bitmap is refused as not supported yet; a
    bitmap left in use by a writer that died is refused, with what to do instead."""
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
    for opts in [("--sync", "incremental", "--bitmap", "b0"), ("--sync", "bitmap", "--bitmap", "b0",
                                                              "--bitmap-mode", "on-success"),
                 ("--sync", "full", "--bitmap", "b0", "--bitmap-mode", "always")]:
        err = refused(*opts)
        assert "does not write bitmaps yet" in err and "use sync 'bitmap' with bitmap-mode 'never'" in err, (opts, err)
    chain = data(bus.call(M, "Manager", "GetChain", "s", "disk.qcow2"))[0]
    p = bus.gdbus("--object-path", chain, "--method", "org.diskchain.DiskChain1.Chain.Backup", "t.qcow2",
                  "{'sync': <'incremental'>, 'bitmap': <'b0'>}", check=False)
    assert p.returncode != 0 and "org.diskchain.DiskChain1.Error.NotSupported" in p.stderr, p.stderr
    err = refused("--sync", "bitmap", "--bitmap", "nosuch", "--bitmap-mode", "never")
    assert "no bitmap named 'nosuch'" in err, err
    p = bus.ctl("mirror", "disk.qcow2", "m.qcow2", "--sync", "bitmap", check=False)
    assert p.returncode != 0 and "Sync mode 'bitmap' not supported" in p.stderr, p.stderr
    # a writer that dies with the image open leaves the bitmap in use: inconsistent
    sh("qemu-io", "-f", "qcow2", "-c", "write 1M 4k", "-c", "sigraise 9", disk, check=False)
    info = json.loads(qemu_img("info", "-U", "--output=json", disk).stdout)
    assert "in-use" in info["format-specific"]["data"]["bitmaps"][0]["flags"], info
    err = refused("--sync", "bitmap", "--bitmap", "b0", "--bitmap-mode", "never")
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
