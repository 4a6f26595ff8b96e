# SPDX-License-Identifier: LGPL-2.1-or-later
"""diskchaind through the real doors: busctl, gdbus and diskchainctl on a
private system bus with the real polkitd; qemu-img judges every image."""
import json
import os
import re
import time
import xml.etree.ElementTree as ET

import pytest

from bustest import SRC, qemu_img, qemu_io, set_group_member, sh

M = "/org/diskchain/DiskChain1"


def data(p):
    return json.loads(p.stdout)["data"]


def create(bus, path, size, *opts, user=None, check=True):
    args = ["sta{sv}", path, str(size), str(len(opts) // 3), *opts]
    return bus.call(M, "Manager", "CreateImage", *args, user=user, check=check)


def image(bus, path):
    return data(bus.call(M, "Manager", "GetImage", "s", path))[0]


def prop(bus, obj, iface, name):
    return data(bus.busctl("--json=short", "get-property", "org.diskchain.DiskChain1", obj,
                           f"org.diskchain.DiskChain1.{iface}", name))


def test_create_chain_and_read_back(bus):
    create(bus, "base.qcow2", 16 << 20, "cluster-size", "u", "4096")
    base = os.path.join(bus.root, "base.qcow2")
    qemu_io(base, "write -P 0x11 0 1M")
    create(bus, "top.qcow2", 0, "backing", "s", "base.qcow2")
    top = os.path.join(bus.root, "top.qcow2")
    info = json.loads(qemu_img("info", "--output=json", "--backing-chain", top).stdout)
    assert [i["filename"] for i in info] == [top, base]
    assert info[0]["backing-filename"] == "base.qcow2" and info[0]["virtual-size"] == 16 << 20
    for f in (base, top):
        assert qemu_img("check", f, check=False).returncode == 0
    t = image(bus, "top.qcow2")
    b = image(bus, base)
    assert prop(bus, t, "Image", "Backing") == b
    assert prop(bus, b, "Image", "Overlays") == [t]
    assert prop(bus, t, "Image", "ClusterSize") == 65536
    assert prop(bus, b, "Image", "ClusterSize") == 4096
    chains = data(bus.call(M, "Manager", "ListChains"))[0]
    assert len(chains) == 1
    assert prop(bus, chains[0], "Chain", "Layers") == [t, b]
    assert prop(bus, chains[0], "Chain", "Depth") == 2
    assert data(bus.call(M, "Manager", "GetChain", "s", "top.qcow2"))[0] == chains[0]
    p = bus.call(M, "Manager", "GetChain", "s", "base.qcow2", check=False)
    assert p.returncode != 0 and "not the active layer" in p.stderr
    # Map through the bus agrees with qemu-img map
    ext = data(bus.call(t, "Image", "Map", "tta{sv}", "0", "0", "0"))[0]
    qm = json.loads(qemu_img("map", "--output=json", top).stdout)
    assert [(e[0], e[1], e[2], e[3], e[4], e[5]) for e in ext] == \
        [(q["start"], q["length"], q["depth"], q["present"], q["zero"], q["data"]) for q in qm]


def test_create_options(bus):
    create(bus, "z.qcow2", 1 << 20, "compat", "s", "1.1", "compression-type", "s", "zstd",
           "refcount-bits", "u", "64", "lazy-refcounts", "b", "true")
    create(bus, "v2.qcow2", 1 << 20, "compat", "s", "0.10")
    create(bus, "m.qcow2", 4 << 20, "preallocation", "s", "metadata")
    create(bus, "r.raw", 1 << 20, "format", "s", "raw", "preallocation", "s", "full")
    fs = json.loads(qemu_img("info", "--output=json", os.path.join(bus.root, "z.qcow2")).stdout)["format-specific"]["data"]
    assert fs["compression-type"] == "zstd" and fs["refcount-bits"] == 64 and fs["lazy-refcounts"]
    assert json.loads(qemu_img("info", "--output=json", os.path.join(bus.root, "v2.qcow2")).stdout)["format-specific"]["data"]["compat"] == "0.10"
    for n in ("z.qcow2", "v2.qcow2", "m.qcow2"):
        assert qemu_img("check", os.path.join(bus.root, n), check=False).returncode == 0
    assert os.path.getsize(os.path.join(bus.root, "r.raw")) == 1 << 20
    # bad options: clear errors naming the problem
    p = create(bus, "bad.qcow2", 1 << 20, "colour", "s", "red", check=False)
    assert "InvalidArgs" in p.stderr or "unknown option 'colour'" in p.stderr
    p = create(bus, "bad.qcow2", 1 << 20, "compat", "s", "2.0", check=False)
    assert "'2.0' is not one of" in p.stderr
    # a size that is no multiple of 512 is rounded up, as qemu-img create does
    create(bus, "odd.qcow2", 1000)
    assert prop(bus, image(bus, "odd.qcow2"), "Image", "VirtualSize") == 1024
    p = create(bus, "z.qcow2", 1 << 20, check=False)
    assert "already exists" in p.stderr
    p = bus.gdbus("--object-path", M, "--method", "org.diskchain.DiskChain1.Manager.CreateImage",
                  "c.qcow2", "1048576", "{'cluster-size': <uint32 1000>}", check=False)
    assert "DiskChain1.Error" in p.stderr or "InvalidArgs" in p.stderr
    assert not os.path.exists(os.path.join(bus.root, "c.qcow2"))


def test_gdbus_and_object_manager(bus):
    p = bus.gdbus("--object-path", M, "--method", "org.diskchain.DiskChain1.Manager.CreateImage",
                  "g.qcow2", "1048576", "{}")
    assert "/org/diskchain/DiskChain1/image/" in p.stdout
    p = bus.gdbus("--object-path", M, "--method", "org.freedesktop.DBus.ObjectManager.GetManagedObjects")
    assert "org.diskchain.DiskChain1.Image" in p.stdout and "org.diskchain.DiskChain1.Chain" in p.stdout
    obj = image(bus, "g.qcow2")
    p = bus.gdbus("--object-path", obj, "--method", "org.diskchain.DiskChain1.Image.Check", "{}")
    assert "'corruptions': <uint64 0>" in p.stdout
    p = bus.gdbus("--object-path", obj, "--method", "org.diskchain.DiskChain1.Image.Resize", "uint64 2097152", "{}")
    assert prop(bus, obj, "Image", "VirtualSize") == 2 << 20
    bus.gdbus("--object-path", obj, "--method", "org.diskchain.DiskChain1.Image.Delete", "{}")
    assert not os.path.exists(os.path.join(bus.root, "g.qcow2"))
    p = bus.call(M, "Manager", "GetImage", "s", "g.qcow2", check=False)
    assert "NotFound" in p.stderr or "no such image" in p.stderr


def test_signals_on_create_and_delete(bus):
    import subprocess
    m = subprocess.Popen(["busctl", "--system", "monitor", "--json=short", "--match",
                          "type='signal',interface='org.freedesktop.DBus.ObjectManager'"],
                         env={**os.environ, **bus.env}, stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    create(bus, "s.qcow2", 1 << 20)
    obj = image(bus, "s.qcow2")
    bus.call(obj, "Image", "Delete", "a{sv}", "0")
    time.sleep(0.5)
    m.terminate()
    out = m.communicate()[0]
    members = [json.loads(l)["member"] for l in out.splitlines() if l.strip()]
    assert members.count("InterfacesAdded") == 2 and members.count("InterfacesRemoved") == 2, members


def test_external_changes_are_seen(bus):
    bus.call(M, "Manager", "ListImages")  # activate
    qemu_img("create", "-q", "-f", "qcow2", os.path.join(bus.root, "ext.qcow2"), "1M")
    for _ in range(50):
        if bus.call(M, "Manager", "GetImage", "s", "ext.qcow2", check=False).returncode == 0:
            break
        time.sleep(0.1)
    assert prop(bus, image(bus, "ext.qcow2"), "Image", "VirtualSize") == 1 << 20


def test_check_repair_through_bus(bus):
    f = os.path.join(bus.root, "leaky.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", f, "4M")
    with open(f, "r+b") as fh:
        fh.truncate(4 * 65536 + 65536)
        fh.seek(0x20000 + 4 * 2)
        fh.write(b"\x00\x01")
    assert qemu_img("check", f, check=False).returncode == 3
    obj = image(bus, f)
    r = data(bus.call(obj, "Image", "Check", "a{sv}", "0"))[0]
    assert r["leaks"]["data"] == 1
    r = data(bus.call(obj, "Image", "Check", "a{sv}", "1", "repair", "s", "leaks"))[0]
    assert r["leaks-fixed"]["data"] == 1 and r["leaks"]["data"] == 0
    assert qemu_img("check", f, check=False).returncode == 0


def test_diskchainctl(bus):
    # create says what it made, with sizes as qemu-img says them
    c1, c2 = os.path.join(bus.root, "c1.qcow2"), os.path.join(bus.root, "c2.qcow2")
    p = bus.ctl("create", "c1.qcow2", "8M")
    assert p.stdout == f"created {c1}: qcow2, 8 MiB (8388608 bytes), cluster size 64 KiB\n", p.stdout
    p = bus.ctl("create", "c2.qcow2", "0", "--backing", "c1.qcow2", "--cluster-size", "4096")
    assert p.stdout == (f"created {c2}: qcow2, 8 MiB (8388608 bytes), cluster size 4 KiB, "
                        "backing file c1.qcow2 (qcow2)\n"), p.stdout
    p = bus.ctl("create", "big.raw", "2G", "--format", "raw")
    assert p.stdout == f"created {os.path.join(bus.root, 'big.raw')}: raw, 2 GiB (2147483648 bytes)\n", p.stdout
    j = json.loads(bus.ctl("--json", "create", "odd.qcow2", "1536K").stdout)  # --json: as info --json
    assert j["virtual-size"] == 1536 << 10 and j["format"] == "qcow2" and j["object"].startswith(M + "/image/")
    images = bus.ctl("images").stdout.splitlines()
    assert re.fullmatch(r"FORMAT +VIRTUAL-SIZE +PATH", images[0]), images
    assert f"qcow2         8 MiB  {c2}  <- c1.qcow2" in images and f"raw           2 GiB  {bus.root}/big.raw" in images
    assert f"qcow2       1.5 MiB  {bus.root}/odd.qcow2" in images, images
    assert "c2.qcow2 <- " in bus.ctl("chains").stdout
    # snapshot and classify say what they made too, not an object path
    c3 = os.path.join(bus.root, "c3.qcow2")
    p = bus.ctl("snapshot", "c2.qcow2", "c3.qcow2")
    assert p.stdout == (f"new active layer {c3}: qcow2, 8 MiB (8388608 bytes), cluster size 64 KiB, "
                        "backing file c2.qcow2 (qcow2)\n"), p.stdout
    with open(os.path.join(bus.root, "disk.bin"), "wb") as f:
        f.write(b"\1" * (1 << 20))
    p = bus.ctl("classify", "disk.bin", "raw")
    assert p.stdout == f"recorded {os.path.join(bus.root, 'disk.bin')}: raw, 1 MiB (1048576 bytes)\n", p.stdout
    info = bus.ctl("info", "c2.qcow2").stdout
    for line in (f"image: {c2}", "format: qcow2", "virtual size: 8 MiB (8388608 bytes)", "cluster size: 4 KiB",
                 "backing file: c1.qcow2"):
        assert line in info.splitlines(), info
    disk = int(re.search(r"^disk size: [0-9.]+ (?:B|KiB|MiB) \((\d+) bytes\)$", info, re.M).group(1))
    assert disk == os.stat(c2).st_blocks * 512
    assert "cluster size: (none)" in bus.ctl("info", "big.raw").stdout
    j = json.loads(bus.ctl("--json", "info", "c2.qcow2").stdout)
    assert j["backing-filename"] == "c1.qcow2" and j["cluster-size"] == 4096 and j["virtual-size"] == 8 << 20
    assert j["actual-size"] == disk
    assert json.loads(bus.ctl("--json", "check", "c2.qcow2").stdout)["corruptions"] == 0
    m = json.loads(bus.ctl("map", "c2.qcow2").stdout)
    assert m[0]["start"] == 0 and m[-1]["start"] + m[-1]["length"] == 8 << 20
    p = bus.ctl("info", "nothere.qcow2", check=False)
    assert p.returncode != 0 and "no such image" in p.stderr
    p = bus.ctl("create", "../../etc/x.qcow2", "1M", check=False)
    assert p.returncode != 0 and "outside the storage roots" in p.stderr


def test_polkit_denials_and_group_rule(bus):
    qemu_img("create", "-q", "-f", "qcow2", os.path.join(bus.root, "p.qcow2"), "1M")
    obj = image(bus, "p.qcow2")
    u = "dctest"
    # listing and properties work for everyone
    assert data(bus.call(M, "Manager", "ListImages", user=u))[0] == [obj]
    assert prop(bus, obj, "Image", "Format") == "qcow2"
    os.chmod(os.path.join(bus.root, "p.qcow2"), 0o644)
    # changes are refused for an ordinary user
    for p in (create(bus, "u.qcow2", 1 << 20, user=u, check=False),
              bus.call(obj, "Image", "Resize", "ta{sv}", str(2 << 20), "0", user=u, check=False),
              bus.call(obj, "Image", "Check", "a{sv}", "1", "repair", "s", "all", user=u, check=False),
              bus.call(obj, "Image", "Delete", "a{sv}", "0", user=u, check=False),
              bus.ctl("create", "u2.qcow2", "1M", user=u, check=False)):
        assert p.returncode != 0
        assert ("not authorized for org.diskchain." in p.stderr or "Access denied" in p.stderr
                or "interactive authentication required" in p.stderr), p.stderr
    assert not os.path.exists(os.path.join(bus.root, "u.qcow2"))
    # without the interactive flag polkit's challenge becomes InteractiveAuthorizationRequired
    p = bus.busctl("--allow-interactive-authorization=no", "call", "org.diskchain.DiskChain1", M,
                   "org.diskchain.DiskChain1.Manager", "CreateImage", "sta{sv}", "u.qcow2", "1048576", "0",
                   user=u, check=False)
    assert p.returncode != 0
    assert ("interactive authentication required" in p.stderr or "not authorized" in p.stderr
            or "Access denied" in p.stderr), p.stderr
    # members of group diskchain may, through the shipped rule
    set_group_member(True)
    try:
        create(bus, "u.qcow2", 1 << 20, user=u)
        bus.call(obj, "Image", "Resize", "ta{sv}", str(2 << 20), "0", user=u)
        r = data(bus.call(obj, "Image", "Check", "a{sv}", "1", "repair", "s", "all", user=u))[0]
        assert r["corruptions"]["data"] == 0
        bus.call(image(bus, "u.qcow2"), "Image", "Delete", "a{sv}", "0", user=u)
    finally:
        set_group_member(False)
    # root is allowed without asking
    create(bus, "root.qcow2", 1 << 20)


def test_hostile_input(bus):
    r = bus.root
    outside = os.path.join(bus.dir, "outside.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", outside, "1M")
    # paths that leave the root
    for p in ("../outside.qcow2", f"{r}/../outside.qcow2", "/etc/passwd"):
        e = bus.call(M, "Manager", "GetImage", "s", p, check=False)
        assert "PathNotAllowed" in e.stderr or "outside the storage roots" in e.stderr, e.stderr
    # a symlink out of the root
    os.symlink(outside, os.path.join(r, "link.qcow2"))
    e = bus.call(M, "Manager", "CreateImage", "sta{sv}", "viaslink.qcow2", "0", "1", "backing", "s", "link.qcow2",
                 check=False)
    assert e.returncode != 0 and "symlink" in e.stderr, e.stderr
    # backing file outside the roots, written by qemu-img
    qemu_img("create", "-q", "-f", "qcow2", "-b", outside, "-F", "qcow2", os.path.join(r, "escape.qcow2"))
    qemu_img("create", "-q", "-f", "qcow2", "-b", "escape.qcow2", "-F", "qcow2", os.path.join(r, "esc2.qcow2"))
    # a backing loop
    a, b = os.path.join(r, "loopa.qcow2"), os.path.join(r, "loopb.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", a, "1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "loopa.qcow2", "-F", "qcow2", b)
    qemu_img("rebase", "-u", "-b", "loopb.qcow2", "-F", "qcow2", a)
    # truncated and fuzzed headers
    good = os.path.join(r, "good.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", good, "1M")
    raw = open(good, "rb").read()
    open(os.path.join(r, "trunc.qcow2"), "wb").write(raw[:50])
    fz = bytearray(raw)
    fz[20:24] = (40).to_bytes(4, "big")  # cluster_bits 40
    open(os.path.join(r, "fuzz1.qcow2"), "wb").write(fz)
    fz = bytearray(raw)
    fz[72:80] = (1 << 40).to_bytes(8, "big")  # unknown incompatible bit
    open(os.path.join(r, "fuzz2.qcow2"), "wb").write(fz)
    time.sleep(0.5)
    # each refused with the D-Bus error for its kind, and a message naming the problem
    for name, err, want in (("esc2.qcow2", "PathNotAllowed", "outside the storage roots"),
                            ("loopa.qcow2", "Corrupt", "loop"), ("trunc.qcow2", "Corrupt", "header"),
                            ("fuzz1.qcow2", "LimitsExceeded", "2 MiB"),
                            ("fuzz2.qcow2", "NotSupported", "unsupported qcow2 feature")):
        obj = bus.gdbus("--object-path", M, "--method", "org.diskchain.DiskChain1.Manager.GetImage", name,
                        check=False)
        if obj.returncode == 0:
            # the layer itself parses: the chain is refused when used
            path = re.search(r"'(/[^']+)'", obj.stdout).group(1)
            e = bus.gdbus("--object-path", path, "--method", "org.diskchain.DiskChain1.Image.Map", "0", "0", "{}",
                          check=False)
        else:
            e = obj
        assert e.returncode != 0 and f"org.diskchain.DiskChain1.Error.{err}" in e.stderr and want in e.stderr, \
            (name, e.stderr)
    # the daemon keeps serving, and nothing was damaged
    assert bus.call(M, "Manager", "GetImage", "s", "good.qcow2").returncode == 0
    assert qemu_img("check", good, check=False).returncode == 0


def test_responsive_during_long_create(bus):
    import subprocess
    big = subprocess.Popen(["busctl", "--system", "--timeout", "300", "call", "org.diskchain.DiskChain1", M,
                            "org.diskchain.DiskChain1.Manager", "CreateImage", "sta{sv}", "big.qcow2",
                            str(2 << 30), "1", "preallocation", "s", "full"],
                           env={**os.environ, **bus.env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(0.3)
    t0 = time.monotonic()
    bus.call(M, "Manager", "ListImages")
    answered = time.monotonic() - t0
    still_running = big.poll() is None
    big.wait(300)
    assert big.returncode == 0
    assert still_running and answered < 2.0, (still_running, answered)


def test_introspection_matches_xml(bus):
    create(bus, "i.qcow2", 1 << 20)
    chain = data(bus.call(M, "Manager", "GetChain", "s", "i.qcow2"))[0]
    create(bus, "x.qcow2", 1 << 20)
    xchain = data(bus.call(M, "Manager", "GetChain", "s", "x.qcow2"))[0]
    export = data(bus.call(xchain, "Chain", "Export", "a{sv}", "0"))[0]
    job = data(bus.call(chain, "Chain", "Stream", "a{sv}", "1", "auto-dismiss", "b", "false"))[0]
    plan = data(bus.call(M, "Manager", "CreatePlan", "sa{sv}", "p", "2", "chain", "s", "i.qcow2", "destination", "s",
                         "b"))[0]
    paths = {"Manager": M, "Image": image(bus, "i.qcow2"), "Chain": chain, "Job": job, "Export": export,
             "Plan": plan}
    for name, path in paths.items():
        iface = f"org.diskchain.DiskChain1.{name}"
        live = data(bus.busctl("--json=short", "call", "org.diskchain.DiskChain1", path,
                               "org.freedesktop.DBus.Introspectable", "Introspect"))[0]
        doc = open(os.path.join(SRC, "interfaces", iface + ".xml")).read()

        def members(x):
            root = ET.fromstring(x.split(">", 1)[1] if x.startswith("<!DOCTYPE") else x)
            out = set()
            for i in root.iter("interface"):
                if i.get("name") != iface:
                    continue
                for m in i:
                    args = tuple((a.get("type"), a.get("direction") or "out") for a in m.findall("arg"))
                    ann = tuple(a.get("value") for a in m.findall("annotation")
                                if a.get("name") == "org.freedesktop.DBus.Property.EmitsChangedSignal")
                    out.add((m.tag, m.get("name"), m.get("type"), args, ann))
            return out
        assert members(live) == members(doc), f"{iface}: XML and daemon differ:\n{members(live) ^ members(doc)}"


def test_activation_and_idle_exit(bus_idle):
    bus = bus_idle
    assert bus.daemon_pid() is None
    bus.call(M, "Manager", "ListImages")
    pid = bus.daemon_pid()
    assert pid
    for _ in range(60):
        if not os.path.exists(f"/proc/{pid}"):
            break
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{pid}"), "daemon did not exit when idle"
    assert bus.daemon_pid() is None
    bus.call(M, "Manager", "ListImages")
    pid2 = bus.daemon_pid()
    assert pid2 and pid2 != pid


def test_every_method_with_busctl_and_gdbus(bus):
    """Each Manager and Image method answers both clients the same way."""
    qemu_img("create", "-q", "-f", "qcow2", os.path.join(bus.root, "e.qcow2"), "1M")
    obj = image(bus, "e.qcow2")
    chain = data(bus.call(M, "Manager", "GetChain", "s", "e.qcow2"))[0]
    G = "org.diskchain.DiskChain1."
    cases = [
        # (path, iface, method, busctl signature+args, gdbus args, expected text in both outputs)
        (M, "Manager", "GetImage", ["s", "e.qcow2"], ["e.qcow2"], obj),
        (M, "Manager", "ListImages", [], [], obj),
        (M, "Manager", "ListChains", [], [], chain),
        (M, "Manager", "GetChain", ["s", "e.qcow2"], ["e.qcow2"], chain),
        (M, "Manager", "ListJobs", [], [], ""),
        (M, "Manager", "QueryBlockJobs", [], [], ""),
        (obj, "Image", "Check", ["a{sv}", "0"], ["{}"], "corruptions"),
        (obj, "Image", "Map", ["tta{sv}", "0", "0", "0"], ["0", "0", "{}"], "1048576"),
    ]
    for path, iface, method, bargs, gargs, want in cases:
        b = bus.call(path, iface, method, *bargs)
        g = bus.gdbus("--object-path", path, "--method", G + iface + "." + method, *gargs)
        assert want in b.stdout and want in g.stdout, (method, b.stdout, g.stdout)
    # methods that fail must fail the same way for both
    b = bus.call(M, "Manager", "GetJob", "s", "nojob", check=False)
    g = bus.gdbus("--object-path", M, "--method", G + "Manager.GetJob", "nojob", check=False)
    assert "no job 'nojob'" in b.stderr and "Error.NotFound" in g.stderr
    # the changing ones, each client in turn
    bus.call(M, "Manager", "CreateImage", "sta{sv}", "b1.qcow2", "1048576", "0")
    bus.gdbus("--object-path", M, "--method", G + "Manager.CreateImage", "g1.qcow2", "1048576", "{}")
    for name, use_gdbus in (("b1.qcow2", False), ("g1.qcow2", True)):
        o = image(bus, name)
        if use_gdbus:
            bus.gdbus("--object-path", o, "--method", G + "Image.Resize", "4194304", "{}")
            bus.gdbus("--object-path", o, "--method", G + "Image.Check", "{'repair': <'all'>}")
            bus.gdbus("--object-path", o, "--method", G + "Image.Delete", "{}")
        else:
            bus.call(o, "Image", "Resize", "ta{sv}", "4194304", "0")
            bus.call(o, "Image", "Check", "a{sv}", "1", "repair", "s", "all")
            bus.call(o, "Image", "Delete", "a{sv}", "0")
        assert not os.path.exists(os.path.join(bus.root, name))


def test_without_polkit_only_root(bus_without_polkit):
    bus = bus_without_polkit
    assert not bus.name_has_owner("org.freedesktop.PolicyKit1")
    create(bus, "root-only.qcow2", 1 << 20)
    p = create(bus, "user.qcow2", 1 << 20, user="dctest", check=False)
    assert p.returncode != 0 and ("not authorized" in p.stderr or "Access denied" in p.stderr), p.stderr
    # reading is still open to everyone
    assert bus.call(M, "Manager", "ListImages", user="dctest").returncode == 0


def test_in_use_by_qemu(bus):
    import subprocess
    f = os.path.join(bus.root, "vm.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", f, "1M")
    obj = image(bus, "vm.qcow2")
    assert prop(bus, obj, "Image", "InUse") == ""
    holder = subprocess.Popen(["qemu-io", "-f", "qcow2", f], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        # QEMU's lock touches no directory: the daemon notices it within a second or two
        for _ in range(50):
            if prop(bus, obj, "Image", "InUse") == "external":
                break
            time.sleep(0.1)
        assert prop(bus, obj, "Image", "InUse") == "external"
        p = bus.call(obj, "Image", "Resize", "ta{sv}", str(2 << 20), "0", check=False)
        assert p.returncode != 0 and "in use by another process" in p.stderr, p.stderr
        p = bus.call(obj, "Image", "Delete", "a{sv}", "0", check=False)
        assert p.returncode != 0 and "in use by another process" in p.stderr, p.stderr
    finally:
        holder.communicate(b"quit\n", timeout=10)
    for _ in range(50):
        if prop(bus, obj, "Image", "InUse") == "":
            break
        time.sleep(0.1)
    assert prop(bus, obj, "Image", "InUse") == ""
    assert qemu_img("check", f, check=False).returncode == 0


# --- block jobs ----------------------------------------------------------------

def make_seed_chain(bus):
    """The seed chain [A] <-- [B] <-- [C] <-- [D], built with CreateImage and
    Snapshot, with a distinct pattern written in each layer."""
    r = bus.root
    create(bus, "A.qcow2", 8 << 20)
    qemu_io(os.path.join(r, "A.qcow2"), "write -P 0xa 0 8M")
    for lower, name, cmd in (("A", "B", "write -P 0xb 1M 2M"), ("B", "C", "write -P 0xc 2M 2M"),
                             ("C", "D", "write -P 0xd 3M 2M")):
        chain = data(bus.call(M, "Manager", "GetChain", "s", f"{lower}.qcow2"))[0]
        new = data(bus.call(chain, "Chain", "Snapshot", "sa{sv}", f"{name}.qcow2", "0"))[0]
        assert prop(bus, new, "Image", "BackingFile") == f"{lower}.qcow2"
        qemu_io(os.path.join(r, f"{name}.qcow2"), cmd)
    for n in "ABCD":
        qemu_img("convert", "-O", "raw", os.path.join(r, f"{n}.qcow2"), os.path.join(bus.dir, f"{n}.ref"))
    time.sleep(0.4)  # let the daemon see qemu-io's writes
    return data(bus.call(M, "Manager", "GetChain", "s", "D.qcow2"))[0]


class Monitor:
    """busctl monitor on the Job interface: the signals in the order received."""
    def __init__(self, bus):
        import subprocess
        self.p = subprocess.Popen(["busctl", "--system", "monitor", "--json=short", "--match",
                                   "type='signal',interface='org.diskchain.DiskChain1.Job'"],
                                  env={**os.environ, **bus.env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
        # busctl says so once BecomeMonitor has succeeded: nothing is missed after
        assert "Monitoring bus message stream" in self.p.stderr.readline()

    def stop(self):
        time.sleep(0.3)
        self.p.terminate()
        out = self.p.communicate()[0]
        sigs = []
        for line in out.splitlines():
            d = json.loads(line)
            payload = d["payload"]["data"]
            sigs.append(d["member"] + ("(" + payload[1] + ")" if d["member"] == "JobStatusChange" else ""))
        return sigs


def wait_gone(bus, job, timeout=30):
    for _ in range(timeout * 10):
        if job not in data(bus.call(M, "Manager", "ListJobs"))[0]:
            return
        time.sleep(0.1)
    raise AssertionError(f"{job} did not finish")


def shape(bus, name):
    info = json.loads(qemu_img("info", "-U", "--output=json", "--backing-chain", os.path.join(bus.root, name)).stdout)
    return [i["filename"].rsplit("/", 1)[1] for i in info]


def assert_chain_intact(bus, expect_shape):
    for n in "ABCD":
        assert qemu_img("check", os.path.join(bus.root, f"{n}.qcow2"), check=False).returncode == 0
    assert shape(bus, "D.qcow2") == expect_shape
    p = qemu_img("compare", "-F", "raw", os.path.join(bus.root, "D.qcow2"), os.path.join(bus.dir, "D.ref"),
                 check=False)
    assert p.returncode == 0, p.stdout


QMP_SUCCESS = ["JobStatusChange(created)", "JobStatusChange(running)", "JobStatusChange(waiting)",
               "JobStatusChange(pending)", "BlockJobCompleted", "JobStatusChange(concluded)",
               "JobStatusChange(null)"]


@pytest.mark.parametrize("case", ["flatten", "to-base", "intermediate"])
def test_stream_over_the_bus(bus, case):
    chain = make_seed_chain(bus)
    mon = Monitor(bus)
    opts = {"flatten": [], "to-base": ["base", "s", "A.qcow2"],
            "intermediate": ["top", "s", "C.qcow2", "base", "s", "A.qcow2"]}[case]
    job = data(bus.call(chain, "Chain", "Stream", "a{sv}", str(len(opts) // 3), *opts))[0]
    wait_gone(bus, job)
    assert mon.stop() == QMP_SUCCESS
    expect = {"flatten": ["D.qcow2"], "to-base": ["D.qcow2", "A.qcow2"],
              "intermediate": ["D.qcow2", "C.qcow2", "A.qcow2"]}[case]
    assert_chain_intact(bus, expect)
    # the model follows: the chain's layers are the new shape
    chain = data(bus.call(M, "Manager", "GetChain", "s", "D.qcow2"))[0]
    assert len(prop(bus, chain, "Chain", "Layers")) == len(expect)


@pytest.mark.parametrize("top,base,expect", [("B", "A", ["D.qcow2", "C.qcow2", "A.qcow2"]),
                                             ("C", "A", ["D.qcow2", "A.qcow2"]),
                                             ("C", "B", ["D.qcow2", "B.qcow2", "A.qcow2"])])
def test_intermediate_commit_over_the_bus(bus, top, base, expect):
    chain = make_seed_chain(bus)
    mon = Monitor(bus)
    job = data(bus.call(chain, "Chain", "Commit", "a{sv}", "2", "top", "s", f"{top}.qcow2", "base", "s",
                        f"{base}.qcow2"))[0]
    wait_gone(bus, job)
    assert mon.stop() == QMP_SUCCESS
    assert_chain_intact(bus, expect)


def test_job_verbs_pause_resume_cancel(bus):
    chain = make_seed_chain(bus)
    mon = Monitor(bus)
    job = data(bus.call(chain, "Chain", "Stream", "a{sv}", "2", "job-id", "s", "slow", "speed", "t", str(256 << 10)))[0]
    assert data(bus.call(M, "Manager", "GetJob", "s", "slow"))[0] == job
    q = data(bus.call(M, "Manager", "QueryBlockJobs"))[0][0]
    assert q["device"]["data"] == "slow" and q["type"]["data"] == "stream" and q["speed"]["data"] == 256 << 10
    # a running stream holds its images
    d = image(bus, "D.qcow2")
    assert prop(bus, d, "Image", "InUse") == "job:slow"
    p = bus.call(d, "Image", "Resize", "ta{sv}", str(16 << 20), "0", check=False)
    assert "in use by job 'slow'" in p.stderr
    p = bus.call(chain, "Chain", "Stream", "a{sv}", "0", check=False)
    assert "Busy" in p.stderr or "in use by job" in p.stderr
    bus.call(job, "Job", "Pause")
    p = bus.call(job, "Job", "Pause", check=False)
    assert "already paused" in p.stderr
    time.sleep(0.5)
    assert prop(bus, job, "Job", "Status") == "paused" and prop(bus, job, "Job", "Paused") is True
    p = bus.call(job, "Job", "Complete", check=False)
    assert "Job 'slow' in state 'paused' cannot accept command verb 'complete'" in p.stderr
    p = bus.call(job, "Job", "Finalize", check=False)
    assert "cannot accept command verb 'finalize'" in p.stderr
    p = bus.call(job, "Job", "Dismiss", check=False)
    assert "cannot accept command verb 'dismiss'" in p.stderr
    bus.call(job, "Job", "Resume")
    bus.call(job, "Job", "SetSpeed", "t", str(128 << 10))
    assert prop(bus, job, "Job", "Speed") == 128 << 10
    bus.call(job, "Job", "Cancel", "b", "false")
    wait_gone(bus, job)
    sigs = mon.stop()
    assert sigs == ["JobStatusChange(created)", "JobStatusChange(running)", "JobStatusChange(paused)",
                    "JobStatusChange(running)", "JobStatusChange(aborting)", "BlockJobCancelled",
                    "JobStatusChange(concluded)", "JobStatusChange(null)"], sigs
    # cancelled stream: D keeps its backing, and data is intact
    assert_chain_intact(bus, ["D.qcow2", "C.qcow2", "B.qcow2", "A.qcow2"])
    assert prop(bus, d, "Image", "InUse") == ""


def test_manual_finalize_and_dismiss(bus):
    chain = make_seed_chain(bus)
    mon = Monitor(bus)
    job = data(bus.call(chain, "Chain", "Stream", "a{sv}", "3", "job-id", "s", "manual", "auto-finalize", "b",
                        "false", "auto-dismiss", "b", "false"))[0]
    for _ in range(100):
        if prop(bus, job, "Job", "Status") == "pending":
            break
        time.sleep(0.1)
    assert shape(bus, "D.qcow2") == ["D.qcow2", "C.qcow2", "B.qcow2", "A.qcow2"]  # not yet finalized
    bus.gdbus("--object-path", job, "--method", "org.diskchain.DiskChain1.Job.Finalize")
    for _ in range(100):
        if prop(bus, job, "Job", "Status") == "concluded":
            break
        time.sleep(0.1)
    assert job in data(bus.call(M, "Manager", "ListJobs"))[0]
    assert prop(bus, job, "Job", "Error") == ""
    bus.call(job, "Job", "Dismiss")
    wait_gone(bus, job)
    assert mon.stop() == ["JobStatusChange(created)", "JobStatusChange(running)", "JobStatusChange(waiting)",
                          "JobStatusChange(pending)", "BlockJobPending", "BlockJobCompleted",
                          "JobStatusChange(concluded)", "JobStatusChange(null)"]
    assert_chain_intact(bus, ["D.qcow2"])


def test_job_refusals_over_the_bus(bus):
    chain = make_seed_chain(bus)
    for opts, want in ((["base", "s", "D.qcow2"], "is not a backing image of"),
                       (["job-id", "s", "9bad"], "Invalid job ID"),
                       (["base", "s", "nope.qcow2"], "is not in this backing file chain"),
                       (["backing-file", "s", "x"], "backing file specified, but streaming the entire chain"),
                       (["colour", "s", "red"], "unknown option 'colour'")):
        p = bus.call(chain, "Chain", "Stream", "a{sv}", str(len(opts) // 3), *opts, check=False)
        assert p.returncode != 0 and want in p.stderr, (opts, p.stderr)
    p = bus.call(chain, "Chain", "Commit", "a{sv}", "2", "top", "s", "B.qcow2", "base", "s", "B.qcow2", check=False)
    assert "cannot commit an image into itself" in p.stderr
    # an unprivileged user may not start jobs
    p = bus.call(chain, "Chain", "Stream", "a{sv}", "0", user="dctest", check=False)
    assert p.returncode != 0 and ("not authorized" in p.stderr or "interactive authentication" in p.stderr
                                  or "Access denied" in p.stderr), p.stderr
    assert data(bus.call(M, "Manager", "ListJobs"))[0] == []
    assert_chain_intact(bus, ["D.qcow2", "C.qcow2", "B.qcow2", "A.qcow2"])


def test_shared_base_needs_force(bus):
    make_seed_chain(bus)
    create(bus, "E.qcow2", 0, "backing", "s", "A.qcow2")  # A is now the base of two chains
    chain = data(bus.call(M, "Manager", "GetChain", "s", "D.qcow2"))[0]
    p = bus.call(chain, "Chain", "Commit", "a{sv}", "2", "top", "s", "C.qcow2", "base", "s", "A.qcow2", check=False)
    assert "force-shared-base" in p.stderr
    job = data(bus.call(chain, "Chain", "Commit", "a{sv}", "3", "top", "s", "C.qcow2", "base", "s", "A.qcow2",
                        "force-shared-base", "b", "true"))[0]
    wait_gone(bus, job)
    assert shape(bus, "D.qcow2") == ["D.qcow2", "A.qcow2"]


def test_daemon_stays_while_job_exists(bus_idle):
    bus = bus_idle
    chain = make_seed_chain(bus)
    job = data(bus.call(chain, "Chain", "Stream", "a{sv}", "2", "job-id", "s", "keep", "auto-dismiss", "b",
                        "false"))[0]
    pid = bus.daemon_pid()
    time.sleep(4)  # longer than the idle timeout: the concluded job keeps the daemon
    assert bus.daemon_pid() == pid
    assert prop(bus, job, "Job", "Status") == "concluded"
    bus.call(job, "Job", "Dismiss")
    for _ in range(60):
        if bus.daemon_pid() is None:
            break
        time.sleep(0.1)
    assert bus.daemon_pid() is None


def test_snapshot_modes(bus):
    create(bus, "base.qcow2", 4 << 20)
    chain = data(bus.call(M, "Manager", "GetChain", "s", "base.qcow2"))[0]
    p = bus.gdbus("--object-path", chain, "--method", "org.diskchain.DiskChain1.Chain.Snapshot", "snap1.qcow2", "{}")
    assert "/org/diskchain/DiskChain1/image/" in p.stdout
    new_chain = data(bus.call(M, "Manager", "GetChain", "s", "snap1.qcow2"))[0]
    assert len(prop(bus, new_chain, "Chain", "Layers")) == 2
    p = bus.call(M, "Manager", "GetChain", "s", "base.qcow2", check=False)
    assert "not the active layer" in p.stderr
    # mode=existing: an overlay made beforehand gets the active layer as backing
    create(bus, "pre.qcow2", 4 << 20)
    bus.call(new_chain, "Chain", "Snapshot", "sa{sv}", "pre.qcow2", "1", "mode", "s", "existing")
    assert shape(bus, "pre.qcow2") == ["pre.qcow2", "snap1.qcow2", "base.qcow2"]
    p = bus.call(data(bus.call(M, "Manager", "GetChain", "s", "pre.qcow2"))[0], "Chain", "Snapshot", "sa{sv}",
                 "snap1.qcow2", "0", check=False)
    assert "already exists" in p.stderr
    for n in ("base", "snap1", "pre"):
        assert qemu_img("check", os.path.join(bus.root, f"{n}.qcow2"), check=False).returncode == 0


def test_diskchainctl_jobs_and_monitor(bus):
    import subprocess
    make_seed_chain(bus)
    from bustest import CTL
    mon = subprocess.Popen([CTL, "monitor"], env={**os.environ, **bus.env}, stdout=subprocess.PIPE, text=True)
    time.sleep(0.4)
    # stream waits by default and reports the outcome
    p = bus.ctl("stream", "D.qcow2", "--base", "B.qcow2", "--job-id", "ctl1")
    assert re.fullmatch(r"ctl1: completed, 8 MiB in [0-9.]+s \([0-9.]+ [KMG]iB/s\)\n", p.stdout), p.stdout
    assert shape(bus, "D.qcow2") == ["D.qcow2", "B.qcow2", "A.qcow2"]
    # --no-wait, then the job verbs
    p = bus.ctl("stream", "D.qcow2", "--job-id", "ctl2", "--speed", "64K", "--no-auto-dismiss", "--no-wait")
    assert p.stdout.strip().endswith("/job/ctl2")
    assert "ctl2" in bus.ctl("jobs").stdout
    bus.ctl("job", "pause", "ctl2")
    p = bus.ctl("job", "complete", "ctl2", check=False)
    assert p.returncode != 0 and "cannot accept command verb 'complete'" in p.stderr
    bus.ctl("job", "set-speed", "ctl2", "0")
    bus.ctl("job", "resume", "ctl2")
    j = json.loads(bus.ctl("--json", "job", "info", "ctl2").stdout)
    assert j["id"] == "ctl2" and j["type"] == "stream"
    p = bus.ctl("wait", "ctl2")
    assert "completed" in p.stdout
    bus.ctl("job", "dismiss", "ctl2")
    # a compressed full backup, waited for
    p = bus.ctl("backup", "D.qcow2", "bk.qcow2", "--compress", "--max-workers", "2", "--job-id", "ctl3")
    assert p.stdout.startswith("ctl3: completed, 8 MiB in "), p.stdout
    assert qemu_img("compare", os.path.join(bus.root, "bk.qcow2"), os.path.join(bus.root, "D.qcow2")).returncode == 0
    # a fleecing backup never ends by itself; cancelling it makes the client fail
    p = bus.ctl("backup", "D.qcow2", "fl.qcow2", "--sync", "none", "--job-id", "ctl4", "--no-wait")
    bus.ctl("job", "cancel", "ctl4")
    p = bus.ctl("wait", "ctl4", check=False)
    assert p.returncode != 0  # cancelled, or already gone: either way not a success
    wait_gone(bus, "/org/diskchain/DiskChain1/job/ctl4")
    bus.call(image(bus, "fl.qcow2"), "Image", "Delete", "a{sv}", "0")  # D is active again
    # refusals come back as the client's failure, with the daemon's message
    p = bus.ctl("commit", "D.qcow2", "--top", "D.qcow2", check=False)
    assert p.returncode != 0 and "cannot commit an image into itself" in p.stderr
    mon.terminate()
    events = [json.loads(l) for l in mon.communicate()[0].splitlines()]
    names = [e["event"] for e in events if e["data"].get("id", e["data"].get("device")) == "ctl1"]
    assert names == ["JOB_STATUS_CHANGE"] * 4 + ["BLOCK_JOB_COMPLETED"] + ["JOB_STATUS_CHANGE"] * 2, names
    done = [e for e in events if e["event"] == "BLOCK_JOB_COMPLETED"][0]
    assert done["data"]["type"] == "stream" and done["data"]["len"] == 8 << 20 and "seconds" in done["timestamp"]


VERBS = {  # verb -> (method, busctl args)
    "pause": ("Pause", []), "resume": ("Resume", []), "set-speed": ("SetSpeed", ["t", "1024"]),
    "complete": ("Complete", []), "finalize": ("Finalize", []), "dismiss": ("Dismiss", []),
    "cancel": ("Cancel", ["b", "true"]),
}
# QEMU's verb table, for the statuses a stream job can be held in
ALLOWED = {
    "running": {"pause", "resume", "set-speed", "cancel"},
    "paused": {"pause", "resume", "set-speed", "cancel"},
    "pending": {"finalize", "cancel"},
    "concluded": {"dismiss"},
}


def wait_status(bus, job, status, timeout=30):
    for _ in range(timeout * 10):
        if prop(bus, job, "Job", "Status") == status:
            return
        time.sleep(0.1)
    raise AssertionError(f"{job} never reached {status}: it is {prop(bus, job, 'Job', 'Status')}, "
                         f"error {prop(bus, job, 'Job', 'Error')!r}")


def test_verb_table(bus):
    """Each verb in each reachable status: accepted, or InvalidJobState with QMP's message."""
    chain = make_seed_chain(bus)
    for status in ("running", "paused", "pending", "concluded"):
        jid = f"vt-{status}"
        opts = ["job-id", "s", jid, "auto-finalize", "b", "true" if status == "concluded" else "false",
                "auto-dismiss", "b", "false"]
        if status in ("running", "paused"):
            opts += ["speed", "t", "1024"]
        job = data(bus.call(chain, "Chain", "Stream", "a{sv}", str(len(opts) // 3), *opts))[0]
        wait_status(bus, job, "running" if status == "paused" else status)
        if status == "paused":
            bus.call(job, "Job", "Pause")
            wait_status(bus, job, "paused")
        for verb, (method, args) in VERBS.items():
            if verb in ("cancel", "finalize", "dismiss", "resume", "pause"):
                continue  # these change the status; tried below, one at a time
            p = bus.call(job, "Job", method, *args, check=False)
            if verb in ALLOWED[status]:
                assert p.returncode == 0, (status, verb, p.stderr)
            else:
                assert f"Job '{jid}' in state '{status}' cannot accept command verb '{verb}'" in p.stderr, \
                    (status, verb, p.stderr)
        for verb in ("pause", "resume", "finalize", "dismiss"):
            if verb not in ALLOWED[status]:
                p = bus.call(job, "Job", VERBS[verb][0], check=False)
                assert f"cannot accept command verb '{verb}'" in p.stderr, (status, verb, p.stderr)
        # end it the way its status allows
        if status == "concluded":
            bus.call(job, "Job", "Dismiss")
        else:
            bus.call(job, "Job", "Cancel", "b", "true")
            wait_status(bus, job, "concluded")
            p = bus.call(job, "Job", "Cancel", "b", "true", check=False)
            assert "in state 'concluded' cannot accept command verb 'cancel'" in p.stderr
            bus.call(job, "Job", "Dismiss")
        wait_gone(bus, job)
    assert_chain_intact(bus, ["D.qcow2"])  # the 'concluded' round finished its stream


def test_bus_answers_while_four_jobs_run(bus):
    for i in range(4):
        create(bus, f"b{i}.qcow2", 32 << 20)
        qemu_io(os.path.join(bus.root, f"b{i}.qcow2"), "write -P 1 0 32M")
        create(bus, f"t{i}.qcow2", 0, "backing", "s", f"b{i}.qcow2")
    time.sleep(0.4)
    jobs = []
    for i in range(4):
        chain = data(bus.call(M, "Manager", "GetChain", "s", f"t{i}.qcow2"))[0]
        jobs.append(data(bus.call(chain, "Chain", "Stream", "a{sv}", "1", "speed", "t", str(16 << 20)))[0])
    assert len(data(bus.call(M, "Manager", "ListJobs"))[0]) == 4
    worst = 0
    for _ in range(10):
        t0 = time.monotonic()
        bus.call(M, "Manager", "QueryBlockJobs")
        worst = max(worst, time.monotonic() - t0)
        time.sleep(0.1)
    assert worst < 1.0, f"a call took {worst:.2f}s while four jobs ran"
    for j in jobs:
        wait_gone(bus, j)
    for i in range(4):
        assert qemu_img("check", os.path.join(bus.root, f"t{i}.qcow2"), check=False).returncode == 0


@pytest.mark.parametrize("sync", ["full", "top"])
def test_backup(bus, sync):
    chain = make_seed_chain(bus)
    mon = Monitor(bus)
    opts = ["sync", "s", sync, "compress", "b", "true" if sync == "full" else "false"]
    job = data(bus.call(chain, "Chain", "Backup", "sa{sv}", f"bk-{sync}.qcow2", str(len(opts) // 3), *opts))[0]
    wait_gone(bus, job)
    assert mon.stop() == QMP_SUCCESS
    tgt = os.path.join(bus.root, f"bk-{sync}.qcow2")
    p = qemu_img("check", "--output=json", tgt, check=False)
    assert p.returncode == 0
    if sync == "full":
        assert json.loads(p.stdout).get("compressed-clusters", 0) > 0
        assert shape(bus, f"bk-{sync}.qcow2") == ["bk-full.qcow2"]
    else:
        assert shape(bus, f"bk-{sync}.qcow2") == ["bk-top.qcow2", "C.qcow2", "B.qcow2", "A.qcow2"]
    p = qemu_img("compare", "-F", "raw", tgt, os.path.join(bus.dir, "D.ref"), check=False)
    assert p.returncode == 0, p.stdout
    # the source chain is untouched
    assert_chain_intact(bus, ["D.qcow2", "C.qcow2", "B.qcow2", "A.qcow2"])


def test_backup_sync_none_runs_until_cancelled(bus):
    chain = make_seed_chain(bus)
    mon = Monitor(bus)
    job = data(bus.call(chain, "Chain", "Backup", "sa{sv}", "fleece.qcow2", "1", "sync", "s", "none"))[0]
    time.sleep(1.0)
    assert prop(bus, job, "Job", "Status") == "running"
    bus.call(job, "Job", "Cancel", "b", "false")  # every backup cancel is hard
    wait_gone(bus, job)
    assert mon.stop() == ["JobStatusChange(created)", "JobStatusChange(running)", "JobStatusChange(aborting)",
                          "BlockJobCancelled", "JobStatusChange(concluded)", "JobStatusChange(null)"]
    assert shape(bus, "fleece.qcow2") == ["fleece.qcow2", "D.qcow2", "C.qcow2", "B.qcow2", "A.qcow2"]


def open_files(pid):
    """{path: [O_DIRECT?, ...]} of the files a process has open."""
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            path = os.readlink(f"/proc/{pid}/fd/{fd}")
            flags = int(open(f"/proc/{pid}/fdinfo/{fd}").read().split("flags:")[1].split()[0], 8)
        except (FileNotFoundError, IndexError):
            continue
        out.setdefault(path, []).append(bool(flags & os.O_DIRECT))
    return out


def cached_bytes(path):
    """How much of PATH the page cache holds (util-linux fincore)."""
    out = sh("fincore", "--bytes", "--noheadings", "--output", "RES", path).stdout
    return int(out.split()[0])


@pytest.mark.parametrize("cache", [None, "writeback", "none"])
def test_job_cache_modes(bus, cache):
    """A job writes its data through the page cache by default (cache
    writeback): no O_DIRECT descriptor, writeback started as data piles up,
    and what it wrote is not left in the cache when it ends.  With cache
    none the target's data goes around the cache (O_DIRECT, this file system
    has direct I/O) beside the cached descriptor for metadata.  The source is
    read through the cache either way; both end with the same bytes."""
    size = 160 << 20
    create(bus, "src.qcow2", size)
    qemu_io(os.path.join(bus.root, "src.qcow2"), f"write -P 7 0 {size}")
    time.sleep(0.4)
    chain = data(bus.call(M, "Manager", "GetChain", "s", "src.qcow2"))[0]
    opts = ["speed", "t", str(32 << 20)] + (["cache", "s", cache] if cache else [])
    job = data(bus.call(chain, "Chain", "Backup", "sa{sv}", "bk.qcow2", str(len(opts) // 3), *opts))[0]
    tgt, src = os.path.join(bus.root, "bk.qcow2"), os.path.join(bus.root, "src.qcow2")
    want = [False, True] if cache == "none" else [False]
    seen = {}
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and sorted(seen.get(tgt, [])) != want:
        seen = open_files(bus.daemon_pid())
        time.sleep(0.05)
    time.sleep(0.3)
    seen = open_files(bus.daemon_pid())
    assert sorted(seen.get(tgt, [])) == want, seen
    assert seen.get(src) == [False], seen
    bus.call(job, "Job", "SetSpeed", "t", "0")
    wait_gone(bus, job)
    # the job's descriptors are closed; the rescan its end triggers opens the
    # target for a moment to read its header, so give that a little time
    deadline = time.monotonic() + 3
    while tgt in open_files(bus.daemon_pid()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert tgt not in open_files(bus.daemon_pid())
    if cache != "none":
        # without the drops, all 160 MiB would stay cached
        assert cached_bytes(tgt) < size // 10, cached_bytes(tgt)
    assert qemu_img("compare", src, tgt, check=False).returncode == 0
    assert qemu_img("check", tgt, check=False).returncode == 0


def test_job_cache_option_is_checked(bus):
    create(bus, "src.qcow2", 1 << 20)
    chain = data(bus.call(M, "Manager", "GetChain", "s", "src.qcow2"))[0]
    p = bus.call(chain, "Chain", "Backup", "sa{sv}", "bk.qcow2", "1", "cache", "s", "unsafe", check=False)
    assert p.returncode != 0 and "option 'cache': 'unsafe' is not one of 'writeback', 'none'" in p.stderr, p.stderr
    p = bus.call(chain, "Chain", "Stream", "a{sv}", "1", "cache", "b", "true", check=False)
    assert p.returncode != 0 and "option 'cache'" in p.stderr, p.stderr


def test_backup_refusals(bus):
    chain = make_seed_chain(bus)
    create(bus, "small.qcow2", 1 << 20)
    for target, opts, want in (
            ("small.qcow2", ["mode", "s", "existing"], "Source and target image have different sizes"),
            ("A.qcow2", [], "already exists"),
            ("D.qcow2", [], "Source and target cannot be the same"),
            ("x.raw", ["format", "s", "raw", "compress", "b", "true"], "Compression is not supported"),
            ("x.qcow2", ["sync", "s", "incremental"], "must provide a valid bitmap name for 'incremental' sync mode"),
            ("x.qcow2", ["bitmap", "s", "b0"], "Bitmap sync mode must be given when providing a bitmap"),
            ("x.qcow2", ["max-workers", "u", "0"], "max-workers must be 1..16"),
            ("x.qcow2", ["max-workers", "u", "17"], "max-workers must be 1..16"),
            ("../x.qcow2", [], "outside the storage roots")):
        p = bus.call(chain, "Chain", "Backup", "sa{sv}", target, str(len(opts) // 3), *opts, check=False)
        assert p.returncode != 0 and want in p.stderr, (target, opts, p.stderr)
    assert not os.path.exists(os.path.join(bus.root, "x.qcow2"))
    # copy is its own polkit action
    p = bus.call(chain, "Chain", "Backup", "sa{sv}", "u.qcow2", "0", user="dctest", check=False)
    assert p.returncode != 0 and "org.diskchain.copy" in p.stderr or "Access denied" in p.stderr, p.stderr
