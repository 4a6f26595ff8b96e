# SPDX-License-Identifier: LGPL-2.1-or-later
"""Fixtures for the library tests: dc-tool (our side) and qemu-img (the oracle)."""
import json
import os
import subprocess

import pytest

BUILD = os.environ.get("DISKCHAIN_BUILD", os.path.join(os.path.dirname(__file__), "..", "..", "build"))
DC_TOOL = os.path.join(BUILD, "tests", "dc-tool")


def run(*args, check=True, env=None, **kw):
    e = dict(os.environ)
    if env:
        e.update(env)
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True, env=e, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def dc(*args, **kw):
    if os.environ.get("DISKCHAIN_VALGRIND") and "DC_FAULT_WRITES" not in (kw.get("env") or {}):
        p = run("valgrind", "-q", "--error-exitcode=66", "--leak-check=full", "--errors-for-leak-kinds=definite",
                DC_TOOL, *args, **kw)
        assert p.returncode != 66, f"valgrind found errors in dc-tool {args}:\n{p.stderr}"
        return p
    return run(DC_TOOL, *args, **kw)


def qemu_img(*args, **kw):
    return run("qemu-img", *args, **kw)


def qemu_io(img, *cmds, fmt="qcow2"):
    args = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    return run(*args, img)


def qemu_map(img):
    return json.loads(qemu_img("map", "--output=json", img).stdout)


def dc_map(img):
    return json.loads(dc("map", img).stdout)


def assert_clean(img):
    """qemu-img check must find no corruption and no leak."""
    p = qemu_img("check", "--output=json", img, check=False)
    assert p.returncode == 0, f"qemu-img check {img}: exit {p.returncode}\n{p.stdout}{p.stderr}"


def assert_same_content(img, ref, fmt="qcow2", ref_fmt="raw"):
    p = qemu_img("compare", "-f", fmt, "-F", ref_fmt, img, ref, check=False)
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.fixture
def tmp(tmp_path):
    return tmp_path
