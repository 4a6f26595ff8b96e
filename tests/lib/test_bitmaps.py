# SPDX-License-Identifier: LGPL-2.1-or-later
"""Persistent dirty bitmaps that QEMU recorded, read by the library (dc-tool bitmaps), with QEMU's own
view as the judge: qemu-nbd exporting the bitmap (-B) and nbdinfo mapping qemu:dirty-bitmap:NAME."""
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


def test_bitmap_in_use_is_inconsistent(tmp):
    """Our own write-open marks the bitmaps in use (we do not record into them yet): they are then
    inconsistent for us and for QEMU, and asking for their ranges says a full backup is needed."""
    img = tmp / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "64M")
    qemu_img("bitmap", "--add", img, "b0")
    qemu_io(img, "write 1M 64k")
    assert our_bitmaps(img)["b0"] == dict(granularity=65536, in_use=False, enabled=True, dirty=65536)
    dc("io", img, "write", "5", str(8 * MiB), "4096")
    assert our_bitmaps(img)["b0"] == dict(granularity=65536, in_use=True, enabled=True, dirty=0)
    p = dc("bitmaps", img, "b0", check=False)
    assert p.returncode == 1 and "inconsistent" in p.stderr and "full backup" in p.stderr
    assert "in-use" in json.loads(qemu_img("info", "--output=json", img).stdout)[
        "format-specific"]["data"]["bitmaps"][0]["flags"]
    p = dc("bitmaps", img, "nosuch", check=False)
    assert p.returncode == 1 and "no bitmap named 'nosuch'" in p.stderr


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_no_bitmaps(tmp, fmt):
    img = tmp / f"a.{fmt}"
    qemu_img("create", "-q", "-f", fmt, img, "1M")
    assert our_bitmaps(img) == {}
