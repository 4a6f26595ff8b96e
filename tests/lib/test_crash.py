# SPDX-License-Identifier: LGPL-2.1-or-later
"""Crash safety of a killed process: the write stream is cut before every single
write the library makes (DC_FAULT_WRITES=N kills the process right there), and
what is left must pass `qemu-img check` with exit 0 or 3 (leaks at worst, never
corruption), while data written before the cut reads back unchanged.  The page
cache outlives a killed process, so this proves the order of the writes, not
that they were synced: test_powerloss.py models losing the power."""
import shutil

import pytest

from imgtest import dc, qemu_img, qemu_io, run

SCENARIOS = {
    # allocating writes, a new L2 table, COW over a backing file, zero clusters,
    # compressed clusters, discards and an L1 growth
    "mixed": (["cluster-size=4096"], [
        "write", "0x21", "100000", "300000",
        "zero", "1M", "256k",
        "compress", "0x22", "4M", "64k",
        "write", "0x23", "4M", "5000",
        "discard", "100000", "200000",
        "resize", "64M",
        "write", "0x24", str(60 << 20), "70000",
    ]),
    # 512-byte clusters with 64-bit refcounts: refblocks and the refcount
    # table itself have to grow, several times
    "reftable-growth": (["cluster-size=512", "refcount-bits=64"], [
        "write", "0x31", "1M", "2304k",
    ]),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_cut_everywhere(tmp, name):
    opts, ops = SCENARIOS[name]
    base = tmp / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "16M")
    qemu_io(base, "write -P 0x10 0 16M")
    pristine = tmp / "pristine.qcow2"
    dc("create", pristine, "0", "backing=base.qcow2", *opts)
    # data committed before any cut: must survive every cut
    dc("io", pristine, "write", "0x77", str(12 << 20), "64k")
    cuts = 0
    n = 0
    while True:
        # every write point early on, then a co-prime stride through the rest
        n += 1 if n < 400 else 7
        img = tmp / "top.qcow2"
        shutil.copy(pristine, img)
        p = dc("io", img, *ops, check=False, env={"DC_FAULT_WRITES": str(n)})
        chk = qemu_img("check", "--output=json", img, check=False)
        assert chk.returncode in (0, 3), f"cut before write {n}: qemu-img check exit {chk.returncode}\n{chk.stdout}{chk.stderr}"
        qemu_io(img, "read -P 0x77 12M 64k", "read -P 0x10 8M 64k")
        if p.returncode == 0:
            break
        assert p.returncode == 99, p.stderr
        cuts += 1
    assert cuts > 5, "the scenario made too few writes to be a test"
