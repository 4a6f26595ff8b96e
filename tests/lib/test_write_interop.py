# SPDX-License-Identifier: LGPL-2.1-or-later
"""Images written by libdiskchain pass `qemu-img check` with no errors and hold
exactly the data written (`qemu-img compare` against a raw reference)."""
import json
import os
import struct

import pytest

from imgtest import assert_clean, assert_same_content, dc, qemu_img, qemu_io, qemu_map

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


# Extended L2 entries and external data files: made by qemu-img (QEMU opens a
# relative data file name from its working directory, so it runs in the
# image's), written by libdiskchain, judged by qemu-img check and compare.
NEW_VARIANTS = [
    "extended_l2=on,cluster_size=16384",
    "extended_l2=on",
    "extended_l2=on,cluster_size=2097152",
    "extended_l2=on,refcount_bits=1,compression_type=zstd",
    "data_file=data.raw",
    "data_file=data.raw,data_file_raw=on",
    "data_file=data.raw,extended_l2=on,cluster_size=32768",
    "data_file=data.raw,data_file_raw=on,extended_l2=on",
]


@pytest.mark.parametrize("opts", NEW_VARIANTS)
@pytest.mark.parametrize("backing", [False, True], ids=["", "backing"])
def test_write_extended_l2_and_data_file(tmp, opts, backing):
    if backing and "data_file_raw" in opts:
        pytest.skip("a raw data file cannot have a backing file")
    size = 24 << 20
    img, ref, rnd = tmp / "w.qcow2", tmp / "ref.raw", tmp / "rnd.bin"
    rnd.write_bytes(os.urandom(300_000))
    args = ["create", "-q", "-f", "qcow2", "-o", opts]
    with open(ref, "wb") as f:
        f.truncate(size)
    if backing:
        qemu_img("create", "-q", "-f", "qcow2", tmp / "base.qcow2", str(size))
        qemu_io(tmp / "base.qcow2", "write -P 0xb1 0 24M")
        args += ["-b", "base.qcow2", "-F", "qcow2"]
        qemu_img("convert", "-O", "raw", tmp / "base.qcow2", ref)
    qemu_img(*args, img, str(size), cwd=tmp)
    cs = 65536
    for o in opts.split(","):
        if o.startswith("cluster_size="):
            cs = int(o.split("=")[1])
    sc = cs // 32 if "extended_l2" in opts else cs
    ops = [
        ("write", 0x11, 0, 1 << 20),
        ("write", 0x22, 4096 + 7, 70000),
        ("writefile", rnd, 3 << 20),
        ("zero", 512 * 1024, 2 * cs + 512),
        ("write", 0x33, 10 << 20, 2 << 20),
        ("zero", 10 << 20, 1 << 20),
        ("write", 0x55, (16 << 20) + 100, 50),           # a partial subcluster of a new cluster
        ("write", 0x56, (16 << 20) + 5 * sc + 3, sc),    # ... and of the same, now allocated, cluster
        ("zero", (16 << 20) + 8 * sc, 2 * sc),           # zero subclusters of it
        ("write", 0x57, (16 << 20) + 9 * sc - 10, 20),   # across a zero and an allocated subcluster
        ("write", 0x66, size - 4096, 4096),
    ]
    if "data_file" not in opts:
        ops.append(("compress", 0x44, 20 << 20, min(4 * cs, 2 << 20)))
        ops.append(("write", 0x45, (20 << 20) + min(cs, 1 << 20) // 2 + 10, 100))  # into a compressed cluster
    dc("io", img, *opstrings(ops))
    ref_apply(ref, ops, size)
    assert_clean(img, cwd=tmp)
    assert_same_content(img, ref, cwd=tmp)
    if "data_file_raw" in opts:
        assert open(tmp / "data.raw", "rb").read() == open(ref, "rb").read(), "the raw data file is not the disk"
    # discard and zero with unmap leave the image consistent and reading as zeros
    dc("io", img, "discard", str(1 << 20), str(2 << 20), "zero", "0", str(size), "unmap")
    assert_clean(img, cwd=tmp)
    with open(ref, "wb") as f:
        f.truncate(size)
    assert_same_content(img, ref, cwd=tmp)
    if "data_file_raw" in opts:
        assert open(tmp / "data.raw", "rb").read() == open(ref, "rb").read(), "the raw data file is not the disk"
    p = dc("check", img)
    assert '"corruptions": 0' in p.stdout and '"leaks": 0' in p.stdout


def _map_without_offsets(m):
    return [{k: v for k, v in e.items() if k != "offset"} for e in m]


@pytest.mark.parametrize("cs", [16384, 65536])
def test_subcluster_writes_like_qemu(tmp, cs):
    """The same subcluster writes and zero writes, by qemu-io into one copy and
    by us into another: same content, and the same map (allocation, zero and
    unallocated subclusters alike; host offsets aside)."""
    sc = cs // 32
    base, a, b = tmp / "base.qcow2", tmp / "a.qcow2", tmp / "b.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "4M")
    qemu_io(base, "write -P 0xb1 0 4M")
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"extended_l2=on,cluster_size={cs}",
             "-b", "base.qcow2", "-F", "qcow2", a)
    qemu_io(a, f"write -P 1 0 {sc}", f"write -P 2 {cs + 3 * sc} {2 * sc}", f"write -z {2 * cs} {4 * sc}")
    import shutil
    shutil.copy(a, b)
    steps = [  # (qemu-io command, dc-tool io arguments)
        (f"write -P 3 {5 * sc + 10} 100", ["write", "3", str(5 * sc + 10), "100"]),          # partial, unallocated sc
        (f"write -P 4 {sc} {sc}", ["write", "4", str(sc), str(sc)]),                          # whole sc, allocated cluster
        (f"write -P 5 {cs + 4 * sc - 7} 14", ["write", "5", str(cs + 4 * sc - 7), "14"]),    # across allocated scs
        (f"write -z {cs + 3 * sc} {sc}", ["zero", str(cs + 3 * sc), str(sc)]),                # zero an allocated sc
        (f"write -P 6 {2 * cs + sc + 1} 10", ["write", "6", str(2 * cs + sc + 1), "10"]),    # into a zero sc
        (f"write -z {3 * cs + 2 * sc} {3 * sc}", ["zero", str(3 * cs + 2 * sc), str(3 * sc)]),  # zero, unallocated cluster
    ]
    for q, d in steps:
        qemu_io(a, q)
        dc("io", b, *d)
        assert _map_without_offsets(qemu_map(b)) == _map_without_offsets(qemu_map(a)), q
    p = qemu_img("compare", a, b, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    assert_clean(b)


def _counts(img, tool, cwd):
    if tool == "qemu":
        p = qemu_img("check", "--output=json", img, check=False, cwd=cwd)
    else:
        p = dc("check", img, check=False)
    j = json.loads(p.stdout)
    return j.get("corruptions", 0), j.get("leaks", 0)


def _l2(img, guest_cluster, cs, esize):
    with open(img, "rb") as f:
        f.seek(40)
        l1 = struct.unpack(">Q", f.read(8))[0]
        per = cs // esize
        f.seek(l1 + guest_cluster // per * 8)
        l2 = struct.unpack(">Q", f.read(8))[0] & 0x00fffffffffffe00
    return l2 + guest_cluster % per * esize


# (qemu-img create options, guest cluster to patch, what to write at its L2 entry + offset)
CHECK_CASES = [
    ("extended_l2=on", 0, 8, struct.pack(">Q", 0x0000000100000001)),  # subcluster 0 allocated and zero
    ("extended_l2=on", 0, 8, struct.pack(">Q", 0xffffffffffffffff)),
    ("extended_l2=on", 3, 8, struct.pack(">Q", 0x1)),                 # unallocated cluster with an allocation bit
    ("extended_l2=on", 3, 0, struct.pack(">QQ", (1 << 62) | 0x50000, 1)),  # compressed with a bitmap
    ("data_file=data.raw", 1, 0, struct.pack(">Q", 0x10000)),         # COPIED lost (refcount counts as 1)
    ("data_file=data.raw", 0, 0, struct.pack(">Q", (1 << 62) | 0x30000)),  # compressed with a data file
    ("data_file=data.raw,extended_l2=on", 1, 8, struct.pack(">Q", 0x0000000300000001)),
]


@pytest.mark.parametrize("opts,cluster,at,patch", CHECK_CASES, ids=[f"{c[0]}-{c[3].hex()}" for c in CHECK_CASES])
def test_check_counts_like_qemu(tmp, opts, cluster, at, patch):
    """Corruptions in the new variants are counted as qemu-img check counts them,
    and repair leaves an image qemu-img check finds clean (or as qemu-img -r
    would leave it)."""
    img = tmp / "c.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", opts, img, "4M", cwd=tmp)
    qemu_io(img, "write -P 1 0 128k", "write -P 2 1M 64k", cwd=tmp)
    with open(img, "r+b") as f:
        f.seek(_l2(img, cluster, 65536, 16 if "extended_l2" in opts else 8) + at)
        f.write(patch)
    q = _counts(img, "qemu", tmp)
    assert q != (0, 0)
    assert _counts(img, "dc", tmp) == q
    # repair: what qemu-img check -r all leaves on a copy, we leave too
    import shutil
    shutil.copy(img, tmp / "q.qcow2")
    qemu_img("check", "-r", "all", tmp / "q.qcow2", check=False, cwd=tmp)
    dc("check", img, "all", check=False)
    assert _counts(img, "qemu", tmp) == _counts(tmp / "q.qcow2", "qemu", tmp)


def test_check_leaks_with_data_file(tmp):
    img = tmp / "l.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "data_file=data.raw", img, "4M", cwd=tmp)
    qemu_io(img, "write -P 1 0 1M", cwd=tmp)
    # a refcount for a cluster past everything: a leak in the image file
    with open(img, "r+b") as f:
        f.seek(0, 2)
        end = f.tell()
        f.truncate(end + 65536)
        f.seek(0x20000 + end // 65536 * 2)
        f.write(b"\x00\x01")
    assert _counts(img, "qemu", tmp) == (0, 1) == _counts(img, "dc", tmp)
    dc("check", img, "leaks")
    assert_clean(img, cwd=tmp)
