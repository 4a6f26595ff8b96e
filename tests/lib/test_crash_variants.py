# SPDX-License-Identifier: LGPL-2.1-or-later
"""Crash safety of the image variants qemu-img makes and we write in place:
extended L2 entries (subcluster bitmaps) and external data files.  As in
test_crash.py, the write stream is cut before each write the library makes
(DC_FAULT_WRITES=N), and what is left must pass qemu-img check with leaks at
worst, while what was written before reads back unchanged."""
import shutil

import pytest

from imgtest import dc, qemu_img, qemu_io

OPS = [
    "write", "0x21", "100000", "300000",       # allocating, partial subclusters
    "write", "0x22", "120000", "3000",         # in place, into allocated clusters' subclusters
    "zero", "1M", "256k",
    "zero", "2M", "6k",                        # zero subclusters
    "write", "0x23", "2M", "100",
    "discard", "100000", "200000",
    "resize", "24M",
    "write", "0x24", str(20 << 20), "70000",
]

VARIANTS = [
    ("extended_l2=on,cluster_size=32768", True),
    ("data_file=data.raw", True),
    ("data_file=data.raw,extended_l2=on", False),
    ("data_file=data.raw,data_file_raw=on", False),
]


@pytest.mark.parametrize("opts,backing", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_cut_everywhere(tmp, opts, backing):
    args = ["create", "-q", "-f", "qcow2", "-o", opts]
    if backing:
        qemu_img("create", "-q", "-f", "qcow2", tmp / "base.qcow2", "16M")
        qemu_io(tmp / "base.qcow2", "write -P 0x10 0 16M")
        args += ["-b", "base.qcow2", "-F", "qcow2"]
    pristine = tmp / "pristine.qcow2"
    qemu_img(*args, pristine, "16M", cwd=tmp)
    qemu_io(pristine, "write -P 0x77 12M 64k", cwd=tmp)  # must survive every cut
    data = "data.raw" in opts
    if data:
        shutil.copy(tmp / "data.raw", tmp / "pristine.raw")
    cuts, n = 0, 0
    while True:
        n += 1 if n < 200 else 5
        img = tmp / "top.qcow2"
        shutil.copy(pristine, img)
        if data:
            shutil.copy(tmp / "pristine.raw", tmp / "data.raw")
        p = dc("io", img, *OPS, check=False, env={"DC_FAULT_WRITES": str(n)})
        chk = qemu_img("check", "--output=json", img, check=False, cwd=tmp)
        assert chk.returncode in (0, 3), f"cut before write {n}: qemu-img check exit {chk.returncode}\n{chk.stdout}{chk.stderr}"
        qemu_io(img, "read -P 0x77 12M 64k", cwd=tmp)
        if backing:
            qemu_io(img, "read -P 0x10 8M 64k", cwd=tmp)
        if p.returncode == 0:
            break
        assert p.returncode == 99, p.stderr
        cuts += 1
    assert cuts > 5, "the scenario made too few writes to be a test"
