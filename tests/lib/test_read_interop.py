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
    qemu_img("convert", "-O", "raw", img, ref)
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
    # our write marks the bitmap in-use (not tracked by us) and keeps the extension
    dc("io", img, "write", "0x22", "1M", "64k")
    info = qemu_img("info", "--output=json", img).stdout
    assert '"in-use"' in info and '"bm0"' in info
    p = qemu_img("check", img, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
