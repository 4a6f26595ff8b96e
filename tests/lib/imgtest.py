# SPDX-License-Identifier: LGPL-2.1-or-later
"""Fixtures for the library tests: dc-tool (our side) and qemu-img (the oracle)."""
import hashlib
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


def qemu_io(img, *cmds, fmt="qcow2", **kw):
    args = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    return run(*args, img, **kw)


def qemu_map(img, **kw):
    return json.loads(qemu_img("map", "--output=json", img, **kw).stdout)


def dc_map(img):
    return json.loads(dc("map", img).stdout)


def assert_clean(img, **kw):
    """qemu-img check must find no corruption and no leak."""
    p = qemu_img("check", "--output=json", img, check=False, **kw)
    assert p.returncode == 0, f"qemu-img check {img}: exit {p.returncode}\n{p.stdout}{p.stderr}"


def assert_same_content(img, ref, fmt="qcow2", ref_fmt="raw", **kw):
    p = qemu_img("compare", "-f", fmt, "-F", ref_fmt, img, ref, check=False, **kw)
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.fixture
def tmp(tmp_path):
    return tmp_path


_PROBE = None


def _probe_binary():
    """Build tests/lib/dc-probe.c against this build's libdiskchain.a (once per
    library build: the binary is named after the library's hash), into the
    build directory, where nothing of it outlives the build."""
    global _PROBE
    if _PROBE:
        return _PROBE
    here = os.path.dirname(os.path.abspath(__file__))
    lib = os.path.join(BUILD, "lib", "libdiskchain.a")
    src = os.path.join(here, "dc-probe.c")
    h = hashlib.sha256(open(lib, "rb").read() + open(src, "rb").read()).hexdigest()[:16]
    out = os.path.join(BUILD, "tests", f"dc-probe-{h}")
    if not os.path.exists(out):
        flags = []
        try:
            opts = json.load(open(os.path.join(BUILD, "meson-info", "intro-buildoptions.json")))
            san = next((o["value"] for o in opts if o["name"] == "b_sanitize"), "none")
            if san and san != "none":
                flags.append(f"-fsanitize={san}")
        except OSError:
            pass
        tmp = out + f".{os.getpid()}"
        run(os.environ.get("CC", "cc"), "-O1", "-g", "-D_GNU_SOURCE", *flags, "-I", os.path.join(here, "..", "..", "lib"),
            src, lib, "-lz", "-lzstd", "-lpthread", "-o", tmp)
        os.replace(tmp, out)
    _PROBE = out
    return out


def probe(*args, **kw):
    """One library call through dc-probe: (errno name or "OK", message)."""
    p = run(_probe_binary(), *args, check=False, **kw)
    assert p.returncode in (0, 1), f"dc-probe {args} crashed ({p.returncode}):\n{p.stdout}{p.stderr}"
    line = p.stdout.splitlines()[-1] if p.stdout else ""
    if line == "OK":
        return "OK", ""
    assert line.startswith("ERR "), f"dc-probe {args}: {p.stdout}{p.stderr}"
    name, _, msg = line[4:].partition(": ")
    return {"EOPNOTSUPP": "ENOTSUP"}.get(name, name), msg
