# SPDX-License-Identifier: LGPL-2.1-or-later
"""Images written by qemu-img/qemu-io are read by libdiskchain with byte-identical
guest data and the same map as `qemu-img map --output=json`."""
import filecmp
import os

import pytest

from imgtest import dc, dc_map, qemu_img, qemu_io, qemu_map

VARIANTS = [
    # compat, cluster size, refcount bits
    ("0.10", 65536, 16),
    ("1.1", 512, 16),
    ("1.1", 4096, 1),
    ("1.1", 65536, 16),
    ("1.1", 65536, 64),
    ("1.1", 2097152, 16),
    ("0.10", 4096, 16),
    ("1.1", 512, 64),
]


def fill(img, cs, v3):
    cmds = [
        "write -P 0x11 0 %d" % (3 * cs),
        "write -P 0x22 %d 1000" % (5 * cs + 17),
        "write -P 0x33 1M 64k",
        "write -P 0x44 5M 300k",
        "discard 5M 128k",
        "write -P 0x55 12M 1M",
    ]
    if v3:
        cmds.append("write -z 12M 256k")  # zero clusters
    qemu_io(img, *cmds)


def compare_read(img, tmp):
    ref = tmp / "ref.raw"
    out = tmp / "out.raw"
    qemu_img("convert", "-O", "raw", img, ref, cwd=img.parent)
    dc("read", img, out)
    assert filecmp.cmp(ref, out, shallow=False), f"{img}: guest data differs from qemu-img convert"


@pytest.mark.parametrize("compat,cs,rb", VARIANTS)
def test_variant(tmp, compat, cs, rb):
    img = tmp / "v.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o",
             f"compat={compat},cluster_size={cs},refcount_bits={rb}", img, "32M")
    fill(img, cs, compat == "1.1")
    compare_read(img, tmp)
    assert dc_map(img) == qemu_map(img)
    assert dc("check", img).returncode == 0


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
@pytest.mark.parametrize("cs", [4096, 65536])
def test_compressed(tmp, ctype, cs):
    src = tmp / "src.qcow2"
    img = tmp / "c.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", src, "16M")
    qemu_io(src, "write -P 0xab 0 2M", "write -P 0 2M 1M", "write -P 0x12 7M 100k")
    # mix in incompressible data
    rnd = tmp / "rnd.bin"
    rnd.write_bytes(os.urandom(256 * 1024))
    qemu_io(src, "write -P 0x99 10M 4k")
    qemu_img("convert", "-c", "-O", "qcow2", "-o", f"compression_type={ctype},cluster_size={cs}", src, img)
    compare_read(img, tmp)
    assert dc_map(img) == qemu_map(img)
    info = dc("info", img).stdout
    assert "format=qcow2" in info


@pytest.mark.parametrize("prealloc", ["metadata", "falloc", "full"])
def test_preallocated(tmp, prealloc):
    img = tmp / "p.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"preallocation={prealloc}", img, "8M")
    qemu_io(img, "write -P 0x71 1M 64k")
    compare_read(img, tmp)
    assert dc_map(img) == qemu_map(img)


def test_chain_relative_and_raw_base(tmp):
    os.mkdir(tmp / "sub")
    base = tmp / "base.raw"
    qemu_img("create", "-q", "-f", "raw", base, "16M")
    qemu_io(base, "write -P 0x01 0 4M", fmt="raw")
    mid = tmp / "sub" / "mid.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "../base.raw", "-F", "raw", mid)
    qemu_io(mid, "write -P 0x02 1M 1M", "write -z 3M 64k")
    top = tmp / "sub" / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", top)
    qemu_io(top, "write -P 0x03 1536k 1M", "write -P 0x04 15M 4k")
    compare_read(top, tmp)
    assert dc_map(top) == qemu_map(top)
    info = dc("info", top).stdout.splitlines()
    assert len(info) == 3
    assert "backing=mid.qcow2 backing-format=qcow2" in info[0]
    assert info[2].startswith(str(base)) and "format=raw" in info[2]


def test_shorter_backing_reads_zero(tmp):
    base = tmp / "b.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "1M")
    qemu_io(base, "write -P 0x61 0 1M")
    top = tmp / "t.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", top, "4M")
    compare_read(top, tmp)


def test_bitmaps_preserved(tmp):
    img = tmp / "bm.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "16M")
    qemu_img("bitmap", "--add", img, "bm0")
    qemu_io(img, "write -P 0x11 0 64k")
    compare_read(img, tmp)
    assert dc("check", img).returncode == 0
    # our write is recorded into the bitmap, which stays consistent after a clean close
    dc("io", img, "write", "0x22", "1M", "64k")
    info = qemu_img("info", "--output=json", img).stdout
    assert '"in-use"' not in info and '"bm0"' in info
    assert dc("bitmaps", img, "bm0").stdout == f"0 65536\n{1 << 20} 65536\n"
    p = qemu_img("check", img, check=False)
    assert p.returncode == 0, p.stdout + p.stderr


# Extended L2 entries (subclusters) and external data files: images made by
# qemu-img/qemu-io with data, zero clusters, writes and zero writes of parts
# of clusters (subclusters), a discard, and a backing file below where the
# format allows one.
NEW_VARIANTS = [
    # options, backing file below
    ("extended_l2=on,cluster_size=16384", False),
    ("extended_l2=on,cluster_size=65536", True),
    ("extended_l2=on,cluster_size=2097152", True),
    ("extended_l2=on,cluster_size=65536,compat=1.1,refcount_bits=1", False),
    ("data_file=data.raw", False),
    ("data_file=data.raw", True),
    ("data_file=data.raw,cluster_size=4096", True),
    ("data_file=data.raw,data_file_raw=on", False),
    ("data_file=data.raw,extended_l2=on", True),
    ("data_file=data.raw,data_file_raw=on,extended_l2=on,cluster_size=32768", False),
]


def fill_subclusters(img, **kw):
    qemu_io(img,
            "write -P 0x11 0 3k",             # part of the first subcluster(s)
            "write -P 0x12 70000 5000",       # unaligned, across subclusters
            "write -P 0x13 1M 64k",
            "write -P 0x14 2M 300k",
            "write -z 2M 8k",                 # zero subclusters of an allocated cluster
            "write -z -u 2200k 64k",
            "write -z 5M 2k",                 # zero subclusters of an unallocated cluster
            "discard 1M 64k",
            "write -P 0x15 12M 1M",
            "write -P 0x16 15M 1000",         # a partial write over the backing file
            "write -z 12M 256k", **kw)


@pytest.mark.parametrize("opts,backing", NEW_VARIANTS,
                         ids=[f"{o}{',backing' if b else ''}" for o, b in NEW_VARIANTS])
def test_extended_l2_and_data_file(tmp, opts, backing):
    img = tmp / "v.qcow2"
    args = ["create", "-q", "-f", "qcow2", "-o", opts]
    if backing:
        base = tmp / "base.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", base, "32M")
        qemu_io(base, "write -P 0xb1 0 32M")
        args += ["-b", "base.qcow2", "-F", "qcow2"]
    # QEMU opens a relative data file name from its working directory (we
    # from the image's directory): run it where the image is
    qemu_img(*args, img, "32M", cwd=tmp)
    fill_subclusters(img, cwd=tmp)
    compare_read(img, tmp)
    assert dc_map(img) == qemu_map(img, cwd=tmp)
    assert dc("check", img).returncode == 0


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_compressed_extended_l2(tmp, ctype):
    src = tmp / "src.qcow2"
    img = tmp / "c.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", src, "8M")
    qemu_io(src, "write -P 0xab 0 2M", "write -P 0x12 3M 100k")
    qemu_img("convert", "-c", "-O", "qcow2", "-o", f"compression_type={ctype},extended_l2=on", src, img)
    qemu_io(img, "write -P 0x77 4k 4k")  # an allocating write over a compressed cluster
    compare_read(img, tmp)
    assert dc_map(img) == qemu_map(img)
    assert dc("check", img).returncode == 0
