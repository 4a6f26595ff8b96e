# SPDX-License-Identifier: LGPL-2.1-or-later
"""External data files: the name is resolved like a backing file name (against
the image's directory; QEMU takes its working directory instead), confined to
the storage roots like one, locked like the image, and exposed as stored and
as resolved."""
import os
import struct
import subprocess
import time

import pytest

from imgtest import probe, qemu_img, qemu_io

CONFINEMENT = ("EPERM", "EXDEV")


def set_data_file_name(img, name):
    """Rewrite the data file name extension (the extensions are rebuilt in order)."""
    data = bytearray(open(img, "rb").read(65536))
    p = struct.unpack(">I", data[100:104])[0]
    exts = []
    while True:
        t, ln = struct.unpack(">II", data[p:p + 8])
        if t == 0:
            break
        exts.append((t, bytes(data[p + 8:p + 8 + ln])))
        p += 8 + (ln + 7) // 8 * 8
    assert any(t == 0x44415441 for t, _ in exts)
    out = b""
    for t, d in exts:
        if t == 0x44415441:
            d = name.encode()
        out += struct.pack(">II", t, len(d)) + d + b"\0" * ((8 - len(d) % 8) % 8)
    out += b"\0" * 8
    start = struct.unpack(">I", data[100:104])[0]
    assert start + len(out) <= 65536
    data[start:start + len(out)] = out
    with open(img, "r+b") as f:
        f.write(data[:start + len(out)])


@pytest.fixture
def root(tmp):
    r = tmp / "root"
    (r / "sub").mkdir(parents=True)
    return r


def make(root, name="sub/d.qcow2", data="d.raw", **kw):
    img = root / name
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={data}", img, "4M", cwd=img.parent, **kw)
    qemu_io(img, "write -P 0x42 0 64k", cwd=img.parent)
    return img


def test_names_stored_and_resolved(root):
    img = make(root)
    p = subprocess.run([*_probe_cmd(), "datafile", str(img)], capture_output=True, text=True,
                       env={**os.environ, "DC_ROOT": str(root)}, cwd="/")
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"stored=d.raw\nresolved={root}/sub/d.raw\n" in p.stdout


def _probe_cmd():
    from imgtest import _probe_binary
    return [_probe_binary()]


def test_relative_to_the_image_not_the_cwd(root, tmp):
    """QEMU opens 'd.raw' from its working directory: from the parent of the
    image's directory it fails; we find it beside the image from anywhere."""
    img = make(root)
    from imgtest import run
    p = run("qemu-io", "-f", "qcow2", "-c", "read 0 4k", img, check=False, cwd=root)
    assert p.returncode != 0 and "Could not open 'd.raw'" in p.stderr, p.stdout + p.stderr
    assert probe("read", img, "0", "4096", cwd=root) == ("OK", "")
    assert probe("read", img, "0", "4096", cwd="/") == ("OK", "")


@pytest.mark.parametrize("name,errnos", [
    ("../../outside.raw", CONFINEMENT),
    ("/etc/passwd", CONFINEMENT),
    ("nbd://localhost/export", CONFINEMENT),
    ("json:{\"driver\": \"file\"}", CONFINEMENT),
    ("link.raw", CONFINEMENT),        # a symlink out of the root
    ("missing.raw", ("ENOENT",)),
])
def test_confined_to_the_roots(root, tmp, name, errnos):
    (tmp / "outside.raw").write_bytes(b"\0" * 65536)
    os.symlink(tmp / "outside.raw", root / "sub" / "link.raw")
    img = make(root, data="d-with-a-long-enough-name-to-rewrite-in-place.raw")
    set_data_file_name(img, name)
    env = {"DC_ROOT": str(root)}
    for cmd in (("open",), ("open", "rw"), ("check",)):
        got, msg = probe(cmd[0], img, *cmd[1:], env=env)
        assert got in errnos, f"{name} {cmd}: {got} {msg}"
    # without roots only protocol names stay refused
    if name.startswith(("nbd:", "json:")):
        assert probe("open", img)[0] in CONFINEMENT


def test_data_file_lock_respected(root):
    """A process that has the data file open for writing (here qemu-io on the
    raw file itself) keeps us from writing the image, as QEMU would."""
    img = make(root)
    holder = subprocess.Popen(["qemu-io", "-f", "raw", str(root / "sub" / "d.raw")], stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        name, msg = probe("write", img, "0", "512")
        assert name == "EBUSY" and "data file" in msg, msg
        assert probe("open", img)[0] == "EBUSY"  # a reader refuses a writer too, as QEMU's locks say
    finally:
        holder.communicate(b"quit\n", timeout=10)
    assert probe("write", img, "0", "512")[0] == "OK"


def test_compressed_writes_refused(root):
    img = make(root)
    assert probe("write", img, "0", "65536") == ("OK", "")
    name, msg = probe("compress", img, "0", "65536")
    assert name == "ENOTSUP" and "cannot hold compressed clusters" in msg, msg


def test_data_file_grows_with_the_disk(root):
    img = make(root)
    assert probe("resize", img, str(8 << 20))[0] == "OK"
    assert os.path.getsize(root / "sub" / "d.raw") >= 8 << 20
    assert qemu_img("check", img, cwd=img.parent).returncode == 0


def test_data_file_is_not_the_image(root):
    """A data file that is the image itself would put guest data over the
    metadata: refused as corruption."""
    img = make(root, data="d-with-a-long-enough-name-to-rewrite-in-place.raw")
    set_data_file_name(img, "d.qcow2")
    for cmd in (("open",), ("write", "0", "512")):
        name, msg = probe(cmd[0], img, *cmd[1:])
        assert name == "EUCLEAN" and "data file" in msg, msg
