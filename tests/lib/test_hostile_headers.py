# SPDX-License-Identifier: LGPL-2.1-or-later
"""Hostile qcow2 metadata: images made by qemu-img, then one field patched out
of range.  Each must be refused with the right errno class (EUCLEAN for
invalid metadata, EFBIG beyond QEMU's limits, ENOTSUP for what nobody
supports) and a message that names the field, without a crash; and a data
write that an L2 entry (or a broken refcount) aims at metadata must be
refused without touching the image."""
import hashlib
import os
import struct

import pytest

from imgtest import probe, qemu_img, qemu_io

CS = 65536


def u(path, off, fmt):
    with open(path, "rb") as f:
        f.seek(off)
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


def put(path, off, fmt, value):
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(struct.pack(fmt, value))


def extensions(path):
    """{type: offset of the extension's data} for the header extensions."""
    data = open(path, "rb").read(CS)
    p, out = struct.unpack(">I", data[100:104])[0], {}
    while True:
        t, ln = struct.unpack(">II", data[p:p + 8])
        if t == 0:
            return out
        out[t] = (p + 8, ln)
        p += 8 + (ln + 7) // 8 * 8


def l2_entry_at(path, guest_off, cs=CS):
    """File offset of the L2 entry that maps guest_off."""
    l1 = u(path, 40, ">Q")
    cl = guest_off // cs
    e = u(path, l1 + (cl // (cs // 8)) * 8, ">Q") & 0x00fffffffffffe00
    assert e, "no L2 table there"
    return e + (cl % (cs // 8)) * 8


@pytest.fixture
def base(tmp):
    img = tmp / "h.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "4M")
    qemu_io(img, "write -P 0x11 0 64k", "write -P 0x22 1M 64k")
    return img


def refused(img, errno, field, *cmd):
    cmd = cmd or ("open",)
    name, msg = probe(cmd[0], img, *cmd[1:])
    assert name == errno and field in msg, f"expected {errno} naming {field!r}, got {name}: {msg}"
    return msg


def patched_refused(img, off, fmt, value, errno, field):
    put(img, off, fmt, value)
    refused(img, errno, field)
    # check mode opens less strictly (check counts what it can), but never crashes
    probe("check", img)


# (header offset, struct format, value, errno, field named in the message)
HEADER_CASES = [
    (4, ">I", 4, "ENOTSUP", "version"),
    (20, ">I", 8, "EUCLEAN", "cluster_bits"),
    (20, ">I", 22, "EFBIG", "cluster_bits"),
    (20, ">I", 0xffffffff, "EUCLEAN", "cluster_bits"),
    (24, ">Q", (4 << 20) + 1, "EUCLEAN", "size"),
    (24, ">Q", (1 << 64) - 512, "EFBIG", "size"),
    (24, ">Q", 1 << 40, "EUCLEAN", "l1_size"),
    (32, ">I", 7, "ENOTSUP", "crypt_method"),
    (36, ">I", (1 << 22) + 1, "EFBIG", "l1_size"),
    (36, ">I", 0xffffffff, "EFBIG", "l1_size"),
    (36, ">I", 65536, "EUCLEAN", "l1_table_offset"),   # runs past the end of the file
    (40, ">Q", 0x30008, "EUCLEAN", "l1_table_offset"),  # not aligned
    (40, ">Q", 0, "EUCLEAN", "l1_table_offset"),        # inside the header
    (40, ">Q", 0x7ffffffffff00000, "EUCLEAN", "l1_table_offset"),
    (40, ">Q", 0xfffffffffff00000, "EUCLEAN", "l1_table_offset"),
    (40, ">Q", 0x10000, "EUCLEAN", "refcount table"),  # L1 on the refcount table
    (48, ">Q", 0x10200, "EUCLEAN", "refcount_table_offset"),
    (48, ">Q", 0x7000000, "EUCLEAN", "refcount_table_offset"),
    (48, ">Q", 0xffffffffffff0000, "EUCLEAN", "refcount_table_offset"),
    (56, ">I", 0, "EUCLEAN", "refcount_table_clusters"),
    (56, ">I", 129, "EFBIG", "refcount_table_clusters"),
    (56, ">I", 0xffffffff, "EFBIG", "refcount_table_clusters"),
    (56, ">I", 100, "EUCLEAN", "refcount_table_offset"),  # past the end of the file
    (60, ">I", 65537, "EFBIG", "nb_snapshots"),
    (60, ">I", 0xffffffff, "EFBIG", "nb_snapshots"),
    (60, ">I", 1000, "EUCLEAN", "snapshots_offset"),  # offset 0: inside the header
    (96, ">I", 7, "EUCLEAN", "refcount_order"),
    (100, ">I", 96, "EUCLEAN", "header_length"),
    (100, ">I", 108, "EUCLEAN", "header_length"),
    (100, ">I", CS + 8, "EUCLEAN", "header_length"),
    (8, ">Q", CS + 8, "EUCLEAN", "backing_file_offset"),
    (8, ">Q", 64, "EUCLEAN", "backing_file_offset"),
    (72, ">Q", 1 << 3, "EUCLEAN", "compression_type"),
    (72, ">Q", 1 << 40, "ENOTSUP", "unknown incompatible feature bit 40"),
]


@pytest.mark.parametrize("off,fmt,value,errno,field", HEADER_CASES,
                         ids=[f"{c[4].split()[0]}={c[2]:#x}" for c in HEADER_CASES])
def test_header_field(base, off, fmt, value, errno, field):
    patched_refused(base, off, fmt, value, errno, field)


def test_backing_name(base):
    put(base, 8, ">Q", 0x1000)
    put(base, 16, ">I", 2000)
    refused(base, "EFBIG", "backing_file_size")
    put(base, 8, ">Q", CS - 10)
    put(base, 16, ">I", 100)
    refused(base, "EUCLEAN", "backing_file_size")


def test_compression_type_unknown(base):
    put(base, 72, ">Q", 1 << 3)
    put(base, 104, ">B", 5)
    refused(base, "ENOTSUP", "compression_type")


def test_extension_overruns_header(base):
    ft, _ = extensions(base)[0x6803f857]
    put(base, ft - 4, ">I", CS)
    refused(base, "EUCLEAN", "header extension 0x6803f857")
    put(base, ft - 4, ">I", 0xfffffff8)
    refused(base, "EUCLEAN", "header extension 0x6803f857")


def test_backing_format_extension(tmp):
    qemu_img("create", "-q", "-f", "qcow2", tmp / "b.qcow2", "4M")
    img = tmp / "t.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", img)
    off, _ = extensions(img)[0xe2792aca]
    put(img, off - 4, ">I", 0)
    refused(img, "EUCLEAN", "backing format")
    put(img, off - 4, ">I", 20)
    refused(img, "EFBIG", "backing format")


@pytest.fixture
def bitmapped(tmp):
    img = tmp / "bm.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "4M")
    qemu_img("bitmap", "--add", img, "bm0")
    qemu_io(img, "write -P 1 0 64k")
    off, ln = extensions(img)[0x23852875]
    assert ln == 24
    return img, off


BITMAP_EXT_CASES = [
    (0, ">I", 0, "EUCLEAN", "nb_bitmaps"),
    (0, ">I", 70000, "EFBIG", "nb_bitmaps"),
    (0, ">I", 2, "EUCLEAN", "bitmap_directory_size"),
    (4, ">I", 1, "EUCLEAN", "reserved"),
    (8, ">Q", 1 << 30, "EFBIG", "bitmap_directory_size"),
    (16, ">Q", 0x90100, "EUCLEAN", "bitmap_directory_offset"),
    (16, ">Q", 0x7000000, "EUCLEAN", "bitmap_directory_offset"),
]


@pytest.mark.parametrize("off,fmt,value,errno,field", BITMAP_EXT_CASES, ids=[f"{c[4]}={c[2]:#x}" for c in BITMAP_EXT_CASES])
def test_bitmap_extension(bitmapped, off, fmt, value, errno, field):
    img, ext = bitmapped
    patched_refused(img, ext + off, fmt, value, errno, field)


# offsets inside the first bitmap directory entry
BITMAP_DIR_CASES = [
    (0, ">Q", 0x7000000, "EUCLEAN", "bitmap_table_offset"),
    (0, ">Q", 0x10, "EUCLEAN", "bitmap_table_offset"),
    (8, ">I", 0, "EUCLEAN", "bitmap_table_size"),
    (8, ">I", 0x8000001, "EFBIG", "bitmap_table_size"),
    (12, ">I", 0x10, "EUCLEAN", "reserved flags"),
    (16, ">B", 7, "ENOTSUP", "type"),
    (17, ">B", 40, "EFBIG", "granularity_bits"),
    (18, ">H", 0, "EUCLEAN", "name_size"),
    (18, ">H", 4000, "EUCLEAN", "name_size"),  # runs past the directory
    (20, ">I", 8, "EUCLEAN", "extra_data_size"),  # runs past the directory
]


@pytest.mark.parametrize("off,fmt,value,errno,field", BITMAP_DIR_CASES, ids=[f"{c[4]}={c[2]:#x}" for c in BITMAP_DIR_CASES])
def test_bitmap_directory(bitmapped, off, fmt, value, errno, field):
    img, ext = bitmapped
    patched_refused(img, u(img, ext + 16, ">Q") + off, fmt, value, errno, field)


def test_bitmap_table_entry(bitmapped):
    img, ext = bitmapped
    d = u(img, ext + 16, ">Q")
    table = u(img, d, ">Q")
    put(img, table, ">Q", 0x7000000)
    refused(img, "EUCLEAN", "bitmap table entry")
    put(img, table, ">Q", 0x2)
    refused(img, "EUCLEAN", "table entry 0")


@pytest.fixture
def snapshotted(tmp):
    img = tmp / "s.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "4M")
    qemu_io(img, "write -P 1 0 64k")
    qemu_img("snapshot", "-c", "s1", img)
    return img, u(img, 64, ">Q")


SNAPSHOT_CASES = [
    (0, ">Q", 0x30008, "EUCLEAN", "l1_table_offset"),
    (0, ">Q", 0x7000000, "EUCLEAN", "l1_table_offset"),
    (8, ">I", (1 << 22) + 1, "EFBIG", "l1_size"),
    (12, ">H", 0xffff, "EUCLEAN", "id_str_size"),
    (14, ">H", 0xffff, "EUCLEAN", "name_size"),
    (36, ">I", 1025, "EFBIG", "extra_data_size"),
    (36, ">I", 0xffffffff, "EFBIG", "extra_data_size"),
]


@pytest.mark.parametrize("off,fmt,value,errno,field", SNAPSHOT_CASES, ids=[f"{c[4]}={c[2]:#x}" for c in SNAPSHOT_CASES])
def test_snapshot_table(snapshotted, off, fmt, value, errno, field):
    img, table = snapshotted
    patched_refused(img, table + off, fmt, value, errno, field)


def test_snapshot_table_too_large(snapshotted):
    """Entries of 132 KB each: the table passes QEMU's 64 MiB before the file ends."""
    img, table = snapshotted
    l1, l1_size = u(img, table, ">Q"), u(img, table + 8, ">I")
    p, n = table, 600
    with open(img, "r+b") as f:
        for _ in range(n):
            f.seek(p)
            f.write(struct.pack(">QIHH", l1, l1_size, 0xffff, 0xffff) + bytes(20) + struct.pack(">I", 1024))
            p += (40 + 1024 + 2 * 0xffff + 7) // 8 * 8
        f.truncate(p + (1 << 20))
    put(img, 60, ">I", n)
    refused(img, "EFBIG", "snapshot table")


def test_refcount_table_entries(base):
    rt = u(base, 48, ">Q")
    for value, errno, field in [(0x30000, "EUCLEAN", "refcount table entry 0 points into the L1 table"),
                                (0x10000, "EUCLEAN", "refcount table entry 0 points into the refcount table"),
                                (0x20200, "EUCLEAN", "refcount table entry"),
                                (0x7000000, "EUCLEAN", "refcount table entry"),
                                (0x20001, "EUCLEAN", "refcount table entry 0 has reserved bits"),
                                (0xff00000000000000, "EUCLEAN", "refcount table entry")]:
        put(base, rt, ">Q", value)
        refused(base, errno, field)
        probe("check", base)


L1_CASES = [
    (0x40000 | (1 << 60), "EUCLEAN", "L1 entry 0 has reserved bits"),
    (0x40200 | (1 << 63), "EUCLEAN", "not cluster aligned"),
    (0x7000000 | (1 << 63), "EUCLEAN", "beyond the end of the file"),
    ((1 << 63), "OK", ""),  # COPIED without a table: reads as unallocated
]


@pytest.mark.parametrize("value,errno,field", L1_CASES, ids=[f"{c[0]:#x}" for c in L1_CASES])
def test_l1_entry(base, value, errno, field):
    put(base, u(base, 40, ">Q"), ">Q", value)
    assert probe("open", base)[0] == "OK"
    for cmd in (("read", "0", "4096"), ("map",), ("write", "0", "4096"), ("zero", "0", "65536"), ("discard", "0", "65536")):
        name, msg = probe(cmd[0], base, *cmd[1:])
        assert name == errno and field in msg, f"{cmd}: {name} {msg}"
    probe("check", base)


def test_l2_entries(base):
    e = l2_entry_at(base, 0)
    for value, errno, field in [(0x50000 | (1 << 63) | 0x100, "EUCLEAN", "reserved bits"),
                                (0x50200 | (1 << 63), "EUCLEAN", "not cluster aligned"),
                                ((1 << 62) | (1 << 63) | 0x50000, "EUCLEAN", "COPIED"),
                                ((1 << 62) | 0x7000000, "EUCLEAN", "compressed guest cluster 0"),
                                ((1 << 62) | 0x100, "EUCLEAN", "inside the header cluster"),
                                ((1 << 62) | (0xff << 54) | ((1 << 54) - 512), "EUCLEAN", "compressed guest cluster 0")]:
        put(base, e, ">Q", value)
        for cmd in (("read", "0", "4096"), ("write", "512", "512")):
            name, msg = probe(cmd[0], base, *cmd[1:])
            assert name == errno and field in msg, f"{value:#x} {cmd}: {name} {msg}"
        probe("map", base)
        probe("check", base)


def test_compressed_descriptor_beyond_2_56(tmp):
    """With 512-byte clusters a compressed offset has 61 bits: above 2^56 is invalid."""
    img = tmp / "c.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", img, "1M")
    qemu_io(img, "write -c -P 3 0 512")
    e = l2_entry_at(img, 0, 512)
    put(img, e, ">Q", (1 << 62) | (1 << 58))
    refused(img, "EUCLEAN", "compressed guest cluster 0", "read", "0", "512")


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def check_summary(path):
    p = qemu_img("check", "--output=json", path, check=False)
    return p.returncode, p.stdout


@pytest.mark.parametrize("target,what", [(0x30000, "the active L1 table"), (0x40000, "an active L2 table"),
                                         (0x10000, "the refcount table"), (0x20000, "a refcount block")])
def test_data_write_into_metadata_refused(base, target, what):
    """An L2 entry that maps guest data onto metadata: the write is refused as
    corruption and nothing in the file changes."""
    put(base, l2_entry_at(base, 1 << 20), ">Q", target | (1 << 63))
    before, check_before = digest(base), check_summary(base)
    for cmd in (("write", str(1 << 20), "4096"), ("write", str((1 << 20) + 100), "65536"),
                ("zero", str(1 << 20), "4096")):
        refused(base, "EUCLEAN", f"overlaps {what}", *cmd)
    assert digest(base) == before
    assert check_summary(base) == check_before


def test_allocation_onto_the_header_refused(base):
    """A refcount of 0 for the header cluster would hand it out to new data:
    the overlap check refuses, and the refcount is given back."""
    refblock = u(base, u(base, 48, ">Q"), ">Q")
    put(base, refblock, ">H", 0)  # the refcount of cluster 0
    before, check_before = digest(base), check_summary(base)
    refused(base, "EUCLEAN", "overlaps the header", "write", str(2 << 20), "4096")
    assert digest(base) == before
    assert check_summary(base) == check_before


def test_repair_refuses_broken_refcount_structure(base):
    """Repair writes refcounts only into refblocks that are nothing else: a
    refcount table entry pointing at the L1 table is left alone."""
    rt = u(base, 48, ">Q")
    put(base, rt + 8, ">Q", 0x30000)
    before = digest(base)
    name, msg = probe("check", base, "all")
    assert name == "EUCLEAN" and "refcount structure" in msg, msg
    assert digest(base) == before


def test_dirty_bit_with_broken_refcounts(base):
    """A dirty image is repaired on a writable open; when that is not possible
    the open fails as corrupt instead of writing anything."""
    rt = u(base, 48, ">Q")
    put(base, 72, ">Q", 1)
    put(base, rt + 8, ">Q", 0x40000)  # refblock 1 is the L2 table
    before = digest(base)
    refused(base, "EUCLEAN", "refcount", "open", "rw")
    assert digest(base) == before
    assert probe("open", base)[0] == "OK"  # read-only opens do not repair


def test_allocation_with_uncovered_range_refused(base):
    """A refcount table that does not cover the whole file (here: no refblock
    for the range of the header) would make a new refblock land on what is
    stored there (the header itself): allocations are refused instead."""
    put(base, u(base, 48, ">Q"), ">Q", 0)
    before = digest(base)
    refused(base, "EUCLEAN", "does not cover", "write", str(2 << 20), "4096")
    assert digest(base) == before
