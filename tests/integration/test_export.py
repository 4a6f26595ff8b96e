# SPDX-License-Identifier: LGPL-2.1-or-later
"""NBD exports over the bus: Chain.Export, Chain.OpenNBD and the Export
objects, with real clients (qemu-img, qemu-io, nbdinfo, libnbd) as the
judges, and every job run under a client's writes.

The writer keeps a shadow copy of the disk: it starts from what it reads
through the export and applies each write once the server acknowledged it,
so at the end the disk must read exactly as the shadow, whatever the jobs
did meanwhile (pivots, copy-before-write, streams)."""
import json
import os
import random
import re
import socket
import stat
import struct
import subprocess
import sys
import threading
import time

import nbd
import pytest

# the library tests' helpers (also when this module is imported by a child process, without the conftest)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))

from bustest import TEST_USER, Bus, finish, kill_daemon, qemu_img, qemu_io, set_group_member, sh
from nbdservers import flood_reads, free_port, servers, start, wait_port  # noqa: F401 (servers: the autouse fixture)
from test_bus import M, create, data, image, make_seed_chain, prop, wait_gone, wait_status
from tlsfiles import credentials, needs_tools as needs_tls_tools

SIZE = 8 << 20  # the seed chain's size


def export(bus, chain, *opts, user=None, check=True):
    """Chain.Export with OPTS as (key, type, value) triples."""
    flat = [str(len(opts))] + [str(x) for o in opts for x in o]
    p = bus.call(chain, "Chain", "Export", "a{sv}", *flat, user=user, check=check)
    return data(p)[0] if p.returncode == 0 else p


def uri_of(bus, exp):
    return prop(bus, exp, "Export", "Uri")


def exports(bus):
    return data(bus.call(M, "Manager", "ListExports"))[0]


def wait_for(cond, what, timeout=10):
    for _ in range(int(timeout * 20)):
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what}: not so after {timeout} s")


def read_all(uri):
    h = nbd.NBD()
    h.connect_uri(uri)
    size = h.get_size()
    out = bytearray()
    for off in range(0, size, 1 << 20):
        out += h.pread(min(1 << 20, size - off), off)
    h.shutdown()
    return out


def file_content(path, fmt="qcow2"):
    """What qemu-img reads of PATH (its whole chain), as bytes."""
    raw = path + ".read"
    qemu_img("convert", "-U", "-f", fmt, "-O", "raw", path, raw)
    with open(raw, "rb") as f:
        b = f.read()
    os.unlink(raw)
    return b


class Writer(threading.Thread):
    """One NBD connection writing random data at random offsets until stopped,
    with a shadow of what the disk must read afterwards."""

    def __init__(self, uri, seed=1, max_len=96 << 10, pause=0.0):
        super().__init__(daemon=True)
        self.h = nbd.NBD()
        self.h.connect_uri(uri)
        self.size = self.h.get_size()
        self.shadow = bytearray()
        for off in range(0, self.size, 1 << 20):
            self.shadow += self.h.pread(min(1 << 20, self.size - off), off)
        self.rng = random.Random(seed)
        self.max_len = max_len
        self.pause = pause
        self.stop_ev = threading.Event()
        self.writes = 0
        self.error = None
        self.flushed = None  # the shadow at the last acknowledged flush
        self.since_flush = []  # (offset, length) of the writes sent after it

    def run(self):
        try:
            while not self.stop_ev.is_set():
                ln = self.rng.randrange(1, self.max_len // 512 + 1) * 512
                off = self.rng.randrange(0, (self.size - ln) // 512 + 1) * 512
                self.since_flush.append((off, ln))
                if self.rng.random() < 0.1:
                    self.h.zero(ln, off)
                    buf = bytes(ln)
                else:
                    buf = self.rng.randbytes(ln)
                    self.h.pwrite(buf, off)
                self.shadow[off:off + ln] = buf
                self.writes += 1
                if self.writes % 50 == 0:
                    pending = len(self.since_flush)
                    self.h.flush()
                    self.flushed = bytes(self.shadow)
                    del self.since_flush[:pending]
                if self.pause:
                    time.sleep(self.pause)
        except Exception as e:  # the test asserts on it
            self.error = e

    def finish(self):
        self.stop_ev.set()
        self.join(30)
        assert not self.is_alive(), "the writer is stuck"
        assert self.error is None, f"a write failed: {self.error!r}"
        assert self.writes > 0
        self.h.flush()
        self.h.shutdown()
        return bytes(self.shadow)


def first_diff(a, b):
    for i in range(0, min(len(a), len(b)), 4096):
        if a[i:i + 4096] != b[i:i + 4096]:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def check_clean(bus, leaks_ok=False):
    """qemu-img check of every image: clean (after a crash: leaked clusters allowed, exit 3)."""
    for f in os.listdir(bus.root):
        if f.endswith(".qcow2"):
            p = qemu_img("check", "-U", os.path.join(bus.root, f), check=False)
            assert p.returncode == 0 or (leaks_ok and p.returncode == 3), (f, p.stdout, p.stderr)


# --- exports on the bus ----------------------------------------------------------

def test_export_read_only(bus):
    chain = make_seed_chain(bus)
    exp = export(bus, chain, ("name", "s", "seed"))
    assert exp == M + "/export/seed"
    uri = uri_of(bus, exp)
    sock = os.path.join(bus.dir, "run", "nbd", "seed")
    assert uri == f"nbd+unix:///seed?socket={sock}"
    assert prop(bus, exp, "Export", "Name") == "seed"
    assert prop(bus, exp, "Export", "Writable") is False
    assert prop(bus, exp, "Export", "Chain") == chain
    assert prop(bus, chain, "Chain", "Exports") == [exp]
    assert exports(bus) == [exp]
    for n in "ABCD":
        assert prop(bus, image(bus, f"{n}.qcow2"), "Image", "InUse") == "export:seed"
    # the socket is root's alone, mode 0600
    st = os.lstat(sock)
    assert stat.S_ISSOCK(st.st_mode) and st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o600
    # qemu-img reads the chain through it, and nbdinfo sees what we advertise
    p = qemu_img("compare", "-f", "raw", "-F", "raw", uri, os.path.join(bus.dir, "D.ref"), check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    info = sh("nbdinfo", "--json", uri).stdout
    assert '"is_read_only": true' in info and f'"export-size": {SIZE}' in info, info
    # writes are refused, and nothing changed
    p = sh("qemu-io", "-f", "raw", "-c", "write -P 0x55 0 64k", uri, check=False)
    assert p.returncode != 0 or "failed" in p.stdout + p.stderr, p.stdout + p.stderr
    assert qemu_img("compare", "-U", "-F", "raw", os.path.join(bus.root, "D.qcow2"),
                    os.path.join(bus.dir, "D.ref"), check=False).returncode == 0
    # Stop: the object, the socket and the claims go
    bus.call(exp, "Export", "Stop")
    assert exports(bus) == []
    assert not os.path.exists(sock)
    assert prop(bus, image(bus, "D.qcow2"), "Image", "InUse") == ""
    assert prop(bus, chain, "Chain", "Exports") == []
    check_clean(bus)


def test_export_writable_counts_and_flushes(bus):
    chain = make_seed_chain(bus)
    exp = export(bus, chain, ("writable", "b", "true"))
    assert exp == M + "/export/D"  # named after the active layer by default
    uri = uri_of(bus, exp)
    assert prop(bus, exp, "Export", "Writable") is True
    h = nbd.NBD()
    h.connect_uri(uri)
    wait_for(lambda: prop(bus, exp, "Export", "Clients") == 1, "one client")
    h.pwrite(b"\x5a" * 65536, 1 << 20)
    h.pwrite(b"\xa5" * 4096, 7 << 20, nbd.CMD_FLAG_FUA)
    h.flush()
    assert h.pread(65536, 1 << 20) == b"\x5a" * 65536
    wait_for(lambda: prop(bus, exp, "Export", "BytesWritten") == 65536 + 4096, "BytesWritten counted")
    wait_for(lambda: prop(bus, exp, "Export", "BytesRead") >= 65536, "BytesRead counted")
    h.shutdown()
    wait_for(lambda: prop(bus, exp, "Export", "Clients") == 0, "no client")
    bus.call(exp, "Export", "Stop")
    # the writes went to the active layer, as a guest's do
    top = os.path.join(bus.root, "D.qcow2")
    assert qemu_img("check", top, check=False).returncode == 0
    out = qemu_io(top, "read -P 0x5a 1M 64k", "read -P 0xa5 7M 4k", "read -P 0xd 3M 1M").stdout
    assert "Pattern verification failed" not in out, out
    for n in "ABC":
        assert qemu_img("compare", "-F", "raw", os.path.join(bus.root, f"{n}.qcow2"),
                        os.path.join(bus.dir, f"{n}.ref"), check=False).returncode == 0


def test_export_refusals(bus):
    chain = make_seed_chain(bus)
    p = export(bus, chain, ("name", "s", "../x"), check=False)
    assert p.returncode != 0 and "name '../x'" in p.stderr, p.stderr
    p = export(bus, chain, ("socket", "s", "relative"), check=False)
    assert p.returncode != 0 and "absolute path" in p.stderr, p.stderr
    # a directory others may write is no place for a socket root makes
    os.makedirs(os.path.join(bus.dir, "open"), mode=0o777)
    os.chmod(os.path.join(bus.dir, "open"), 0o777)
    p = export(bus, chain, ("socket", "s", os.path.join(bus.dir, "open", "s")), check=False)
    assert p.returncode != 0 and "writable by nobody else" in p.stderr, p.stderr
    p = export(bus, chain, ("tcp", "s", "0.0.0.0:10809"), check=False)
    assert p.returncode != 0 and "exports over TCP are off" in p.stderr and "TCPListen=" in p.stderr, p.stderr
    p = export(bus, chain, ("max-connections", "u", "0"), check=False)
    assert p.returncode != 0 and "max-connections" in p.stderr, p.stderr
    p = export(bus, chain, ("bogus", "b", "true"), check=False)
    assert p.returncode != 0
    assert exports(bus) == []
    exp = export(bus, chain, ("name", "s", "vm"))
    # one name, one export; one chain, one export
    p = export(bus, chain, ("name", "s", "vm"), check=False)
    assert p.returncode != 0 and "an export named 'vm' exists already" in p.stderr, p.stderr
    p = export(bus, chain, ("name", "s", "vm2"), check=False)
    assert p.returncode != 0 and "exported over NBD as 'vm'" in p.stderr, p.stderr
    # its images are nobody's target, and not deleted, resized or classified under it
    p = bus.call(chain, "Chain", "Backup", "sa{sv}", "A.qcow2", "1", "mode", "s", "existing", check=False)
    assert p.returncode != 0
    p = bus.call(image(bus, "D.qcow2"), "Image", "Delete", "a{sv}", "0", check=False)
    assert p.returncode != 0 and "exported over NBD as 'vm'" in p.stderr, p.stderr
    p = bus.call(image(bus, "D.qcow2"), "Image", "Resize", "ta{sv}", str(16 << 20), "0", check=False)
    assert p.returncode != 0 and "exported over NBD" in p.stderr, p.stderr
    p = bus.call(M, "Manager", "ClassifyImage", "ssa{sv}", "B.qcow2", "qcow2", "0", check=False)
    assert p.returncode != 0 and "exported over NBD" in p.stderr, p.stderr
    bus.call(exp, "Export", "Stop")
    # a chain a job holds cannot be exported
    job = data(bus.call(chain, "Chain", "Mirror", "sa{sv}", "E.qcow2", "1", "job-id", "s", "m"))[0]
    wait_status(bus, job, "ready")
    p = export(bus, chain, check=False)
    assert p.returncode != 0 and "in use by job 'm'" in p.stderr, p.stderr
    bus.call(job, "Job", "Cancel", "b", "true")
    wait_gone(bus, job)


def test_export_is_the_callers_alone(bus):
    chain = make_seed_chain(bus)
    # without a rule, an unprivileged user may not export (auth_admin)
    p = export(bus, chain, user=TEST_USER, check=False)
    assert p.returncode != 0 and "Access denied" in p.stderr, p.stderr
    exp = export(bus, chain, ("name", "s", "roots"))
    uri = uri_of(bus, exp)
    # root's socket: the test user cannot connect, not even to read
    p = sh("nbdinfo", uri, user=TEST_USER, check=False)
    assert p.returncode != 0, p.stdout
    assert prop(bus, exp, "Export", "Clients") == 0
    bus.call(exp, "Export", "Stop", check=True)
    # with the group rule, the test user exports; the socket is theirs, and root may use it too
    set_group_member(True)
    try:
        exp = export(bus, chain, ("name", "s", "mine"), ("writable", "b", "true"), user=TEST_USER)
        uri = uri_of(bus, exp)
        sock = uri.split("socket=")[1]
        st = os.lstat(sock)
        uid = int(sh("id", "-u", TEST_USER).stdout)
        assert st.st_uid == uid and stat.S_IMODE(st.st_mode) == 0o600
        assert "export-size" in sh("nbdinfo", uri, user=TEST_USER).stdout
        assert "export-size" in sh("nbdinfo", uri).stdout
        bus.call(exp, "Export", "Stop", user=TEST_USER)
        # a socket of theirs goes only where they could put a file themselves
        p = export(bus, chain, ("socket", "s", os.path.join(bus.dir, "s")), user=TEST_USER, check=False)
        assert p.returncode != 0 and "must belong to the caller" in p.stderr, p.stderr
        assert not os.path.exists(os.path.join(bus.dir, "s"))
        own = os.path.join(bus.dir, "own")
        os.mkdir(own, 0o700)
        os.chown(own, uid, -1)
        exp = export(bus, chain, ("socket", "s", os.path.join(own, "vm")), user=TEST_USER)
        assert uri_of(bus, exp).endswith(f"socket={own}/vm")
        assert "export-size" in sh("nbdinfo", uri_of(bus, exp), user=TEST_USER).stdout
        bus.call(exp, "Export", "Stop", user=TEST_USER)
        assert not os.path.exists(os.path.join(own, "vm"))
    finally:
        set_group_member(False)


def test_peer_credentials_checked_again(bus):
    """Even if the socket's mode were opened up, the server lets in only root and the creator."""
    chain = make_seed_chain(bus)
    exp = export(bus, chain, ("name", "s", "cred"))
    sock = uri_of(bus, exp).split("socket=")[1]
    os.chmod(sock, 0o666)
    p = sh("nbdinfo", uri_of(bus, exp), user=TEST_USER, check=False)
    assert p.returncode != 0, p.stdout
    assert "export-size" in sh("nbdinfo", uri_of(bus, exp)).stdout
    bus.call(exp, "Export", "Stop")


def open_nbd(bus, chain, writable=False):
    """Chain.OpenNBD through GDBus on the private bus: the descriptor it hands out."""
    from gi.repository import Gio, GLib
    conn = Gio.DBusConnection.new_for_address_sync(
        bus.address, Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION,
        None, None)
    opts = {"writable": GLib.Variant("b", writable)}
    reply, fds = conn.call_with_unix_fd_list_sync(
        "org.diskchain.DiskChain1", chain, "org.diskchain.DiskChain1.Chain", "OpenNBD",
        GLib.Variant("(a{sv})", (opts,)), GLib.VariantType("(h)"), Gio.DBusCallFlags.NONE, 60000, None, None)
    fd = fds.get(reply.unpack()[0])
    conn.close_sync(None)
    return fd


def test_open_nbd_without_a_socket(bus):
    chain = make_seed_chain(bus)
    fd = open_nbd(bus, chain, writable=True)
    # an export made for this connection, listed like any other, without a socket
    [exp] = exports(bus)
    assert uri_of(bus, exp) == ""
    assert prop(bus, exp, "Export", "Writable") is True
    h = nbd.NBD()
    h.connect_socket(fd)
    assert h.get_size() == SIZE
    assert h.pread(4096, 3 << 20) == b"\x0d" * 4096
    h.pwrite(b"\x77" * 8192, 0)
    h.flush()
    h.shutdown()
    # gone with its connection
    wait_for(lambda: exports(bus) == [], "the OpenNBD export ended with its connection")
    out = qemu_io(os.path.join(bus.root, "D.qcow2"), "read -P 0x77 0 8k").stdout
    assert "Pattern verification failed" not in out
    # through an existing read-only export: reads yes, a writable connection no
    exp = export(bus, chain, ("name", "s", "ro"))
    fd = open_nbd(bus, chain)
    h = nbd.NBD()
    h.connect_socket(fd)
    assert h.is_read_only()
    assert h.pread(4096, 3 << 20) == b"\x0d" * 4096
    wait_for(lambda: prop(bus, exp, "Export", "Clients") == 1, "the OpenNBD client counted")
    h.shutdown()
    with pytest.raises(Exception, match="writable connection needs a writable export"):
        open_nbd(bus, chain, writable=True)
    bus.call(exp, "Export", "Stop")


def test_open_nbd_is_polkits_decision(bus):
    chain = make_seed_chain(bus)
    p = subprocess.run(["/usr/bin/python3", "-c", f"""
import sys
sys.path.insert(0, {os.path.dirname(__file__)!r})
import test_export
class B: address = {bus.address!r}
try:
    test_export.open_nbd(B, {chain!r})
except Exception as e:
    print(e)
    sys.exit(3)
"""], capture_output=True, text=True, preexec_fn=lambda: (os.setgid(int(sh("id", "-g", TEST_USER).stdout)),
                                                          os.setuid(int(sh("id", "-u", TEST_USER).stdout))))
    # denied: without an agent polkit cannot ask the user, so the daemon says authentication is needed
    assert p.returncode == 3 and ("AccessDenied" in p.stdout or "InteractiveAuthorizationRequired" in p.stdout), \
        (p.stdout, p.stderr)
    assert exports(bus) == []


def test_diskchainctl_export_exports_unexport(bus):
    make_seed_chain(bus)
    out = bus.ctl("export", "D.qcow2", "--name", "vm0", "--writable").stdout
    assert "vm0" in out and "rw" in out and "nbd+unix:///vm0?socket=" in out, out
    out = bus.ctl("exports").stdout
    assert "vm0" in out and "D.qcow2" in out, out
    out = bus.ctl("--json", "exports").stdout
    assert '"name": "vm0"' in out and '"writable": true' in out and '"cache": "writeback"' in out, out
    assert "stopped export vm0" in bus.ctl("unexport", "vm0").stdout
    p = bus.ctl("unexport", "vm0", check=False)
    assert p.returncode != 0 and "no export named 'vm0'" in p.stderr, p.stderr
    assert "vm0" not in bus.ctl("exports").stdout
    bus.ctl("export", "D.qcow2", "--name", "vm1", "--cache", "none")
    assert '"cache": "none"' in bus.ctl("--json", "exports").stdout
    p = bus.ctl("export", "D.qcow2", "--name", "vm2", "--cache", "direct", check=False)
    assert p.returncode != 0 and "cache" in p.stderr, p.stderr
    bus.ctl("unexport", "vm1")


def test_export_keeps_the_daemon_up(bus_idle):
    bus = bus_idle
    create(bus, "i.qcow2", 1 << 20)
    chain = data(bus.call(M, "Manager", "GetChain", "s", "i.qcow2"))[0]
    exp = export(bus, chain)
    pid = bus.daemon_pid()
    time.sleep(4)  # twice the idle timeout
    assert bus.daemon_pid() == pid
    bus.call(exp, "Export", "Stop")
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"), "the daemon exits when idle again")


def test_persistent_export_comes_back(bus):
    chain = make_seed_chain(bus)
    exp = export(bus, chain, ("name", "s", "keep"), ("persistent", "b", "true"), ("writable", "b", "true"),
                 ("cache", "s", "none"))
    uri = uri_of(bus, exp)
    pid = bus.daemon_pid()
    os.kill(pid, 15)
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"), "the daemon stopped")
    # any call starts it again, and the export with it
    bus.call(M, "Manager", "ListImages")
    wait_for(lambda: exports(bus) == [exp], "the export is back")
    assert prop(bus, exp, "Export", "Writable") is True
    assert prop(bus, exp, "Export", "Cache") == "none"
    assert "export-size" in sh("nbdinfo", uri).stdout
    bus.call(exp, "Export", "Stop")
    pid = bus.daemon_pid()
    os.kill(pid, 15)
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"), "the daemon stopped")
    bus.call(M, "Manager", "ListImages")
    time.sleep(0.5)
    assert exports(bus) == []


def test_qemu_locks(bus):
    chain = make_seed_chain(bus)
    exp = export(bus, chain, ("writable", "b", "true"))
    top = os.path.join(bus.root, "D.qcow2")
    # QEMU cannot open an exported image for writing
    p = sh("qemu-io", "-f", "qcow2", "-c", "write 0 4k", top, check=False)
    assert p.returncode != 0 and "lock" in (p.stdout + p.stderr).lower(), p.stdout + p.stderr
    bus.call(exp, "Export", "Stop")
    # and an image QEMU holds cannot be exported writable
    holder = subprocess.Popen(["qemu-io", "-f", "qcow2", top], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        p = export(bus, chain, ("writable", "b", "true"), check=False)
        assert p.returncode != 0 and "lock" in p.stderr.lower(), p.stderr
        assert exports(bus) == []
    finally:
        holder.communicate(b"quit\n", timeout=10)


# --- jobs under a client's writes ---------------------------------------------------

def writable_export(bus, chain, name="w"):
    exp = export(bus, chain, ("name", "s", name), ("writable", "b", "true"))
    return exp, uri_of(bus, exp)


@pytest.mark.parametrize("kind,new_top", [("mirror", "E.qcow2"), ("commit", "A.qcow2")])
def test_complete_moves_the_writers(bus, kind, new_top):
    """Complete() of a mirror, or of an active commit, under a client's writes: the same connection goes on
    writing, into the new active layer, and nothing acknowledged is lost."""
    chain = make_seed_chain(bus)
    exp, uri = writable_export(bus, chain)
    w = Writer(uri, seed=2 if kind == "mirror" else 6)
    w.start()
    if kind == "mirror":
        job = data(bus.call(chain, "Chain", "Mirror", "sa{sv}", "E.qcow2", "1", "job-id", "s", "j"))[0]
    else:
        job = data(bus.call(chain, "Chain", "Commit", "a{sv}", "1", "job-id", "s", "j"))[0]
    wait_status(bus, job, "ready")
    time.sleep(0.3)
    bus.call(job, "Job", "Complete")
    wait_gone(bus, job)
    n = w.writes
    wait_for(lambda: w.writes > n + 20, "writes after the pivot")
    expect = w.finish()
    new_chain = data(bus.call(M, "Manager", "GetChain", "s", new_top))[0]
    wait_for(lambda: prop(bus, exp, "Export", "Chain") == new_chain, "the export follows the pivot")
    assert prop(bus, image(bus, new_top), "Image", "InUse") == "export:w"
    assert read_all(uri) == expect
    bus.call(exp, "Export", "Stop")
    got = file_content(os.path.join(bus.root, new_top))
    assert got == expect, f"first difference at {first_diff(got, expect)}"
    check_clean(bus)


@pytest.mark.parametrize("copy_mode", ["background", "write-blocking"])
def test_mirror_soft_cancel_under_writes(bus, copy_mode):
    chain = make_seed_chain(bus)
    exp, uri = writable_export(bus, chain)
    w = Writer(uri, seed=3)
    w.start()
    job = data(bus.call(chain, "Chain", "Mirror", "sa{sv}", "E.qcow2", "2", "job-id", "s", "m", "copy-mode", "s",
                        copy_mode))[0]
    wait_status(bus, job, "ready")
    time.sleep(0.3)
    # the writer pauses: the copy a soft cancel leaves is the disk as it is now
    expect = w.finish()
    bus.call(job, "Job", "Cancel", "b", "false")
    wait_gone(bus, job)
    # the writers stay on the original chain
    assert prop(bus, exp, "Export", "Chain") == chain
    assert read_all(uri) == expect
    bus.call(exp, "Export", "Stop")
    assert file_content(os.path.join(bus.root, "E.qcow2")) == expect
    assert file_content(os.path.join(bus.root, "D.qcow2")) == expect
    check_clean(bus)


def test_backup_is_the_disk_at_its_start(bus):
    chain = make_seed_chain(bus)
    exp, uri = writable_export(bus, chain)
    w = Writer(uri, seed=4)
    at_start = bytes(w.shadow)
    # a speed limit keeps the backup running while the writer overwrites what it has not copied yet
    job = data(bus.call(chain, "Chain", "Backup", "sa{sv}", "T.qcow2", "2", "job-id", "s", "b", "speed", "t",
                        str(4 << 20)))[0]
    w.start()
    wait_gone(bus, job, timeout=60)
    expect = w.finish()
    assert w.writes > 20
    assert file_content(os.path.join(bus.root, "T.qcow2")) == at_start
    bus.call(exp, "Export", "Stop")
    assert file_content(os.path.join(bus.root, "D.qcow2")) == expect
    check_clean(bus)


def test_stream_never_overwrites_newer_data(bus):
    chain = make_seed_chain(bus)
    exp, uri = writable_export(bus, chain)
    w = Writer(uri, seed=5)
    w.start()
    job = data(bus.call(chain, "Chain", "Stream", "a{sv}", "2", "job-id", "s", "s", "speed", "t", str(8 << 20)))[0]
    wait_gone(bus, job, timeout=60)
    expect = w.finish()
    assert read_all(uri) == expect
    bus.call(exp, "Export", "Stop")
    top = os.path.join(bus.root, "D.qcow2")
    assert file_content(top) == expect
    info = qemu_img("info", "-U", "--output=json", top).stdout
    assert "backing-filename" not in info  # flattened
    check_clean(bus)


def test_snapshot_moves_the_export(bus):
    chain = make_seed_chain(bus)
    exp, uri = writable_export(bus, chain)
    w = Writer(uri, seed=7, pause=0.002)
    w.start()
    time.sleep(0.3)
    new = data(bus.call(chain, "Chain", "Snapshot", "sa{sv}", "E.qcow2", "0"))[0]
    assert new == image(bus, "E.qcow2")
    n = w.writes
    wait_for(lambda: w.writes > n + 20, "writes after the snapshot")
    expect = w.finish()
    new_chain = data(bus.call(M, "Manager", "GetChain", "s", "E.qcow2"))[0]
    wait_for(lambda: prop(bus, exp, "Export", "Chain") == new_chain, "the export moved to the overlay")
    assert prop(bus, image(bus, "E.qcow2"), "Image", "InUse") == "export:w"
    bus.call(exp, "Export", "Stop")
    assert file_content(os.path.join(bus.root, "E.qcow2")) == expect
    # what was written before the snapshot stayed in D
    assert qemu_img("info", "-U", "--output=json", os.path.join(bus.root, "E.qcow2")).stdout.count("D.qcow2")
    check_clean(bus)


def direct_files(pid):
    """The files process PID holds open with O_DIRECT, by name."""
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                flags = int(re.search(r"^flags:\s+([0-7]+)", f.read(), re.M).group(1), 8)
        except (FileNotFoundError, AttributeError):
            continue
        if flags & os.O_DIRECT:
            out.add(os.path.basename(target))
    return out


def test_export_cache_none(bus):
    """cache=none: the clients' data goes around the page cache on every layer,
    also the layers a snapshot gives the export later; nothing else changes."""
    chain = make_seed_chain(bus)
    probe = os.path.join(bus.root, "A.qcow2")
    try:
        os.close(os.open(probe, os.O_RDONLY | os.O_DIRECT))
    except OSError:
        pytest.skip("the test directory's file system has no direct I/O")
    p = export(bus, chain, ("cache", "s", "unsafe"), check=False)
    assert p.returncode != 0 and "option 'cache': 'unsafe' is not one of" in p.stderr, p.stderr
    # the default goes through the cache
    exp = export(bus, chain, ("name", "s", "cached"))
    assert prop(bus, exp, "Export", "Cache") == "writeback"
    assert read_all(uri_of(bus, exp))[:4096] == open(os.path.join(bus.dir, "D.ref"), "rb").read(4096)
    assert not direct_files(bus.daemon_pid()) & {"A.qcow2", "B.qcow2", "C.qcow2", "D.qcow2"}
    bus.call(exp, "Export", "Stop")

    exp = export(bus, chain, ("name", "s", "direct"), ("writable", "b", "true"), ("cache", "s", "none"))
    uri = uri_of(bus, exp)
    assert prop(bus, exp, "Export", "Cache") == "none"
    assert direct_files(bus.daemon_pid()) >= {"A.qcow2", "B.qcow2", "C.qcow2", "D.qcow2"}
    p = qemu_img("compare", "-f", "raw", "-F", "raw", uri, os.path.join(bus.dir, "D.ref"), check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    w = Writer(uri, seed=11, pause=0.001)
    w.start()
    time.sleep(0.3)
    bus.call(chain, "Chain", "Snapshot", "sa{sv}", "E.qcow2", "0")
    n = w.writes
    wait_for(lambda: w.writes > n + 20, "writes after the snapshot")
    assert "E.qcow2" in direct_files(bus.daemon_pid())
    expect = w.finish()
    assert read_all(uri) == expect
    bus.call(exp, "Export", "Stop")
    assert file_content(os.path.join(bus.root, "E.qcow2")) == expect
    check_clean(bus)


def test_qemu_io_writes_during_a_mirror(bus):
    """QEMU's own NBD client as the writer, through the export, while a mirror runs."""
    chain = make_seed_chain(bus)
    exp, uri = writable_export(bus, chain)
    job = data(bus.call(chain, "Chain", "Mirror", "sa{sv}", "E.qcow2", "2", "job-id", "s", "m", "speed", "t",
                        str(4 << 20)))[0]
    cmds = []
    for i in range(16):
        cmds += ["-c", f"aio_write -P 0x{0x30 + i:x} {i * 512}k 256k"]
    cmds += ["-c", "aio_flush"]
    sh("qemu-io", "-f", "raw", *cmds, uri)
    wait_status(bus, job, "ready", timeout=60)
    bus.call(job, "Job", "Complete")
    wait_gone(bus, job)
    bus.call(exp, "Export", "Stop")
    target = os.path.join(bus.root, "E.qcow2")
    reads = [f"read -P 0x{0x30 + i:x} {i * 512}k 256k" for i in range(16)]
    out = qemu_io(target, *reads).stdout
    assert "Pattern verification failed" not in out, out
    check_clean(bus)


@pytest.mark.parametrize("kind", ["mirror", "backup", "stream", "commit"])
def test_kill9_keeps_every_flushed_write(bus, kind):
    """kill -9 while a client writes and a job runs: every image passes qemu-img check (leaks allowed),
    and every write acknowledged before the last completed flush is in the chain."""
    chain = make_seed_chain(bus)
    exp, uri = writable_export(bus, chain)
    w = Writer(uri, seed=8)
    w.start()
    slow = ("speed", "t", str(2 << 20))
    if kind == "mirror":
        job = bus.call(chain, "Chain", "Mirror", "sa{sv}", "E.qcow2", "2", "job-id", "s", "j", *slow)
    elif kind == "backup":
        job = bus.call(chain, "Chain", "Backup", "sa{sv}", "T.qcow2", "2", "job-id", "s", "j", *slow)
    elif kind == "stream":
        job = bus.call(chain, "Chain", "Stream", "a{sv}", "2", "job-id", "s", "j", *slow)
    else:
        job = bus.call(chain, "Chain", "Commit", "a{sv}", "2", "job-id", "s", "j", *slow)
    assert data(job)
    wait_for(lambda: w.flushed is not None and w.writes > 300, "flushed writes", timeout=30)
    kill_daemon(bus)
    w.stop_ev.set()
    w.join(30)
    assert w.error is not None  # the connection went with the daemon
    flushed, later = w.flushed, list(w.since_flush)
    check_clean(bus, leaks_ok=True)
    got = file_content(os.path.join(bus.root, "D.qcow2"))
    assert len(got) == len(flushed)
    # sectors no write touched after the last completed flush must read as at that flush
    touched = bytearray(len(flushed) // 512)
    for off, ln in later:
        touched[off // 512:(off + ln) // 512] = b"\1" * (ln // 512)
    bad = [i for i in range(0, len(touched)) if not touched[i] and got[i * 512:(i + 1) * 512] !=
           flushed[i * 512:(i + 1) * 512]]
    assert not bad, f"{len(bad)} flushed sectors lost, the first at {bad[0] * 512}"


class Qemu:
    """QEMU itself (qemu-system-x86_64 -M none) with an NBD blockdev on the export, driven over QMP:
    its qemu-io monitor command writes through QEMU's own NBD client."""

    def __init__(self, bus, uri):
        import json
        self.json = json
        sock = uri.split("socket=")[1]
        name = uri.split("///")[1].split("?")[0]
        self.qmp = os.path.join(bus.dir, "qmp")
        self.p = subprocess.Popen(["qemu-system-x86_64", "-M", "none", "-nodefaults", "-display", "none",
                                   "-blockdev", f"driver=nbd,node-name=disk,server.type=unix,server.path={sock},"
                                   f"export={name}", "-qmp", f"unix:{self.qmp},server=on,wait=off"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(200):
            try:
                self.s = socket.socket(socket.AF_UNIX)
                self.s.connect(self.qmp)
                break
            except OSError:
                self.s.close()
                time.sleep(0.05)
        self.f = self.s.makefile("rw")
        self.f.readline()
        self.cmd("qmp_capabilities")

    def cmd(self, c, **args):
        self.f.write(self.json.dumps({"execute": c, "arguments": args}) + "\n")
        self.f.flush()
        while True:
            r = self.json.loads(self.f.readline())
            if "return" in r or "error" in r:
                assert "error" not in r, r
                return r["return"]

    def io(self, command):
        out = self.cmd("human-monitor-command", **{"command-line": f'qemu-io disk "{command}"'})
        assert "error" not in out.lower() and "failed" not in out.lower(), out
        return out

    def quit(self):
        self.cmd("quit")
        self.p.wait(30)
        self.s.close()


def test_qemu_writes_through_active_commit_and_pivot(bus):
    """A QEMU guest's disk on the export: its writes during an active commit, and after Complete() through
    the same NBD connection, all land in the base."""
    chain = make_seed_chain(bus)
    exp, uri = writable_export(bus, chain)
    q = Qemu(bus, uri)
    try:
        wait_for(lambda: prop(bus, exp, "Export", "Clients") == 1, "QEMU connected")
        job = data(bus.call(chain, "Chain", "Commit", "a{sv}", "2", "job-id", "s", "c", "speed", "t",
                            str(8 << 20)))[0]
        patterns = []
        for i in range(24):
            off = (i * 331) % 120 * 64 * 1024
            q.io(f"write -P 0x{0x40 + i:x} {off} 64k")
            patterns.append((off, 0x40 + i))
            if i == 11:
                wait_status(bus, job, "ready", timeout=60)
                bus.call(job, "Job", "Complete")
                wait_gone(bus, job)
        q.io("flush")
        # one connection all along: QEMU never had to reconnect
        assert prop(bus, exp, "Export", "Clients") == 1
    finally:
        q.quit()
    base_chain = data(bus.call(M, "Manager", "GetChain", "s", "A.qcow2"))[0]
    wait_for(lambda: prop(bus, exp, "Export", "Chain") == base_chain, "the export moved to the base")
    bus.call(exp, "Export", "Stop")
    last = {}
    for off, pat in patterns:
        last[off] = pat
    out = qemu_io(os.path.join(bus.root, "A.qcow2"), *[f"read -P 0x{p:x} {o} 64k" for o, p in last.items()]).stdout
    assert "Pattern verification failed" not in out, out
    check_clean(bus)


def test_stop_with_a_writer_connected(bus):
    """Stop() while a client writes: it is disconnected, the call returns once the export is gone,
    and every write it had acknowledged is in the chain."""
    chain = make_seed_chain(bus)
    exp, uri = writable_export(bus, chain)
    w = Writer(uri, seed=9)
    w.start()
    wait_for(lambda: w.writes > 100, "writes")
    bus.call(exp, "Export", "Stop")
    w.join(30)
    assert not w.is_alive() and w.error is not None  # the server closed the connection
    assert exports(bus) == []
    got = file_content(os.path.join(bus.root, "D.qcow2"))
    # the last write may have been cut off unacknowledged: only its range may differ
    later = w.since_flush[-1:] if w.since_flush else []
    for off, ln in later:
        got = got[:off] + bytes(w.shadow[off:off + ln]) + got[off + ln:]
    assert got == bytes(w.shadow), f"first difference at {first_diff(got, bytes(w.shadow))}"
    check_clean(bus)


@pytest.mark.parametrize("kind", ["mirror", "commit"])
def test_hard_cancel_leaves_the_writers_where_they_were(bus, kind):
    chain = make_seed_chain(bus)
    exp, uri = writable_export(bus, chain)
    w = Writer(uri, seed=10)
    w.start()
    if kind == "mirror":
        job = data(bus.call(chain, "Chain", "Mirror", "sa{sv}", "E.qcow2", "2", "job-id", "s", "j", "speed", "t",
                            str(2 << 20)))[0]
        wait_status(bus, job, "running")
    else:
        job = data(bus.call(chain, "Chain", "Commit", "a{sv}", "1", "job-id", "s", "j"))[0]
        wait_status(bus, job, "ready")
    time.sleep(0.3)
    bus.call(job, "Job", "Cancel", "b", "true")
    wait_gone(bus, job)
    n = w.writes
    wait_for(lambda: w.writes > n + 20, "writes after the cancel")
    expect = w.finish()
    assert prop(bus, exp, "Export", "Chain") == chain
    assert prop(bus, image(bus, "D.qcow2"), "Image", "InUse") == "export:w"
    bus.call(exp, "Export", "Stop")
    assert file_content(os.path.join(bus.root, "D.qcow2")) == expect
    check_clean(bus)


@pytest.mark.parametrize("length,cache", [(1 << 20, "writeback"), (4096, "none")])
def test_a_stuck_client_blocks_nobody(bus, length, cache):
    """A client that sends reads and never takes the replies: the bus answers, another client is served,
    a snapshot (which waits for every request inside the disk) goes through, and Stop() gives up on the
    stuck one after its grace period while the bus keeps answering.  1 MiB reads go to the connection's
    workers, 4 KiB ones through its reader's io_uring, whose reads must not hold the snapshot up (around
    the page cache, they are still in the ring when the replies of the first ones stop going out)."""
    chain = make_seed_chain(bus)
    exp = export(bus, chain, ("name", "s", "st"), ("cache", "s", cache))
    sock_path = uri_of(bus, exp).split("socket=")[1]
    sk = socket.socket(socket.AF_UNIX)
    sk.connect(sock_path)
    sk.settimeout(10)
    hello = b""
    while len(hello) < 18:
        hello += sk.recv(18 - len(hello))
    sk.sendall(struct.pack(">I", 3))  # fixed newstyle, no zeroes
    name = b"st"
    sk.sendall(struct.pack(">QII", 0x49484156454F5054, 7, 4 + len(name) + 2) + struct.pack(">I", len(name)) + name +
               struct.pack(">H", 0))  # NBD_OPT_GO
    buf = b""
    while True:  # option replies until NBD_REP_ACK
        while len(buf) < 20:
            buf += sk.recv(4096)
        ln = struct.unpack(">I", buf[16:20])[0]
        while len(buf) < 20 + ln:
            buf += sk.recv(4096)
        typ = struct.unpack(">I", buf[12:16])[0]
        buf = buf[20 + ln:]
        if typ == 1:
            break
    assert flood_reads(sk, length) * length > 4 << 20  # more than the socket holds
    t0 = time.monotonic()
    bus.call(M, "Manager", "ListImages")
    assert "export-size" in sh("nbdinfo", uri_of(bus, exp)).stdout
    assert time.monotonic() - t0 < 5
    t0 = time.monotonic()
    bus.call(chain, "Chain", "Snapshot", "sa{sv}", "E.qcow2", "0")
    assert time.monotonic() - t0 < 5, "a stuck client held the snapshot up"
    exp_chain = data(bus.call(M, "Manager", "GetChain", "s", "E.qcow2"))[0]
    wait_for(lambda: prop(bus, exp, "Export", "Chain") == exp_chain, "the export moved to the overlay")
    stopper = subprocess.Popen(["busctl", "--system", "call", "org.diskchain.DiskChain1", exp,
                                "org.diskchain.DiskChain1.Export", "Stop"], env={**os.environ, **bus.env},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    while stopper.poll() is None:
        t1 = time.monotonic()
        bus.call(M, "Manager", "ListExports")
        assert time.monotonic() - t1 < 2, "the bus stalled while an export stopped"
        time.sleep(0.2)
    assert stopper.returncode == 0, stopper.stderr.read()
    assert time.monotonic() - t0 < 30
    assert exports(bus) == []
    sk.close()


def test_storage_migration_to_a_diskchain_export(bus):
    """The seed's storage migration with diskchain on both ends: the destination image is served by an
    export, the source chain is mirrored into its URI while a client writes to the source's own export,
    and a soft cancel once ready leaves the destination equal to the source."""
    chain = make_seed_chain(bus)
    create(bus, "dest.qcow2", SIZE)
    dchain = data(bus.call(M, "Manager", "GetChain", "s", "dest.qcow2"))[0]
    dest = export(bus, dchain, ("name", "s", "dest"), ("writable", "b", "true"))
    src, uri = writable_export(bus, chain, name="src")
    w = Writer(uri, seed=11)
    w.start()
    job = data(bus.call(chain, "Chain", "Mirror", "sa{sv}", uri_of(bus, dest), "1", "job-id", "s", "mig"))[0]
    wait_status(bus, job, "ready", timeout=60)
    p = bus.call(job, "Job", "Complete", check=False)
    assert p.returncode != 0 and "cancel it once ready" in p.stderr, p.stderr
    expect = w.finish()  # the guest pauses, as QEMU's migration stops the VM
    bus.call(job, "Job", "Cancel", "b", "false")
    wait_gone(bus, job)
    assert read_all(uri_of(bus, dest)) == expect
    bus.call(src, "Export", "Stop")
    bus.call(dest, "Export", "Stop")
    assert file_content(os.path.join(bus.root, "dest.qcow2")) == expect
    check_clean(bus)


# --- exports over TCP ([NBD] TCPListen=, TLS) -------------------------------------------



@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return credentials(tmp_path_factory)


@pytest.fixture
def conf_bus(request):
    """A private bus whose daemon reads the diskchain.conf given."""
    made = []

    def start(config):
        b = Bus(config=config)
        made.append(b)
        return b
    yield start
    for b in made:
        finish(request, b)


def tcp_of(uri):
    """(scheme, host, port, name) of an nbd:// or nbds:// URI."""
    scheme, rest = uri.split("://", 1)
    hostport, name = rest.split("/", 1)
    host, port = hostport.rsplit(":", 1)
    return scheme, host.strip("[]"), int(port), name


def qemu_over_tls(uri, creds_object):
    _, host, port, name = tcp_of(uri)
    return ["--object", creds_object, "--image-opts",
            f"driver=raw,file.driver=nbd,file.host={host},file.port={port},file.export={name},file.tls-creds=tls0"]


@needs_tls_tools
def test_tcp_export_with_x509(conf_bus, pki):
    bus = conf_bus(f"[NBD]\nTCPListen=127.0.0.1 [::1]:10809\nTLSCredentials={pki.server}\n")
    chain = make_seed_chain(bus)
    exp = export(bus, chain, ("name", "s", "net"), ("tcp", "s", "127.0.0.1:0"))
    uri = uri_of(bus, exp)
    scheme, host, port, name = tcp_of(uri)
    assert (scheme, host, name) == ("nbds", "127.0.0.1", "net") and port > 0, uri
    # 'tcp' alone: no unix socket
    assert not os.path.exists(os.path.join(bus.dir, "run", "nbd", "net"))
    # the client the CA signed reads the chain: qemu-img and nbdinfo
    creds = f"tls-creds-x509,id=tls0,dir={pki.client},endpoint=client"
    p = qemu_img("compare", *qemu_over_tls(uri, creds), f"driver=raw,file.filename={bus.dir}/D.ref", check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    info = sh("nbdinfo", "--json", f"{uri}?tls-certificates={pki.client}").stdout
    assert f'"export-size": {SIZE}' in info and '"TLS": true' in info, info
    # plaintext clients and untrusted certificates get nothing
    p = sh("nbdinfo", uri.replace("nbds://", "nbd://"), check=False)
    assert p.returncode != 0
    p = sh("qemu-img", "info", "-f", "raw", uri.replace("nbds://", "nbd://"), check=False)
    assert p.returncode != 0 and "TLS" in p.stderr, p.stderr
    assert sh("nbdinfo", f"{uri}?tls-certificates={pki.rogue}", check=False).returncode != 0
    # garbage after STARTTLS closes that connection, and nothing else
    sk = socket.create_connection(("127.0.0.1", port), timeout=10)
    assert len(sk.recv(18, socket.MSG_WAITALL)) == 18
    sk.sendall(struct.pack(">I", 3) + struct.pack(">QII", 0x49484156454F5054, 5, 0))
    assert struct.unpack(">QIII", sk.recv(20, socket.MSG_WAITALL))[2] == 1   # ACK
    # (not random bytes alone: they may read as a record header announcing more to come,
    # which only the 10 s handshake timeout ends)
    sk.sendall(b"GET / HTTP/1.0\r\n\r\n" + os.urandom(2048))
    sk.settimeout(5)
    try:
        while sk.recv(4096):   # an alert, then EOF
            pass
    except ConnectionResetError:
        pass
    sk.close()
    assert "export-size" in sh("nbdinfo", f"{uri}?tls-certificates={pki.client}").stdout
    # an address the configuration allows with another port is not allowed
    p = export(bus, chain, ("name", "s", "v6"), ("tcp", "s", "[::1]:10810"), check=False)
    assert p.returncode != 0 and "TCPListen=" in p.stderr, p.stderr
    bus.call(exp, "Export", "Stop")
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=5)


@needs_tls_tools
def test_tcp_export_with_psk_persistent(conf_bus, pki):
    """PSK; a persistent TCP export comes back on the port it was given."""
    bus = conf_bus(f"[NBD]\nTCPListen=127.0.0.1\nTLSPSKFile={pki.psk}\n")
    chain = make_seed_chain(bus)
    exp = export(bus, chain, ("name", "s", "keep"), ("tcp", "s", "127.0.0.1:0"), ("persistent", "b", "true"),
                 ("writable", "b", "true"))
    uri = uri_of(bus, exp)
    _, host, port, _ = tcp_of(uri)
    psk_uri = uri.replace("nbds://", "nbds://alice@") + f"?tls-psk-file={pki.psk}"
    h = nbd.NBD()
    h.set_uri_allow_local_file(True)
    h.connect_uri(psk_uri)
    h.pwrite(b"\x77" * 65536, 1 << 20)
    h.flush()
    h.shutdown()
    assert sh("nbdinfo", uri.replace("nbds://", "nbds://alice@") + f"?tls-psk-file={pki.badpsk}",
              check=False).returncode != 0
    p = qemu_img("info", *qemu_over_tls(uri, f"tls-creds-psk,id=tls0,dir={pki.psk.parent},username=alice,"
                                             "endpoint=client"), check=False)
    assert p.returncode == 0 and f"({SIZE} bytes)" in p.stdout, p.stdout + p.stderr
    rec = open(os.path.join(bus.state, "exports", "keep")).read()
    assert f"TCP=127.0.0.1:{port}" in rec, rec
    pid = bus.daemon_pid()
    os.kill(pid, 15)
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"), "the daemon stopped")
    bus.call(M, "Manager", "ListImages")
    wait_for(lambda: exports(bus) == [exp], "the export is back")
    assert uri_of(bus, exp) == uri
    h = nbd.NBD()
    h.set_uri_allow_local_file(True)
    h.connect_uri(psk_uri)
    assert h.pread(65536, 1 << 20) == b"\x77" * 65536
    h.shutdown()
    bus.call(exp, "Export", "Stop")


def test_tcp_export_honours_the_crl(conf_bus, pki):
    """ca-crl.pem beside the CA: a client certificate the CA revoked is refused, the others still get in."""
    bus = conf_bus(f"[NBD]\nTCPListen=127.0.0.1\nTLSCredentials={pki.server_crl}\n")
    chain = make_seed_chain(bus)
    exp = export(bus, chain, ("name", "s", "crl"), ("tcp", "s", "127.0.0.1:0"))
    uri = uri_of(bus, exp)
    assert "export-size" in sh("nbdinfo", f"{uri}?tls-certificates={pki.client}").stdout
    p = sh("nbdinfo", f"{uri}?tls-certificates={pki.revoked}", check=False)
    assert p.returncode != 0, p.stdout
    assert "export-size" in sh("nbdinfo", f"{uri}?tls-certificates={pki.client}").stdout
    bus.call(exp, "Export", "Stop")


@needs_tls_tools
def test_tcp_refused_without_credentials(conf_bus):
    """Without credentials TLS cannot be had, so TCP is refused (see the next test for loopback);
    and only what TCPListen= names is allowed."""
    bus = conf_bus("[NBD]\nTCPListen=127.0.0.1:10809 192.0.2.7 0.0.0.0\n")
    chain = make_seed_chain(bus)
    for tcp, want in (("127.0.0.1:10809", "TCPPlaintextLoopback=yes"), ("192.0.2.7:10809", "needs TLS"),
                      ("0.0.0.0:10809", "needs TLS"), ("127.0.0.1:10810", "TCPListen="),
                      ("10.1.2.3:10809", "TCPListen="), ("localhost:10809", "ADDRESS:PORT"),
                      ("[::1]", "ADDRESS:PORT"), ("127.0.0.1:99999", "ADDRESS:PORT")):
        p = export(bus, chain, ("tcp", "s", tcp), check=False)
        assert p.returncode != 0 and want in p.stderr, (tcp, p.stderr)
    p = export(bus, chain, ("tcp", "s", "192.0.2.7:10809"), check=False)
    assert "TLSCredentials=" in p.stderr and "Loopback" not in p.stderr, p.stderr
    assert exports(bus) == []


def test_tcp_plaintext_loopback_only_when_configured(conf_bus):
    """TCPPlaintextLoopback=yes: loopback addresses go without TLS, others still need it."""
    bus = conf_bus("[NBD]\nTCPListen=127.0.0.1 0.0.0.0\nTCPPlaintextLoopback=yes\n")
    chain = make_seed_chain(bus)
    # non-loopback still needs TLS
    p = export(bus, chain, ("tcp", "s", "0.0.0.0:0"), check=False)
    assert p.returncode != 0 and "needs TLS" in p.stderr, p.stderr
    sock = os.path.join(bus.dir, "mine.sock")
    exp = export(bus, chain, ("name", "s", "lo"), ("tcp", "s", "127.0.0.1:0"), ("socket", "s", sock))
    # both listen; Uri names the unix socket
    assert uri_of(bus, exp) == f"nbd+unix:///lo?socket={sock}"
    log = bus.daemon_log()
    port = int(re.search(r"TCP 127\.0\.0\.1:(\d+) in plaintext", log).group(1))
    info = sh("nbdinfo", "--json", f"nbd://127.0.0.1:{port}/lo").stdout
    assert f'"export-size": {SIZE}' in info and '"TLS": false' in info, info
    # any local user may connect in plaintext: that is what the option says
    assert "export-size" in sh("nbdinfo", f"nbd://127.0.0.1:{port}/lo", user=TEST_USER).stdout
    assert "export-size" in sh("nbdinfo", f"nbd+unix:///lo?socket={sock}").stdout
    bus.call(exp, "Export", "Stop")
    # diskchainctl too: 'tcp' alone, so the URI is the TCP one
    out = bus.ctl("export", "D.qcow2", "--name", "ctl", "--tcp", "127.0.0.1:0").stdout
    port = int(re.search(r"nbd://127\.0\.0\.1:(\d+)/ctl", out).group(1))
    assert "export-size" in sh("nbdinfo", f"nbd://127.0.0.1:{port}/ctl").stdout
    assert "stopped export ctl" in bus.ctl("unexport", "ctl").stdout


# --- remote targets with the daemon's own TLS credentials ([Remote]) -------------------

def tls_qemu_nbd(target, port, creds):
    """qemu-nbd serving TARGET on 127.0.0.1:PORT, TLS required with the tls-creds object CREDS."""
    p = start(["qemu-nbd", "-f", "qcow2", "-p", port, "-b", "127.0.0.1", "--object", creds, "--tls-creds", "tls0",
               target])
    wait_port(port, p)
    return p


@needs_tls_tools
@pytest.mark.parametrize("kind", ["x509", "psk"])
def test_remote_target_with_the_configured_credentials(conf_bus, pki, kind):
    """A backup into nbds:// with the credentials of [Remote] TLSCertificates= (a client certificate the
    server verifies) or TLSPSKFile=; credentials the server does not accept fail the job, not the daemon."""
    if kind == "x509":
        good = f"[Remote]\nTLSCertificates={pki.client}\n"
        bad = f"[Remote]\nTLSCertificates={pki.rogue}\n"
        creds = f"tls-creds-x509,id=tls0,endpoint=server,dir={pki.server},verify-peer=on"
        user = ""
    else:
        good = f"[Remote]\nTLSPSKFile={pki.psk}\n"
        bad = f"[Remote]\nTLSPSKFile={pki.badpsk}\n"
        creds = f"tls-creds-psk,id=tls0,endpoint=server,dir={pki.psk.parent}"
        user = "alice@"
    for config, ok in ((good, True), (bad, False)):
        bus = conf_bus(config)
        chain = make_seed_chain(bus)
        target = os.path.join(bus.dir, "remote.qcow2")
        qemu_img("create", "-q", "-f", "qcow2", target, str(SIZE))
        port = free_port()
        srv = tls_qemu_nbd(target, port, creds)
        try:
            uri = f"nbds://{user}127.0.0.1:{port}/"
            p = bus.call(chain, "Chain", "Backup", "sa{sv}", uri, "2", "job-id", "s", "b", "auto-dismiss", "b",
                         "false", check=False)
            if p.returncode == 0:
                job = data(p)[0]
                wait_status(bus, job, "concluded")
                err = prop(bus, job, "Job", "Error")
                bus.call(job, "Job", "Dismiss")
            else:
                err = p.stderr
        finally:
            srv.send_signal(15)
            srv.wait(10)
        if ok:
            assert not err, err
            assert qemu_img("check", target, check=False).returncode == 0
            p = qemu_img("compare", "-F", "raw", target, os.path.join(bus.dir, "D.ref"), check=False)
            assert p.returncode == 0, p.stdout + p.stderr
        else:
            assert err and "127.0.0.1" in err, err
        assert bus.daemon_pid()


def test_bitmap_names_are_bytes_from_the_file(bus):
    """A bitmap name with a terminal escape and a byte that is no UTF-8: the property is still valid
    (the name made UTF-8), and diskchainctl prints no control character."""
    img = os.path.join(bus.root, "evil.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", img, "1M")
    subprocess.run([b"qemu-img", b"bitmap", b"--add", img.encode(), b"evil\x1b[31m\xff"], check=True)
    o = image(bus, "evil.qcow2")
    wait_for(lambda: len(prop(bus, o, "Image", "Bitmaps")) == 1, "the bitmap listed")
    assert prop(bus, o, "Image", "Bitmaps")[0][0] == "evil\x1b[31m\ufffd"
    out = bus.ctl("info", "evil.qcow2").stdout
    assert "\x1b" not in out and "  evil?[31m" in out, out


def test_bitmaps_property_follows_the_file(bus):
    """Image.Bitmaps lists what QEMU stored and follows qemu-img and qemu-io as they change the file;
    a writable export's writes are recorded into the enabled bitmaps, which the property shows once
    the export has closed the file; a writer killed with the file open leaves them inconsistent."""
    img = os.path.join(bus.root, "bm.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", img, "64M")
    qemu_img("bitmap", "--add", "-g", "4096", img, "daily")
    qemu_io(img, "write 1M 100k", "write 9M 4k")
    qemu_img("bitmap", "--add", img, "weekly")
    qemu_img("bitmap", "--disable", img, "weekly")
    o = image(bus, "bm.qcow2")
    want = [["daily", 4096, 102400 + 4096, True, False, True, False], ["weekly", 65536, 0, False, False, True, False]]
    wait_for(lambda: prop(bus, o, "Image", "Bitmaps") == want, f"Bitmaps {want}")
    out = bus.ctl("info", "bm.qcow2").stdout
    assert re.search(r"\n  daily: granularity 4(\.00)? KiB, 104 KiB dirty, recording\n  weekly: granularity 64(\.0)? KiB, "
                     r"0 B dirty, disabled\n", out), out
    assert json.loads(bus.ctl("--json", "info", "bm.qcow2").stdout)["bitmaps"][1] == dict(
        name="weekly", granularity=65536, dirty=0, recording=False, busy=False, persistent=True, inconsistent=False)
    qemu_img("bitmap", "--remove", img, "weekly")
    wait_for(lambda: prop(bus, o, "Image", "Bitmaps") == want[:1], "weekly removed")
    uri = re.search(r"nbd\+unix://\S+", bus.ctl("export", "bm.qcow2", "--name", "bm", "--writable").stdout).group(0)
    sh("qemu-io", "-f", "raw", "-c", "write 20M 4k", uri)
    # the export's write is recorded, and stored when the export closes the file
    bus.ctl("unexport", "bm")
    want[0][2] += 4096
    wait_for(lambda: prop(bus, image(bus, "bm.qcow2"), "Image", "Bitmaps") == want[:1], "the export's write counted")
    # a writer that dies with the file open leaves the bitmap in use: inconsistent
    sh("qemu-io", "-f", "qcow2", "-c", "write 30M 4k", "-c", "sigraise 9", img, check=False)
    wait_for(lambda: prop(bus, image(bus, "bm.qcow2"), "Image", "Bitmaps")[0][6], "daily inconsistent")
    assert prop(bus, image(bus, "bm.qcow2"), "Image", "Bitmaps") == [["daily", 4096, 0, True, False, True, True]]
    out = bus.ctl("info", "bm.qcow2").stdout
    assert "daily: granularity 4" in out and "inconsistent" in out, out
