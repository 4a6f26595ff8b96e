# SPDX-License-Identifier: LGPL-2.1-or-later
"""Persistent dirty bitmaps: those QEMU recorded, read by the library (dc-tool bitmaps), and those the
library adds, records into and changes (dc-tool bitmap), with QEMU's own view as the judge: qemu-nbd
exporting the bitmap (-B) and nbdinfo mapping qemu:dirty-bitmap:NAME, qemu-img info, check and bitmap."""
import json
import random

import pytest

from imgtest import dc, qemu_img, qemu_io, run

MiB = 1 << 20


def qemu_dirty(img, name):
    """The dirty ranges of bitmap NAME as QEMU serves them, neighbours merged."""
    m = json.loads(run("nbdinfo", f"--map=qemu:dirty-bitmap:{name}", "--json", "--",
                       "[", "qemu-nbd", "-r", "-f", "qcow2", "-B", name, img, "]").stdout)
    out = []
    for e in m:
        if e["type"] & 1:
            if out and out[-1][0] + out[-1][1] == e["offset"]:
                out[-1][1] += e["length"]
            else:
                out.append([e["offset"], e["length"]])
    return [tuple(x) for x in out]


def our_dirty(img, name):
    return [tuple(int(x) for x in line.split()) for line in dc("bitmaps", img, name).stdout.splitlines()]


def our_bitmaps(img):
    out = {}
    for line in dc("bitmaps", img).stdout.splitlines():
        name, gran, in_use, enabled, dirty = line.split()
        out[name] = dict(granularity=int(gran), in_use=in_use == "1", enabled=enabled == "1", dirty=int(dirty))
    return out


def test_bitmaps_qemu_recorded(tmp):
    """Bitmaps of 512 B to 2 MiB granularity over 1 GiB (so several bitmap data clusters each, and a
    virtual size that is not a multiple of the coarsest), recorded by qemu-io's writes, one of them
    disabled half-way: the same names, granularities, flags, dirty counts and ranges as QEMU's."""
    img = tmp / "a.qcow2"
    size = 1024 * MiB + 3 * 65536
    qemu_img("create", "-q", "-f", "qcow2", img, str(size))
    for name, gran in [("b512", 512), ("b4k", 4096), ("b64k", 65536), ("b2m", 2 * MiB), ("half", 65536)]:
        qemu_img("bitmap", "--add", "-g", str(gran), img, name)
    rng = random.Random(3)
    writes = [f"write {rng.randrange(0, size // 512 - 300) * 512} {rng.randrange(1, 300) * 512}" for _ in range(150)]
    writes += [f"write {size - 4096} 4096", "write 0 512", f"write {256 * MiB - 512} 1024", f"write {300 * MiB} 40M"]
    qemu_io(img, *writes[:80])
    qemu_img("bitmap", "--disable", img, "half")
    qemu_io(img, *writes[80:])
    got = our_bitmaps(img)
    assert sorted(got) == ["b2m", "b4k", "b512", "b64k", "half"]
    for name, gran in [("b512", 512), ("b4k", 4096), ("b64k", 65536), ("b2m", 2 * MiB), ("half", 65536)]:
        want = qemu_dirty(img, name)
        assert our_dirty(img, name) == want, name
        assert got[name] == dict(granularity=gran, in_use=False, enabled=name != "half",
                                 dirty=sum(n for _, n in want)), name
    # the disabled one stopped recording: it is a strict part of its twin
    assert got["half"]["dirty"] < got["b64k"]["dirty"]


def qemu_bitmaps(img):
    info = json.loads(qemu_img("info", "-U", "--output=json", img).stdout)
    return {b["name"]: b for b in info["format-specific"]["data"].get("bitmaps", [])}


def ranges(offsets, gran, size):
    """Sorted, merged [offset, length) ranges of the granules that OFFSETS (offset, length) touch."""
    bits = set()
    for off, ln in offsets:
        bits.update(range(off // gran, (off + ln - 1) // gran + 1))
    out = []
    for b in sorted(bits):
        if out and out[-1][0] + out[-1][1] == b * gran:
            out[-1][1] += gran
        else:
            out.append([b * gran, gran])
    if out and out[-1][0] + out[-1][1] > size:
        out[-1][1] = size - out[-1][0]
    return [tuple(x) for x in out]


def test_bitmap_records_our_writes(tmp):
    """Bitmaps we add record our writes, zeroes and discards; QEMU reads them the same (qemu-nbd -B)
    and lists them as we do, and qemu-img check finds not even a leak."""
    img = tmp / "a.qcow2"
    size = 256 * MiB + 3 * 65536
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", img, str(size))
    dc("bitmap", "add", img, "dflt")
    dc("bitmap", "add", img, "fine", "512")
    dc("bitmap", "add", img, "coarse", str(2 * MiB))
    dc("bitmap", "add", img, "off", "65536", "disabled")
    assert our_bitmaps(img) == {
        "dflt": dict(granularity=4096, in_use=False, enabled=True, dirty=0),
        "fine": dict(granularity=512, in_use=False, enabled=True, dirty=0),
        "coarse": dict(granularity=2 * MiB, in_use=False, enabled=True, dirty=0),
        "off": dict(granularity=65536, in_use=False, enabled=False, dirty=0)}
    q = qemu_bitmaps(img)
    assert {n: (b["granularity"], b["flags"]) for n, b in q.items()} == {
        "dflt": (4096, ["auto"]), "fine": (512, ["auto"]), "coarse": (2 * MiB, ["auto"]), "off": (65536, [])}
    rng = random.Random(5)
    ops, touched = [], []
    for _ in range(60):
        off, ln = rng.randrange(0, size // 512 - 600) * 512, rng.randrange(1, 600) * 512
        ops += ["write", "0x5a", str(off), str(ln)]
        touched.append((off, ln))
    ops += ["zero", str(100 * MiB), str(MiB), "discard", str(200 * MiB), str(64 * 4096),
            "write", "0x11", str(size - 512), "512"]
    touched += [(100 * MiB, MiB), (200 * MiB, 64 * 4096), (size - 512, 512)]
    dc("io", img, *ops)
    qemu_img("check", img)
    assert json.loads(qemu_img("check", "--output=json", img).stdout).get("leaks", 0) == 0
    for name, gran in [("dflt", 4096), ("fine", 512), ("coarse", 2 * MiB)]:
        want = ranges(touched, gran, size)
        assert our_dirty(img, name) == want, name
        assert qemu_dirty(img, name) == want, name
    assert our_dirty(img, "off") == []
    # a second session adds to the first, and QEMU's writes add to ours
    dc("io", img, "write", "0x12", str(150 * MiB), "4096")
    qemu_io(img, "write 160M 4k")
    touched += [(150 * MiB, 4096), (160 * MiB, 4096)]
    assert our_dirty(img, "dflt") == ranges(touched, 4096, size)
    # QEMU's own bitmap commands work on ours
    qemu_img("bitmap", "--add", img, "copy")
    qemu_img("bitmap", "--merge", "dflt", img, "copy")
    assert qemu_dirty(img, "copy") == ranges(touched, 4096, size)  # its default: the 4 KiB clusters
    qemu_img("bitmap", "--remove", img, "fine")
    assert sorted(our_bitmaps(img)) == ["coarse", "copy", "dflt", "off"]
    qemu_img("check", img)


def test_bitmap_clear_merge_remove(tmp):
    """Clear empties one bitmap only; merge ORs sources of other granularities into a target and
    leaves the target as it was when a source is missing; removing every bitmap leaves an image
    with no bitmaps extension (qemu-img info lists none), and nothing leaks."""
    img = tmp / "a.qcow2"
    size = 64 * MiB
    qemu_img("create", "-q", "-f", "qcow2", img, str(size))
    for name, gran in [("a", 65536), ("b", 4096), ("t", 65536)]:
        dc("bitmap", "add", img, name, str(gran))
    dc("bitmap", "disable", img, "t")
    dc("io", img, "write", "1", str(MiB), "4096", "write", "1", str(8 * MiB + 512), "512")
    dc("bitmap", "disable", img, "b")
    dc("io", img, "write", "1", str(20 * MiB), "4096")
    assert our_dirty(img, "t") == []
    dc("bitmap", "merge", img, "t", "b")
    assert our_dirty(img, "t") == [(MiB, 65536), (8 * MiB, 65536)]
    p = dc("bitmap", "merge", img, "t", "a", "nosuch", check=False)
    assert p.returncode == 1 and "no bitmap named 'nosuch'" in p.stderr
    assert our_dirty(img, "t") == [(MiB, 65536), (8 * MiB, 65536)]
    dc("bitmap", "merge", img, "t", "a")
    assert our_dirty(img, "t") == [(MiB, 65536), (8 * MiB, 65536), (20 * MiB, 65536)]
    assert qemu_dirty(img, "t") == our_dirty(img, "t")
    dc("bitmap", "clear", img, "a")
    assert our_dirty(img, "a") == [] and qemu_dirty(img, "a") == []
    assert our_dirty(img, "b") == [(MiB, 4096), (8 * MiB, 4096)]
    p = dc("bitmap", "add", img, "a", check=False)
    assert p.returncode == 1 and "Bitmap already exists: a" in p.stderr
    for name in ["a", "b", "t"]:
        dc("bitmap", "remove", img, name)
    assert qemu_bitmaps(img) == {} and our_bitmaps(img) == {}
    info = json.loads(qemu_img("info", "--output=json", img).stdout)
    assert "bitmaps" not in info["format-specific"]["data"]
    assert json.loads(qemu_img("check", "--output=json", img).stdout).get("leaks", 0) == 0
    p = dc("bitmap", "remove", img, "a", check=False)
    assert p.returncode == 1 and "no bitmap named 'a'" in p.stderr


@pytest.mark.parametrize("bad, msg", [(["add", "x", "1000"], "power of 2 and at least 512"),
                                      (["add", "x", "256"], "power of 2 and at least 512"),
                                      (["add", "n" * 1024], "over the 1023 bytes"),
                                      (["clear", "nosuch"], "no bitmap named 'nosuch'"),
                                      (["enable", "nosuch"], "no bitmap named 'nosuch'")])
def test_bitmap_refusals(tmp, bad, msg):
    img = tmp / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "1M")
    p = dc("bitmap", bad[0], img, *bad[1:], check=False)
    assert p.returncode == 1 and msg in p.stderr
    assert our_bitmaps(img) == {}
    v2 = tmp / "v2.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", v2, "1M")
    p = dc("bitmap", "add", v2, "x", check=False)
    assert p.returncode == 1 and "qcow2 v2" in p.stderr
    raw = tmp / "a.raw"
    qemu_img("create", "-q", "-f", "raw", raw, "1M")
    p = dc("bitmap", "add", raw, "x", check=False)
    assert p.returncode == 1 and "only qcow2 images store persistent bitmaps" in p.stderr


def test_bitmap_resize(tmp):
    """A disk that grows takes its bitmaps with it, clean in the new part, as QEMU grows them."""
    img = tmp / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "1M")
    dc("bitmap", "add", img, "on", "512")
    dc("bitmap", "add", img, "off", "512", "disabled")
    dc("io", img, "write", "1", "4096", "512", "resize", str(300 * MiB), "write", "1", str(299 * MiB), "4096")
    assert our_dirty(img, "on") == [(4096, 512), (299 * MiB, 4096)] == qemu_dirty(img, "on")
    assert our_dirty(img, "off") == [] == qemu_dirty(img, "off")
    qemu_img("check", img)


def test_bitmap_left_in_use_by_a_crash(tmp):
    """A writer killed while a bitmap records leaves it in use: inconsistent for us and for QEMU, and
    asking for its ranges says a full backup is needed; it can only be removed."""
    img = tmp / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "64M")
    qemu_img("bitmap", "--add", img, "b0")
    qemu_io(img, "write 1M 64k")
    assert our_bitmaps(img)["b0"] == dict(granularity=65536, in_use=False, enabled=True, dirty=65536)
    p = dc("io", img, "write", "5", str(8 * MiB), "4096", "write", "5", str(9 * MiB), "4096", check=False,
           env={"DC_FAULT_WRITES": "4"})
    assert p.returncode == 99, p.stderr
    assert our_bitmaps(img)["b0"] == dict(granularity=65536, in_use=True, enabled=True, dirty=0)
    p = dc("bitmaps", img, "b0", check=False)
    assert p.returncode == 1 and "inconsistent" in p.stderr and "full backup" in p.stderr
    assert "in-use" in qemu_bitmaps(img)["b0"]["flags"]
    for op in ["clear", "enable", "disable"]:
        p = dc("bitmap", op, img, "b0", check=False)
        assert p.returncode == 1 and "can only be removed" in p.stderr, op
    p = dc("bitmap", "merge", img, "b0", "b0", check=False)
    assert p.returncode == 1 and "inconsistent" in p.stderr
    # a later clean session keeps it inconsistent; removing it works
    dc("io", img, "write", "5", str(10 * MiB), "4096")
    assert our_bitmaps(img)["b0"]["in_use"]
    dc("bitmap", "remove", img, "b0")
    assert our_bitmaps(img) == {}
    assert qemu_img("check", img, check=False).returncode in (0, 3)  # the kill may leak a cluster
    p = dc("bitmaps", img, "nosuch", check=False)
    assert p.returncode == 1 and "no bitmap named 'nosuch'" in p.stderr


BITMAP_OPS = [
    ["add", "new", "4096"], ["remove", "b"], ["clear", "a"], ["merge", "b", "a"], ["disable", "a"],
]


@pytest.mark.parametrize("op", BITMAP_OPS, ids=lambda o: o[0])
def test_bitmap_change_cut_at_every_write(tmp, op):
    """A change of the set killed before each of its writes: qemu-img check finds no corruption, and
    the bitmaps read as before the change or as after it, never as something else."""
    pristine = tmp / "pristine.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", pristine, "256M")
    dc("bitmap", "add", pristine, "a", "4096")
    dc("bitmap", "add", pristine, "b", "512")
    dc("io", pristine, "write", "1", str(MiB), "4096", "write", "1", str(100 * MiB), str(MiB))
    dc("bitmap", "disable", pristine, "b")
    dc("io", pristine, "write", "1", str(50 * MiB), "4096")
    before = {n: (b, our_dirty(pristine, n)) for n, b in our_bitmaps(pristine).items()}
    done = tmp / "done.qcow2"
    run("cp", pristine, done)
    dc("bitmap", op[0], done, *op[1:])
    after = {n: (b, our_dirty(done, n)) for n, b in our_bitmaps(done).items()}
    assert after != before
    cuts = 0
    for n in range(1, 200):
        img = tmp / "img.qcow2"
        run("cp", pristine, img)
        p = dc("bitmap", op[0], img, *op[1:], check=False, env={"DC_FAULT_WRITES": str(n)})
        chk = qemu_img("check", "--output=json", img, check=False)
        assert chk.returncode in (0, 3), f"cut before write {n}: {chk.stdout}{chk.stderr}"
        state = {nm: (b, our_dirty(img, nm)) for nm, b in our_bitmaps(img).items()}
        assert state in (before, after), f"cut before write {n}: {state}"
        assert qemu_bitmaps(img).keys() == state.keys()
        if p.returncode == 0:
            assert state == after
            break
        assert p.returncode == 99, p.stderr
        cuts += 1
    assert cuts >= 3


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_no_bitmaps(tmp, fmt):
    img = tmp / f"a.{fmt}"
    qemu_img("create", "-q", "-f", fmt, img, "1M")
    assert our_bitmaps(img) == {}


def test_commit_moves_bitmaps_into_base(tmp):
    """A commit takes the committed layers' bitmaps into base, as libvirt merges them around QEMU's
    block-commit: a name base has is ORed (and keeps recording the commit's own writes), a name it
    lacks is made with the top-most layer's granularity and recording state, and a name that is
    inconsistent in a layer makes base's inconsistent too, so no backup trusts what it missed.
    QEMU reads the result the same; qemu-img check is clean; the overlay reads as before."""
    a, b, c = tmp / "a.qcow2", tmp / "b.qcow2", tmp / "c.qcow2"
    size = 64 * MiB
    qemu_img("create", "-q", "-f", "qcow2", a, str(size))
    for name in ["daily", "bad"]:
        qemu_img("bitmap", "--add", a, name)
    qemu_io(a, "write -P 1 1M 64k")
    qemu_img("create", "-q", "-f", "qcow2", "-b", a, "-F", "qcow2", b)
    qemu_img("bitmap", "--add", b, "daily")
    qemu_img("bitmap", "--add", "-g", "512", b, "frozen")
    qemu_io(b, "write -P 2 5M 64k", "write -P 3 7341568 512")  # 7 MiB + 512
    qemu_img("bitmap", "--disable", b, "frozen")
    qemu_io(b, "write -P 4 9M 4k")
    # "bad" is left in use by a writer that died ("daily" was not recording then)
    qemu_img("bitmap", "--add", b, "bad")
    qemu_img("bitmap", "--disable", b, "daily")
    p = dc("io", b, "write", "5", str(11 * MiB), "4096", "write", "5", str(12 * MiB), "4096", check=False,
           env={"DC_FAULT_WRITES": "4"})
    assert p.returncode == 99, p.stderr
    assert our_bitmaps(b)["bad"]["in_use"]
    qemu_img("bitmap", "--enable", b, "daily")
    qemu_img("create", "-q", "-f", "qcow2", "-b", b, "-F", "qcow2", c)
    qemu_img("bitmap", "--add", c, "top")
    qemu_io(c, "write -P 6 20M 64k")
    before = tmp / "before.raw"
    qemu_img("convert", "-U", "-O", "raw", c, before)
    b_alloc = [(e["start"], e["length"]) for e in json.loads(qemu_img("map", "--output=json", "-f", "qcow2", b)
                                                              .stdout) if e["depth"] == 0 and e["data"]]

    p = dc("job", "commit", c, b, a)
    assert "completed ok" in p.stdout, p.stdout
    got = our_bitmaps(a)
    assert sorted(got) == ["bad", "daily", "frozen"]
    # ORed: A's own, B's, and what the commit wrote (A's bitmap was recording)
    want = ranges([(MiB, 65536), (5 * MiB, 65536), (7341568, 512), (9 * MiB, 4096)] + b_alloc, 65536, size)
    assert our_dirty(a, "daily") == want and qemu_dirty(a, "daily") == want
    assert got["daily"]["enabled"]
    # made from B's alone: its granularity, disabled, and so not recording the commit
    assert got["frozen"]["granularity"] == 512 and not got["frozen"]["enabled"]
    assert our_dirty(a, "frozen") == [(5 * MiB, 65536), (7341568, 512)] == qemu_dirty(a, "frozen")
    # inconsistent in B: A's was fine, and is no longer
    assert got["bad"]["in_use"] and "in-use" in qemu_bitmaps(a)["bad"]["flags"]
    p = dc("bitmaps", a, "bad", check=False)
    assert p.returncode == 1 and "full backup" in p.stderr
    # the layers keep theirs, the overlay keeps its own and reads as before
    assert sorted(our_bitmaps(c)) == ["top"]
    assert sorted(our_bitmaps(b)) == ["bad", "daily", "frozen"]
    qemu_img("compare", "-U", before, c)
    r = qemu_img("check", "--output=json", a)
    assert json.loads(r.stdout).get("corruptions", 0) == 0


def io_out(img, *ops, **kw):
    """dc-tool io IMG OPS: its "bitmap ..." lines (as our_bitmaps gives them, with the transient
    flag) and the extents each "extents" op printed, in order."""
    p = dc("io", img, *[str(o) for o in ops], **kw)
    listed, extents, cur = [], [], []
    for line in p.stdout.splitlines():
        w = line.split()
        if w[0] == "bitmap":
            listed.append((w[1], int(w[2]), w[3] == "1", w[4] == "1", int(w[5]), w[6] == "1"))
        elif w[0] == "end":
            extents.append(cur)
            cur = []
        else:
            cur.append((int(w[0]), int(w[1])))
    return listed, extents


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_transient_bitmaps(tmp, fmt):
    """Transient bitmaps (QEMU's persistent: false) of any format: they record this open's writes,
    zeroes and discards, work with every operation, can merge with persistent ones both ways, grow
    with the disk, are listed by another open of the file in the same process (how the daemon's scan
    sees a live export's), and leave nothing in the file: after the close only the persistent ones
    exist, and qemu-img check finds nothing."""
    img = tmp / f"a.{fmt}"
    size = 64 * MiB
    qemu_img("create", "-q", "-f", fmt, img, str(size))
    if fmt == "qcow2":
        qemu_img("bitmap", "--add", img, "p")
    listed, ext = io_out(img, "transient", "t", 4096, "transient", "off", 65536, "bm-disable", "off",
                         "write", 0x5a, MiB, 65536, "zero", 5 * MiB, MiB, "discard", 9 * MiB, 65536,
                         "list", "list-other", "extents", "t", "extents", "off",
                         "transient", "copy", 0, "bm-merge", "copy", "t", "write", 1, 20 * MiB, 4096,
                         "extents", "copy", "bm-clear", "t", "extents", "t", "bm-remove", "off", "list",
                         "resize", 128 * MiB, "write", 2, 100 * MiB, 512, "extents", "t")
    want_t = [(MiB, 65536), (5 * MiB, MiB), (9 * MiB, 65536)]
    dirty = sum(n for _, n in want_t)
    mine = [("t", 4096, False, True, dirty, True), ("off", 65536, False, False, 0, True)]
    persistent = [("p", 65536, False, True, dirty, False)] if fmt == "qcow2" else []
    assert listed[:2 + len(persistent)] == persistent + mine
    # another open sees the file's bitmaps (the enabled persistent one in use, as any writer leaves it)
    # and this open's transient ones
    other = listed[2 + len(persistent):4 + 2 * len(persistent)]
    assert other == [(n, g, True, e, 0, False) for n, g, _, e, _, _ in persistent] + mine
    assert ext[0] == want_t and ext[1] == []
    assert ext[2] == want_t + [(20 * MiB, 65536)]     # the copy (64 KiB, the default): t's bits, its own write
    assert ext[3] == []                                # cleared
    assert [x[0] for x in listed[4 + 2 * len(persistent):]] == ["p"] * len(persistent) + ["t", "copy"]
    assert ext[4] == [(100 * MiB, 4096)]               # grown with the disk, recording the new part
    # nothing transient reached the file
    assert our_bitmaps(img) == ({"p": dict(granularity=65536, in_use=False, enabled=True,
                                           dirty=dirty + 2 * 65536)} if fmt == "qcow2" else {})
    if fmt == "qcow2":
        assert sorted(qemu_bitmaps(img)) == ["p"]
        assert json.loads(qemu_img("check", "--output=json", img).stdout).get("leaks", 0) == 0
    # persistent into transient and back
    if fmt == "qcow2":
        _, ext = io_out(img, "transient", "t", 0, "bm-merge", "t", "p", "extents", "t",
                        "bm-disable", "p", "write", 3, 30 * MiB, 4096, "bm-merge", "p", "t")
        before = want_t + [(20 * MiB, 65536), (100 * MiB, 65536)]
        assert ext[0] == before
        # p stopped recording; the write reached it only through the merge from t
        assert qemu_dirty(img, "p") == before[:3] + [(20 * MiB, 65536), (30 * MiB, 65536), (100 * MiB, 65536)]
    # refusals: a clash with a persistent name, a persistent bitmap on raw
    if fmt == "qcow2":
        p = dc("io", img, "transient", "p", 0, check=False)
        assert p.returncode == 1 and "Bitmap already exists: p" in p.stderr
    else:
        p = dc("bitmap", "add", img, "x", check=False)
        assert p.returncode == 1 and "only qcow2 images store persistent bitmaps" in p.stderr
