# SPDX-License-Identifier: LGPL-2.1-or-later
"""qcow2 header rules: what must be preserved, cleared, honoured or refused."""
import json
import struct

import pytest

from imgtest import assert_clean, dc, qemu_img, qemu_io, run


def header_u64(path, off):
    with open(path, "rb") as f:
        f.seek(off)
        return struct.unpack(">Q", f.read(8))[0]


def set_u64(path, off, value):
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(struct.pack(">Q", value))


def end_of_extensions(path):
    """Offset of the end-of-extensions marker."""
    data = open(path, "rb").read(65536)
    p = struct.unpack(">I", data[100:104])[0]
    while True:
        t, ln = struct.unpack(">II", data[p:p + 8])
        if t == 0:
            return p
        p += 8 + (ln + 7) // 8 * 8


def test_unknown_extension_and_trailing_fields_preserved(tmp):
    img = tmp / "u.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "4M")
    end = end_of_extensions(img)
    with open(img, "r+b") as f:  # an extension nobody knows, then the end marker
        f.seek(end)
        f.write(struct.pack(">II", 0x12345678, 5) + b"hello\0\0\0" + b"\0" * 8)
    before = open(img, "rb").read(512)
    dc("io", img, "write", "0x42", "0", "1M", "resize", "8M")
    after = open(img, "rb").read(512)
    # only the size field (24..31) may change in the first sector
    assert before[:24] == after[:24] and before[32:] == after[32:]
    assert_clean(img)
    qemu_io(img, "read -P 0x42 0 1M")


def test_unknown_autoclear_bits_cleared_before_first_write(tmp):
    img = tmp / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "4M")
    set_u64(img, 88, 1 << 7)
    dc("read", img, tmp / "out.raw")  # reading leaves it alone
    assert header_u64(img, 88) == 1 << 7
    dc("io", img, "write", "1", "0", "512")
    assert header_u64(img, 88) == 0
    assert_clean(img)


def test_corrupt_bit_makes_image_read_only(tmp):
    img = tmp / "c.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "4M")
    qemu_io(img, "write -P 7 0 64k")
    set_u64(img, 72, 2)
    p = dc("io", img, "write", "1", "0", "512", check=False)
    assert p.returncode != 0 and "marked corrupt" in p.stderr
    dc("read", img, tmp / "out.raw")
    assert open(tmp / "out.raw", "rb").read(65536) == b"\7" * 65536


def test_internal_snapshots_read_only(tmp):
    img = tmp / "s.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "4M")
    qemu_io(img, "write -P 5 0 64k")
    qemu_img("snapshot", "-c", "snap1", img)
    qemu_io(img, "write -P 6 0 4k")
    assert "ro=image has internal snapshots" in dc("info", img).stdout
    p = dc("io", img, "write", "1", "0", "512", check=False)
    assert p.returncode != 0 and "internal snapshots" in p.stderr
    ref = tmp / "ref.raw"
    qemu_img("convert", "-O", "raw", img, ref)
    dc("read", img, tmp / "out.raw")
    assert open(ref, "rb").read() == open(tmp / "out.raw", "rb").read()
    # check counts snapshot tables: a clean image stays clean
    assert dc("check", img).returncode == 0


def test_encrypted_read_only_with_reason(tmp):
    img = tmp / "e.qcow2"
    # LUKS needs an accurate CPU clock for its iteration count, which some
    # sandboxes lack; the legacy AES format is the fallback
    p = qemu_img("create", "-q", "-f", "qcow2", "--object", "secret,id=s0,data=pw",
                 "-o", "encrypt.format=luks,encrypt.key-secret=s0", img, "4M", check=False)
    kind = "LUKS"
    if p.returncode != 0:
        img.unlink(missing_ok=True)
        qemu_img("create", "-q", "-f", "qcow2", "--object", "secret,id=s0,data=pw",
                 "-o", "encrypt.format=aes,encrypt.key-secret=s0", img, "4M")
        kind = "AES"
    run("qemu-io", "--object", "secret,id=s0,data=pw", "--image-opts",
        f"driver=qcow2,file.filename={img},encrypt.key-secret=s0", "-c", "write -P 9 0 64k")
    assert f"ro=image is encrypted ({kind})" in dc("info", img).stdout
    p = dc("io", img, "write", "1", "0", "512", check=False)
    assert p.returncode != 0 and "encrypted" in p.stderr
    p = dc("read", img, tmp / "x.raw", check=False)
    assert p.returncode != 0 and "encrypted" in p.stderr
    assert dc("check", img).returncode == 0  # the LUKS area is counted


def test_unsupported_features_refused_by_name(tmp):
    img = tmp / "x.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "4M")
    # a feature from the future, named in the feature table: rename the
    # table's entry for incompatible bit 4 to bit 5
    data = open(img, "rb").read(65536)
    entry = data.index(b"\x00\x04extended L2 entries")
    with open(img, "r+b") as f:
        f.seek(entry)
        f.write(b"\x00\x05a future feature\x00\x00\x00\x00")
    set_u64(img, 72, 1 << 5)
    p = dc("info", img, check=False)
    assert p.returncode != 0 and "unsupported qcow2 feature(s): a future feature" in p.stderr
    img2 = tmp / "y.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img2, "4M")
    set_u64(img2, 72, 1 << 33)
    p = dc("info", img2, check=False)
    assert p.returncode != 0 and "unknown incompatible feature bit 33" in p.stderr


def test_chain_depth_limit(tmp):
    prev = None
    for i in range(6):
        name = f"l{i}.qcow2"
        args = ["create", "-q", "-f", "qcow2"]
        if prev:
            args += ["-b", prev, "-F", "qcow2"]
        qemu_img(*args, tmp / name, "1M")
        prev = name
    assert len(dc("info", tmp / prev).stdout.splitlines()) == 6
    p = dc("info", tmp / prev, check=False, env={"DC_MAX_DEPTH": "4"})
    assert p.returncode != 0 and "deeper than 4" in p.stderr


def test_qemu_lock_respected(tmp):
    """An image QEMU has open for writing is not written by us (OFD locks)."""
    import subprocess
    img = tmp / "locked.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "4M")
    holder = subprocess.Popen(["qemu-io", "-f", "qcow2", str(img)], stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import time
        time.sleep(0.5)
        p = dc("io", img, "write", "1", "0", "512", check=False)
        assert p.returncode != 0 and "in use by another process" in p.stderr
    finally:
        holder.communicate(b"quit\n", timeout=10)
    dc("io", img, "write", "1", "0", "512")
    # and while we hold it, qemu-img refuses to write it
    assert_clean(img)
