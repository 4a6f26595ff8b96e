# SPDX-License-Identifier: LGPL-2.1-or-later
"""Pull backups (the backup-interfaces mail): a point-in-time view of a live chain exported over NBD
(image fleecing, Chain.Export snapshot), with the bitmap of what changed since the last backup frozen
at the same moment as qemu:dirty-bitmap:NAME and a checkpoint bitmap started there, read by real
clients (nbdinfo, qemu-img, and a libnbd client doing what virtnbdbackup does) while a writer keeps
writing through the chain's live export; the result must match the disk at the point in time."""
import json
import os
import random
import threading

import nbd
import pytest

from bustest import qemu_img, qemu_io, sh
from test_bus import M, data, prop
from test_export import export, read_all, uri_of, wait_for

MiB = 1 << 20
SIZE = 64 * MiB


def dirty_extents(uri, ctx):
    """(offset, length) of the extents of metadata context CTX whose bit 0 is set, as a libnbd client
    asks for them (block status over the whole disk, request by request)."""
    h = nbd.NBD()
    h.add_meta_context(ctx)
    h.connect_uri(uri)
    out, off = [], 0
    size = h.get_size()
    while off < size:
        got = []

        def cb(meta, o, entries, err):
            if meta == ctx:
                got.extend(entries)
            return 0
        h.block_status(min(size - off, 32 * MiB), off, cb)
        for i in range(0, len(got), 2):
            if got[i + 1] & 1:
                if out and out[-1][0] + out[-1][1] == off:
                    out[-1][1] += got[i]
                else:
                    out.append([off, got[i]])
            off += got[i]
    h.shutdown()
    return [tuple(x) for x in out]


def pull_incremental(uri, bitmap, into, tmp_path):
    """virtnbdbackup's incremental: the dirty extents of BITMAP read from the view and written into
    INTO (an overlay of the previous backup) at the same offsets."""
    ext = dirty_extents(uri, f"qemu:dirty-bitmap:{bitmap}")
    h = nbd.NBD()
    h.connect_uri(uri)
    cmds = []
    for i, (off, ln) in enumerate(ext):
        chunk = tmp_path / f"chunk{i}"
        chunk.write_bytes(h.pread(ln, off))
        cmds.append(f"write -s {chunk} {off} {ln}")
    h.shutdown()
    if cmds:
        qemu_io(into, *cmds)
    return ext


class Writer(threading.Thread):
    """Keeps writing random data at random places through the live export until stopped."""

    def __init__(self, uri, seed):
        super().__init__(daemon=True)
        self.h = nbd.NBD()
        self.h.connect_uri(uri)
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.writes = 0

    def run(self):
        while not self.stop.is_set():
            off = self.rng.randrange(0, SIZE // 4096 - 32) * 4096
            self.h.pwrite(self.rng.randbytes(4096 * self.rng.randrange(1, 32)), off)
            self.writes += 1
        self.h.flush()

    def finish(self):
        self.stop.set()
        self.join(30)
        self.h.shutdown()
        assert self.writes > 0


def test_pull_backup_of_a_live_chain(bus, tmp_path):
    r = bus.root
    disk = os.path.join(r, "disk.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", disk, str(SIZE))
    rng = random.Random(21)
    (tmp_path / "fill").write_bytes(rng.randbytes(40 * MiB))
    qemu_io(disk, f"write -s {tmp_path / 'fill'} 0 40M")
    bus.ctl("bitmap", "add", "disk.qcow2", "b0")
    # the full backup anchors b0 (push; a pull full backup is the same view read whole)
    bus.ctl("backup", "disk.qcow2", "full.qcow2", "--bitmap", "b0", "--bitmap-mode", "on-success")
    chain = data(bus.call(M, "Manager", "GetChain", "s", "disk.qcow2"))[0]
    live = export(bus, chain, ("writable", "b", "true"), ("name", "s", "vm"))
    h = nbd.NBD()
    h.connect_uri(uri_of(bus, live))
    for _ in range(40):  # a day of the guest's writes: recorded into b0
        h.pwrite(rng.randbytes(65536), rng.randrange(0, SIZE // 65536) * 65536)
    h.flush()
    # the point in time: nothing writes while it is taken, so the disk now is what the view must show
    want = bytes(read_all(uri_of(bus, live)))
    view = export(bus, chain, ("snapshot", "b", "true"), ("bitmap", "s", "b0"), ("checkpoint", "s", "b1"))
    assert view == M + "/export/disk_2dsnapshot" and prop(bus, view, "Export", "Snapshot") is True
    assert prop(bus, view, "Export", "Bitmap") == "b0"
    fleece = os.path.join(r, "disk.fleece-disk-snapshot.qcow2")
    assert os.path.exists(fleece)
    # both bitmaps are in use on disk now, recorded by the live export: busy, not inconsistent
    img = data(bus.call(M, "Manager", "GetImage", "s", "disk.qcow2"))[0]
    wait_for(lambda: sorted((b[0], b[3], b[4], b[6]) for b in prop(bus, img, "Image", "Bitmaps")) ==
             [("b0", True, True, False), ("b1", True, True, False)], "b0 and the checkpoint b1 busy")
    assert "busy (diskchain is writing the image)" in bus.ctl("info", "disk.qcow2").stdout
    # the guest keeps writing while the backup reads
    w = Writer(uri_of(bus, live), 5)
    w.start()
    inc = os.path.join(r, "inc1.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "full.qcow2", "-F", "qcow2", inc)
    ext = pull_incremental(uri_of(bus, view), "b0", inc, tmp_path)
    assert 0 < sum(n for _, n in ext) <= 40 * 65536, ext
    assert read_all(uri_of(bus, view)) == want  # the whole view, too
    (tmp_path / "by-qemu.raw").write_bytes(b"")
    qemu_img("convert", "-f", "raw", "-O", "raw", uri_of(bus, view), tmp_path / "by-qemu.raw")
    assert (tmp_path / "by-qemu.raw").read_bytes() == want
    out = json.loads(sh("nbdinfo", "--map=qemu:dirty-bitmap:b0", "--json", uri_of(bus, view)).stdout)
    assert [(e["offset"], e["length"]) for e in out if e["type"] & 1] == ext
    w.finish()
    (tmp_path / "want.raw").write_bytes(want)
    assert qemu_img("compare", "-q", "-F", "raw", inc, tmp_path / "want.raw", check=False).returncode == 0
    qemu_img("check", inc)
    # while the view lives the chain is claimed: a job or a second view is Busy
    p = bus.ctl("backup", "disk.qcow2", "x.qcow2", check=False)
    assert p.returncode != 0 and "fleecing:disk-snapshot" in p.stderr, p.stderr
    p = export(bus, chain, ("snapshot", "b", "true"), ("name", "s", "again"), check=False)
    assert p.returncode != 0 and "in use by job 'fleecing:disk-snapshot'" in p.stderr, p.stderr
    bus.call(view, "Export", "Stop")
    wait_for(lambda: not os.path.exists(fleece), "the fleecing image removed")
    bus.call(live, "Export", "Stop")
    # b1 started at the point in time: it holds what the writer did since, b0 still everything since the full

    def dirty():
        return {b[0]: b[2] for b in prop(bus, img, "Image", "Bitmaps")}
    wait_for(lambda: set(dirty()) == {"b0", "b1"} and dirty()["b1"] > 0, "b1 recorded the writes after the view")
    d = dirty()
    assert d["b0"] > d["b1"] > 0, d
    qemu_img("check", disk)


def test_pull_view_options(bus, tmp_path):
    """discard-after-read: a second read of what was read fails, and the fleecing image stays small
    while the guest rewrites what was already read; a view of a chain nobody writes works without a
    live export; the options' rules."""
    r = bus.root
    disk = os.path.join(r, "d.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", disk, str(SIZE))
    qemu_io(disk, "write -P 3 0 64M")
    chain = data(bus.call(M, "Manager", "GetChain", "s", "d.qcow2"))[0]
    for opts, err in [((("snapshot", "b", "true"), ("writable", "b", "true")), "read-only"),
                      ((("checkpoint", "s", "c"),), "go with snapshot true"),
                      ((("discard-after-read", "b", "true"),), "go with snapshot true"),
                      ((("cbw-timeout", "u", "5"),), "go with snapshot true"),
                      ((("snapshot", "b", "true"), ("cbw-timeout", "u", "100000")), "0..86400 seconds"),
                      ((("snapshot", "b", "true"), ("on-cbw-error", "s", "never")), "on-cbw-error"),
                      ((("snapshot", "b", "true"), ("bitmap", "s", "nosuch")), "no bitmap named 'nosuch'")]:
        p = export(bus, chain, *opts, check=False)
        assert p.returncode != 0 and err in p.stderr, (opts, p.stderr)
    assert not [f for f in os.listdir(r) if "fleece" in f]
    live = export(bus, chain, ("writable", "b", "true"), ("name", "s", "d"))
    # (the copies before the guest's writes run on helpers under the time limit)
    view = export(bus, chain, ("snapshot", "b", "true"), ("discard-after-read", "b", "true"),
                  ("on-cbw-error", "s", "break-snapshot"), ("cbw-timeout", "u", "30"))
    h = nbd.NBD()
    h.connect_uri(uri_of(bus, view))
    g = nbd.NBD()
    g.connect_uri(uri_of(bus, live))
    assert h.pread(MiB, 0) == b"\x03" * MiB
    with pytest.raises(nbd.Error):
        h.pread(4096, 4096)  # read once, then dropped
    # the guest rewrites what the view gave out already: nothing is copied any more
    g.pwrite(b"\x09" * MiB, 0)
    g.pwrite(b"\x09" * MiB, 8 * MiB)  # not read yet: copied first
    g.flush()
    assert h.pread(MiB, 8 * MiB) == b"\x03" * MiB
    fleece = os.path.join(r, "d.fleece-d-snapshot.qcow2")
    alloc = sum(e["length"] for e in json.loads(qemu_img("map", "-U", "--output=json", fleece).stdout)
                if e["data"])
    assert alloc == 0, alloc  # the one copy was read, then discarded
    h.shutdown()
    g.shutdown()
    bus.call(view, "Export", "Stop")
    bus.call(live, "Export", "Stop")
    # no live export: a view of a chain nobody writes
    view = export(bus, chain, ("snapshot", "b", "true"), ("name", "s", "quiet"))
    got = read_all(uri_of(bus, view))
    assert got[:MiB] == b"\x09" * MiB and got[MiB:2 * MiB] == b"\x03" * MiB
    bus.call(view, "Export", "Stop")
    wait_for(lambda: not [f for f in os.listdir(r) if "fleece" in f], "no fleecing image left")
    qemu_img("check", disk)
