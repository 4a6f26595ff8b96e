# SPDX-License-Identifier: LGPL-2.1-or-later
"""Block jobs of the library on the seed chain [A] <-- [B] <-- [C] <-- [D]:
stream and intermediate commit give the chain shape and guest data QEMU
gives, with QEMU's event order, and every image passes qemu-img check."""
import json

import pytest

from imgtest import assert_clean, dc, qemu_img, qemu_io

OK_SEQUENCE = ["status created", "status running", "status waiting", "status pending", "completed ok",
               "status concluded", "status null"]


@pytest.fixture
def chain(tmp):
    """A distinct pattern in each layer, and a zero cluster in C over B's data."""
    qemu_img("create", "-q", "-f", "qcow2", tmp / "A.qcow2", "4M")
    qemu_io(tmp / "A.qcow2", "write -P 0xa 0 4M")
    for lower, name, cmds in (("A", "B", ["write -P 0xb 1M 1M"]),
                              ("B", "C", ["write -P 0xc 1536k 512k", "write -z 1M 64k"]),
                              ("C", "D", ["write -P 0xd 3M 256k"])):
        qemu_img("create", "-q", "-f", "qcow2", "-b", f"{lower}.qcow2", "-F", "qcow2", tmp / f"{name}.qcow2")
        qemu_io(tmp / f"{name}.qcow2", *cmds)
    for n in "ABCD":
        qemu_img("convert", "-O", "raw", tmp / f"{n}.qcow2", tmp / f"{n}.ref")
    return tmp


def shape(path):
    info = json.loads(qemu_img("info", "--output=json", "--backing-chain", path).stdout)
    return [i["filename"].rsplit("/", 1)[1] for i in info]


def same(img, ref):
    p = qemu_img("compare", "-F", "raw", img, ref, check=False)
    assert p.returncode == 0, p.stdout + p.stderr


def run_job(*args):
    p = dc("job", *[str(a) for a in args])
    assert p.stdout.split("\n")[:-1] == OK_SEQUENCE, p.stdout
    return p


@pytest.mark.parametrize("case", ["flatten", "to-base", "intermediate"])
def test_stream(chain, case):
    t = chain
    if case == "flatten":          # [D] alone
        run_job("stream", t / "D.qcow2")
        assert shape(t / "D.qcow2") == ["D.qcow2"]
    elif case == "to-base":        # [A] <- [D]
        run_job("stream", t / "D.qcow2", t / "A.qcow2")
        assert shape(t / "D.qcow2") == ["D.qcow2", "A.qcow2"]
    else:                          # [A] <- [C] <- [D]
        run_job("stream", t / "C.qcow2", t / "A.qcow2")
        assert shape(t / "D.qcow2") == ["D.qcow2", "C.qcow2", "A.qcow2"]
        same(t / "C.qcow2", t / "C.ref")
    same(t / "D.qcow2", t / "D.ref")
    # streamed-out images stay valid point-in-time images
    for n in "ABC":
        same(t / f"{n}.qcow2", t / f"{n}.ref")
    for n in "ABCD":
        assert_clean(t / f"{n}.qcow2")


@pytest.mark.parametrize("top,base,expect", [
    ("B", "A", ["D.qcow2", "C.qcow2", "A.qcow2"]),   # seed case 1
    ("C", "A", ["D.qcow2", "A.qcow2"]),              # seed case 2
    ("C", "B", ["D.qcow2", "B.qcow2", "A.qcow2"]),   # seed case 4
])
def test_intermediate_commit(chain, top, base, expect):
    t = chain
    overlay = {"B": "C", "C": "D"}[top]
    run_job("commit", t / f"{overlay}.qcow2", t / f"{top}.qcow2", t / f"{base}.qcow2")
    assert shape(t / "D.qcow2") == expect
    same(t / "D.qcow2", t / "D.ref")
    for n in "ABCD":
        assert_clean(t / f"{n}.qcow2")


def test_commit_grows_smaller_base(tmp):
    qemu_img("create", "-q", "-f", "qcow2", tmp / "small.qcow2", "1M")
    qemu_io(tmp / "small.qcow2", "write -P 1 0 1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "small.qcow2", "-F", "qcow2", tmp / "mid.qcow2", "4M")
    qemu_io(tmp / "mid.qcow2", "write -P 2 3M 64k")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", tmp / "top.qcow2")
    qemu_img("convert", "-O", "raw", tmp / "top.qcow2", tmp / "top.ref")
    run_job("commit", tmp / "top.qcow2", tmp / "mid.qcow2", tmp / "small.qcow2")
    assert json.loads(qemu_img("info", "--output=json", tmp / "small.qcow2").stdout)["virtual-size"] == 4 << 20
    same(tmp / "top.qcow2", tmp / "top.ref")
    assert_clean(tmp / "small.qcow2")


def test_job_refusals(chain):
    t = chain
    p = dc("job", "stream", t / "C.qcow2", t / "D.qcow2", check=False)
    assert p.returncode != 0 and "is not a backing image of" in p.stderr
    p = dc("job", "commit", t / "D.qcow2", t / "C.qcow2", t / "C.qcow2", check=False)
    assert p.returncode != 0 and "cannot commit an image into itself" in p.stderr
    p = dc("job", "commit", t / "D.qcow2", t / "B.qcow2", t / "A.qcow2", check=False)
    assert p.returncode != 0 and "is not the backing file of" in p.stderr
