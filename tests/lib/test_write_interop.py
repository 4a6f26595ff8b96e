# SPDX-License-Identifier: LGPL-2.1-or-later
"""Images written by libdiskchain pass `qemu-img check` with no errors and hold
exactly the data written (`qemu-img compare` against a raw reference)."""
import os

import pytest

from imgtest import assert_clean, assert_same_content, dc, qemu_img, qemu_io

VARIANTS = [
    dict(compat="0.10"),
    dict(compat="1.1", **{"cluster-size": "512"}),
    dict(compat="1.1", **{"cluster-size": "4096", "refcount-bits": "1"}),
    dict(compat="1.1"),
    dict(compat="1.1", **{"refcount-bits": "64"}),
    dict(compat="1.1", **{"cluster-size": "2097152"}),
    dict(compat="1.1", **{"compression-type": "zstd"}),
    dict(compat="1.1", **{"lazy-refcounts": "on"}),
]


def ref_apply(ref, ops, size):
    """Apply the same operations to a raw reference file."""
    with open(ref, "r+b") as f:
        for op in ops:
            if op[0] in ("write", "compress"):
                pat, off, ln = op[1], op[2], op[3]
                f.seek(off)
                f.write(bytes([pat]) * ln)
            elif op[0] == "writefile":
                data = open(op[1], "rb").read()
                f.seek(op[2])
                f.write(data)
            elif op[0] in ("zero",):
                f.seek(op[1])
                f.write(b"\0" * op[2])


def opstrings(ops):
    out = []
    for op in ops:
        out += [str(x) for x in op]
    return out


@pytest.mark.parametrize("opts", VARIANTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_write_variant(tmp, opts):
    size = 24 << 20
    img = tmp / "w.qcow2"
    ref = tmp / "ref.raw"
    rnd = tmp / "rnd.bin"
    rnd.write_bytes(os.urandom(300_000))
    dc("create", img, size, *[f"{k}={v}" for k, v in opts.items()])
    assert_clean(img)
    with open(ref, "wb") as f:
        f.truncate(size)
    cs = int(opts.get("cluster-size", 65536))
    ops = [
        ("write", 0x11, 0, 1 << 20),
        ("write", 0x22, 4096 + 7, 70000),
        ("writefile", rnd, 3 << 20),
        ("zero", 512 * 1024, 2 * cs + 512),
        ("write", 0x33, 10 << 20, 2 << 20),
        ("zero", 10 << 20, 1 << 20),
        ("compress", 0x44, 16 << 20, 4 * cs),
        ("write", 0x55, (16 << 20) + 100, 50),
        ("write", 0x66, size - 4096, 4096),
    ]
    dc("io", img, *opstrings(ops))
    ref_apply(ref, ops, size)
    assert_clean(img)
    assert_same_content(img, ref)
    # discard leaves unspecified data, but the image stays consistent
    dc("io", img, "discard", str(1 << 20), str(2 << 20), "zero", "0", str(size), "unmap")
    assert_clean(img)
    with open(ref, "wb") as f:
        f.truncate(size)
    assert_same_content(img, ref)


def test_write_over_backing(tmp):
    base = tmp / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "8M")
    qemu_io(base, "write -P 0x10 0 8M")
    top = tmp / "top.qcow2"
    dc("create", top, "0", "backing=base.qcow2")
    info = qemu_img("info", "--output=json", top).stdout
    assert '"backing-filename-format": "qcow2"' in info and '"virtual-size": 8388608' in info
    # partial-cluster writes must copy the rest of the cluster from the backing file
    dc("io", top, "write", "0x20", "1000", "100", "zero", "65536", "65536", "write", "0x30", "200000", "3")
    ref = tmp / "ref.raw"
    qemu_img("convert", "-O", "raw", base, ref)
    ref_apply(ref, [("write", 0x20, 1000, 100), ("zero", 65536, 65536), ("write", 0x30, 200000, 3)], 8 << 20)
    assert_clean(top)
    assert_same_content(top, ref)


def test_v2_zero_over_backing(tmp):
    base = tmp / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "4M")
    qemu_io(base, "write -P 0x10 0 4M")
    top = tmp / "top.qcow2"
    dc("create", top, "0", "backing=base.qcow2", "compat=0.10")
    dc("io", top, "zero", "0", str(1 << 20), "unmap")
    ref = tmp / "ref.raw"
    qemu_img("convert", "-O", "raw", base, ref)
    ref_apply(ref, [("zero", 0, 1 << 20)], 4 << 20)
    assert_clean(top)
    assert_same_content(top, ref)


@pytest.mark.parametrize("prealloc", ["metadata", "falloc", "full"])
def test_create_preallocated(tmp, prealloc):
    img = tmp / "p.qcow2"
    dc("create", img, "8M", f"preallocation={prealloc}")
    assert_clean(img)
    m = qemu_img("map", "--output=json", img).stdout
    assert '"data": true' in m and '"present": false' not in m
    dc("io", img, "write", "0x5a", "100000", "5000")
    ref = tmp / "ref.raw"
    with open(ref, "wb") as f:
        f.truncate(8 << 20)
    ref_apply(ref, [("write", 0x5a, 100000, 5000)], 8 << 20)
    assert_clean(img)
    assert_same_content(img, ref)


def test_create_raw(tmp):
    img = tmp / "r.raw"
    dc("create", img, "4M", "format=raw", "preallocation=full")
    assert os.path.getsize(img) == 4 << 20
    dc("io", img, "write", "0x42", "0", "4096")
    assert open(img, "rb").read(4096) == b"\x42" * 4096


def test_resize(tmp):
    img = tmp / "g.qcow2"
    dc("create", img, "1M", "cluster-size=512")
    dc("io", img, "write", "0x77", "0", "1M", "resize", "100M", "write", "0x78", str(99 << 20), "4096")
    assert_clean(img)
    assert '"virtual-size": 104857600' in qemu_img("info", "--output=json", img).stdout
    ref = tmp / "ref.raw"
    with open(ref, "wb") as f:
        f.truncate(100 << 20)
    ref_apply(ref, [("write", 0x77, 0, 1 << 20), ("write", 0x78, 99 << 20, 4096)], 100 << 20)
    assert_same_content(img, ref)
    assert dc("io", img, "resize", "1M", check=False).returncode != 0


def test_refcount_table_growth(tmp):
    # 512-byte clusters with 64-bit refcounts: one refcount table cluster covers 2 MiB
    img = tmp / "grow.qcow2"
    dc("create", img, "16M", "cluster-size=512", "refcount-bits=64")
    dc("io", img, "write", "0x13", "0", "6M")
    assert_clean(img)
    ref = tmp / "ref.raw"
    with open(ref, "wb") as f:
        f.truncate(16 << 20)
    ref_apply(ref, [("write", 0x13, 0, 6 << 20)], 16 << 20)
    assert_same_content(img, ref)


def test_check_and_repair_leaks(tmp):
    img = tmp / "leak.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "4M")
    # make leaks the way a crash would: refcounts for clusters nobody references
    qemu_io(img, "write -P 1 0 1M")
    qemu_img("check", "-r", "all", img)
    with open(img, "r+b") as f:
        f.seek(0, 2)
        end = f.tell()
        f.truncate(end + 3 * 65536)
    # raise refcounts of the three new clusters by hand through the refblock at 0x20000
    with open(img, "r+b") as f:
        for i in range(3):
            idx = end // 65536 + i
            f.seek(0x20000 + idx * 2)
            f.write(b"\x00\x01")
    assert qemu_img("check", img, check=False).returncode == 3
    p = dc("check", img, check=False)
    assert p.returncode == 3 and '"leaks": 3' in p.stdout
    p = dc("check", img, "leaks")
    assert '"leaks-fixed": 3' in p.stdout and '"leaks": 0' in p.stdout
    assert_clean(img)


def test_check_counts_corruption(tmp):
    img = tmp / "bad.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "4M")
    qemu_io(img, "write -P 1 0 64k")
    # drop the refcount of the data cluster at 0x50000 (index 5): refcount < references
    with open(img, "r+b") as f:
        f.seek(0x20000 + 5 * 2)
        f.write(b"\x00\x00")
    assert qemu_img("check", img, check=False).returncode == 2
    p = dc("check", img, check=False)
    assert p.returncode == 2 and '"corruptions": 2' in p.stdout
    dc("check", img, "all")
    assert_clean(img)


def test_dirty_image_repaired_on_write_open(tmp):
    img = tmp / "dirty.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", img, "4M")
    qemu_io(img, "write -P 1 0 64k")
    with open(img, "r+b") as f:  # set the dirty bit, zero the data cluster's refcount
        f.seek(72)
        f.write((1).to_bytes(8, "big"))
        f.seek(0x20000 + 5 * 2)
        f.write(b"\x00\x00")
    dc("io", img, "write", "2", "1M", "64k")
    assert_clean(img)
    assert '"dirty-flag": false' in qemu_img("info", "--output=json", img).stdout
