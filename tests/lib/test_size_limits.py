# SPDX-License-Identifier: LGPL-2.1-or-later
"""The sizes libdiskchain creates and grows qcow2 images to are exactly those
qemu-img 7.2 accepts, for every cluster size: the boundary is measured with
qemu-img itself in each run, not written down here.

Measured (qemu-img 7.2): `create -f qcow2` rounds the size up to a multiple of
512 and refuses with EFBIG ("The image size is too large for file format
'qcow2'") what needs an L1 table over 32 MiB, i.e. more than
cluster_size^2 * 2^19 bytes (2^18 with extended L2 entries); `resize` refuses
a size that is not a multiple of 512 and the same sizes with EFBIG ("Failed to
grow the L1 table: File too large"); neither takes a size above 2^63 - 1."""
import json
import shutil

import pytest

from imgtest import probe, qemu_img

CLUSTER_SIZES = [512 << i for i in range(13)]  # 512 B .. 2 MiB


def qcow2_max(cs, extended_l2=False):
    return (1 << 22) * (cs // (16 if extended_l2 else 8)) * cs


def qemu_creates(path, size, cs, extra=""):
    p = qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs}{extra}", path, str(size), check=False)
    path.unlink(missing_ok=True)
    return p.returncode == 0


def qemu_resizes(path, size):
    return qemu_img("resize", "-q", "-f", "qcow2", path, str(size), check=False).returncode == 0


def virtual_size(path):
    return json.loads(qemu_img("info", "--output=json", path).stdout)["virtual-size"]


@pytest.mark.parametrize("cs", CLUSTER_SIZES)
def test_create_boundary(tmp, cs):
    top = qcow2_max(cs)
    # near 2^64 first: the cluster count used to wrap to 0 there and the image was created
    sizes = [(1 << 64) - 512, (1 << 63) - 512, top - 512, top, top + 512]
    for size in sizes:
        expect = qemu_creates(tmp / "q.qcow2", size, cs)
        name, msg = probe("create", tmp / "d.qcow2", str(size), str(cs))
        assert (name == "OK") == expect, f"cluster size {cs}, size {size}: qemu-img {'accepts' if expect else 'refuses'}, we say {name} {msg}"
        if expect:
            assert virtual_size(tmp / "d.qcow2") == size
            p = qemu_img("check", tmp / "d.qcow2", check=False)
            assert p.returncode == 0, p.stdout + p.stderr
            (tmp / "d.qcow2").unlink()
        else:
            assert name == "EFBIG" and "limit" in msg, msg
    # the boundary itself is where qemu-img says it is
    assert qemu_creates(tmp / "q.qcow2", top, cs) and not qemu_creates(tmp / "q.qcow2", top + 512, cs)


def test_create_rounds_up_like_qemu(tmp):
    assert qemu_creates(tmp / "q.qcow2", 1000, 65536)
    assert probe("create", tmp / "d.qcow2", "1000")[0] == "OK"
    assert virtual_size(tmp / "d.qcow2") == 1024


def resize_like_qemu(tmp, opts, sizes):
    """Resize copies of one image with qemu-img and with us to each size: the
    same decision, and the right errno class when refused."""
    base = tmp / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", opts, base, "1M")
    for size in sizes:
        q, d = tmp / "q.qcow2", tmp / "d.qcow2"
        shutil.copy(base, q)
        shutil.copy(base, d)
        expect = qemu_resizes(q, size)
        name, msg = probe("resize", d, str(size))
        assert (name == "OK") == expect, f"{opts}, size {size}: qemu-img {'accepts' if expect else 'refuses'}, we say {name} {msg}"
        if expect:
            assert virtual_size(d) == size
            p = qemu_img("check", d, check=False)
            assert p.returncode == 0, p.stdout + p.stderr
        else:
            assert name == "EINVAL" if size % 512 else name == "EFBIG", msg
            assert virtual_size(d) == 1 << 20
        q.unlink()
        d.unlink()


@pytest.mark.parametrize("cs", CLUSTER_SIZES)
def test_resize_boundary(tmp, cs):
    top = qcow2_max(cs)
    resize_like_qemu(tmp, f"cluster_size={cs}", [top, top + 512, 2 << 20 | 1, (1 << 63) - 512])


@pytest.mark.parametrize("cs", [16384, 65536, 2097152])
def test_resize_boundary_extended_l2(tmp, cs):
    """Extended L2 entries are twice as wide: an L1 table maps half as much."""
    top = qcow2_max(cs, extended_l2=True)
    assert qemu_creates(tmp / "q.qcow2", top, cs, ",extended_l2=on")
    assert not qemu_creates(tmp / "q.qcow2", top + 512, cs, ",extended_l2=on")
    resize_like_qemu(tmp, f"cluster_size={cs},extended_l2=on", [top, top + 512])


def test_open_refuses_beyond_limit(tmp):
    """A header whose size needs more than a 32 MiB L1 table is refused (EFBIG)
    even when l1_size looks big enough, and a size near 2^64 does not wrap."""
    import struct
    img = tmp / "big.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", img, "1M")
    for size in [qcow2_max(65536) + 512, (1 << 64) - 512]:
        with open(img, "r+b") as f:
            f.seek(24)
            f.write(struct.pack(">Q", size))
        name, msg = probe("open", img)
        assert name == "EFBIG" and "size" in msg, msg

