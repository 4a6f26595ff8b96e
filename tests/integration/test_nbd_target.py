# SPDX-License-Identifier: LGPL-2.1-or-later
"""Backup and Mirror into NBD exports over the bus: the storage-migration flow
of the seed (mirror to the destination's NBD server, wait for ready, soft
cancel, stop the server) against real servers (qemu-nbd, qemu-storage-daemon),
Complete() refused, the refusals of what a URI cannot mean, two jobs on one
export, a server that dies, and whom the root daemon connects to for an
unprivileged caller.  qemu-img judges every copy after its server is gone."""
import os
import random
import time

import pytest

from bustest import qemu_img, set_group_member
from nbdservers import free_port, servers, start, stop, wait_port, wait_socket  # noqa: F401 (servers: autouse)
from test_bus import M, data, prop, wait_gone, wait_status

SIZE = 16 << 20


def make_chain(bus):
    """[A] <-- [B] <-- [C] in the root, made by qemu-img from raw files of unique random data in scattered
    pieces (some zeroed in the overlays); returns the chain object and C's content as a raw file."""
    rnd = random.Random(os.getpid() ^ int(time.time()))
    content = bytearray(SIZE)
    prev = None
    for name in "ABC":
        for _ in range(24):
            off = rnd.randrange(0, SIZE // 65536) * 65536
            n = rnd.choice([4096, 65536, 200 << 10])
            n = min(n, SIZE - off)
            content[off:off + n] = bytes(n) if prev and rnd.random() < 0.2 else rnd.randbytes(n)
        raw = os.path.join(bus.dir, f"{name}.raw")
        with open(raw, "wb") as f:
            f.write(content)
        img = os.path.join(bus.root, f"{name}.qcow2")
        qemu_img("convert", "-q", "-f", "raw", "-O", "qcow2", *(["-B", f"{prev}.qcow2", "-F", "qcow2"] if prev else []),
                 raw, img)
        prev = name
    time.sleep(0.4)  # let the daemon see the files
    return data(bus.call(M, "Manager", "GetChain", "s", "C.qcow2"))[0], os.path.join(bus.dir, "C.raw")


def qemu_nbd(target, sock=None, port=None, name="", extra=()):
    args = ["qemu-nbd", "-f", "qcow2", "-x", name, *extra, target]
    args[1:1] = ["--socket", sock] if sock else ["-p", str(port), "-b", "127.0.0.1"]
    p = start(args)
    if sock:
        wait_socket(sock, p)
    else:
        wait_port(port, p)
    return p


def qsd(target, sock, name="tgt"):
    p = start(["qemu-storage-daemon", "--blockdev", f"driver=file,filename={target},node-name=f",
               "--blockdev", "driver=qcow2,file=f,node-name=t",
               "--nbd-server", f"addr.type=unix,addr.path={sock}",
               "--export", f"type=nbd,id=e,node-name=t,name={name},writable=on"])
    wait_socket(sock, p)
    return p


def new_target(bus, name="target.qcow2", size=SIZE):
    """The destination's image: outside the storage roots, as on another host."""
    t = os.path.join(bus.dir, name)
    qemu_img("create", "-q", "-f", "qcow2", t, str(size))
    return t


def judge(target, ref):
    assert qemu_img("check", target, check=False).returncode == 0
    p = qemu_img("compare", "-F", "raw", target, ref, check=False)
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.parametrize("server", ["qemu-nbd", "qemu-storage-daemon"])
def test_storage_migration(bus, server):
    chain, ref = make_chain(bus)
    target = new_target(bus)
    sock = os.path.join(bus.dir, "nbd.sock")
    if server == "qemu-nbd":
        srv, uri = qemu_nbd(target, sock=sock), f"nbd+unix:///?socket={sock}"
    else:
        srv, uri = qsd(target, sock), f"nbd+unix:///tgt?socket={sock}"
    job = data(bus.call(chain, "Chain", "Mirror", "sa{sv}", uri, "1", "job-id", "s", "mig"))[0]
    wait_status(bus, job, "ready")
    assert prop(bus, job, "Job", "Target") == uri
    # the export cannot become the chain's active layer: refused, and the job goes on
    p = bus.gdbus("--object-path", job, "--method", "org.diskchain.DiskChain1.Job.Complete", check=False)
    assert p.returncode != 0 and "cannot become the chain's active layer" in p.stderr, p.stderr
    assert "org.diskchain.DiskChain1.Error.NotSupported" in p.stderr, p.stderr
    time.sleep(0.3)
    assert prop(bus, job, "Job", "Status") == "ready"
    # the soft cancel: a consistent copy, flushed, and the chain as it was
    bus.call(job, "Job", "Cancel", "b", "false")
    wait_gone(bus, job)
    stop(srv)
    judge(target, ref)
    assert qemu_img("compare", "-F", "raw", os.path.join(bus.root, "C.qcow2"), ref, check=False).returncode == 0
    assert data(bus.call(M, "Manager", "GetChain", "s", "C.qcow2"))[0] == chain


def test_backup_over_tcp_and_unix_and_diskchainctl(bus):
    chain, ref = make_chain(bus)
    port = free_port()
    t1 = new_target(bus, "tcp.qcow2")
    srv = qemu_nbd(t1, port=port, name="disk0")
    job = data(bus.call(chain, "Chain", "Backup", "sa{sv}", f"nbd://127.0.0.1:{port}/disk0", "0"))[0]
    wait_gone(bus, job)
    stop(srv)
    judge(t1, ref)
    # diskchainctl passes a URI through as the target and follows the job to its end
    t2 = new_target(bus, "unix.qcow2")
    sock = os.path.join(bus.dir, "u.sock")
    srv = qemu_nbd(t2, sock=sock)
    p = bus.ctl("backup", "C.qcow2", f"nbd+unix:///?socket={sock}", "--sync", "full")
    stop(srv)
    judge(t2, ref)
    assert "completed" in (p.stdout + p.stderr).lower() or p.returncode == 0


def test_refusals(bus):
    chain, _ = make_chain(bus)
    sock = os.path.join(bus.dir, "r.sock")
    small = new_target(bus, "small.qcow2", SIZE // 2)
    srv = qemu_nbd(small, sock=sock)
    uri = f"nbd+unix:///?socket={sock}"
    for method, opts, want in (
            ("Backup", [], "different sizes"),
            ("Mirror", ["mode", "s", "absolute-paths"], "cannot create an NBD export"),
            ("Mirror", ["format", "s", "raw"], "drop 'format'"),
            ("Backup", ["compress", "b", "true"], "compressed clusters"),
            ("Backup", ["job-id", "s", "x", "no-such", "b", "true"], "no-such")):
        p = bus.call(chain, "Chain", method, "sa{sv}", uri, str(len(opts) // 3), *opts, check=False)
        assert p.returncode != 0 and want in p.stderr, (method, opts, p.stderr)
    for bad, want in ((f"nbds+unix:///?socket={sock}&tls-psk-file=/etc/shadow", "tls-psk-file"),
                      ("nbd+unix:///x", "socket="), ("nbd://:10809/x", "needs a host"),
                      ("nbd://h:99999/", "bad port"), (f"nbd+unix:///?socket={sock}&foo=1", "unknown query")):
        p = bus.call(chain, "Chain", "Backup", "sa{sv}", bad, "0", check=False)
        assert p.returncode != 0 and want in p.stderr, (bad, p.stderr)
    stop(srv)
    # a read-only export
    t = new_target(bus)
    srv = qemu_nbd(t, sock=sock, extra=["-r"])
    p = bus.call(chain, "Chain", "Backup", "sa{sv}", uri, "0", check=False)
    assert p.returncode != 0 and "read-only" in p.stderr, p.stderr
    stop(srv)
    assert data(bus.call(M, "Manager", "ListJobs"))[0] == []


def test_one_export_one_job_and_a_server_that_dies(bus):
    chain, _ = make_chain(bus)
    qemu_img("create", "-q", "-f", "qcow2", os.path.join(bus.root, "other.qcow2"), str(SIZE))
    time.sleep(0.4)
    other = data(bus.call(M, "Manager", "GetChain", "s", "other.qcow2"))[0]
    target = new_target(bus)
    sock = os.path.join(bus.dir, "d.sock")
    srv = qsd(target, sock)
    pid = bus.daemon_pid()
    job = data(bus.call(chain, "Chain", "Mirror", "sa{sv}", f"nbd+unix:///tgt?socket={sock}", "3",
                        "speed", "t", str(1 << 20), "auto-dismiss", "b", "false", "on-target-error", "s", "report"))[0]
    wait_status(bus, job, "running")
    # the same export, spelled otherwise, is that job's
    p = bus.call(other, "Chain", "Backup", "sa{sv}", f"nbd+unix:///tgt?socket={bus.dir}/./x/../d.sock", "0",
                 check=False)
    assert p.returncode != 0 and "is the target of job" in p.stderr, p.stderr
    # the server dies in the middle of the copy: the job fails, the daemon stays
    srv.kill()
    srv.wait()
    wait_status(bus, job, "concluded")
    err = prop(bus, job, "Job", "Error")
    assert err and "d.sock" in err, err
    assert bus.daemon_pid() == pid
    bus.call(job, "Job", "Dismiss")
    assert data(bus.call(M, "Manager", "ListJobs"))[0] == []


def test_the_servers_minimum_block_size(bus):
    """An NBD server that refuses requests below 4 KiB (nbdkit's blocksize-policy with error): a granularity or
    max-chunk under it is refused up front with the reason, and the defaults copy in blocks it takes."""
    chain, ref = make_chain(bus)
    target = os.path.join(bus.dir, "min4k.raw")
    with open(target, "wb") as f:
        f.truncate(SIZE)
    sock = os.path.join(bus.dir, "min4k.sock")
    srv = start(["nbdkit", "--foreground", "--unix", sock, "--filter=blocksize-policy", "file", target,
                 "blocksize-minimum=4096", "blocksize-preferred=65536", "blocksize-error-policy=error"])
    wait_socket(sock, srv)
    uri = f"nbd+unix:///?socket={sock}"
    p = bus.call(chain, "Chain", "Mirror", "sa{sv}", uri, "1", "granularity", "u", "512", check=False)
    assert p.returncode != 0 and "below the minimum block size" in p.stderr and "4096" in p.stderr, p.stderr
    p = bus.call(chain, "Chain", "Backup", "sa{sv}", uri, "1", "max-chunk", "t", "1024", check=False)
    assert p.returncode != 0 and "max-chunk must be at least" in p.stderr and "4096" in p.stderr, p.stderr
    job = data(bus.call(chain, "Chain", "Mirror", "sa{sv}", uri, "2", "job-id", "s", "m4k",
                        "granularity", "u", "4096"))[0]
    wait_status(bus, job, "ready")
    bus.call(job, "Job", "Cancel", "b", "false")
    wait_gone(bus, job)
    stop(srv)
    p = qemu_img("compare", "-f", "raw", "-F", "raw", target, ref, check=False)
    assert p.returncode == 0, p.stdout + p.stderr


def test_unprivileged_caller_reaches_only_its_own_sockets(bus):
    chain, ref = make_chain(bus)
    u = "dctest"
    hidden = os.path.join(bus.dir, "private")
    os.mkdir(hidden, 0o700)  # root's: dctest cannot reach what is inside
    sock = os.path.join(hidden, "s.sock")
    target = new_target(bus)
    srv = qemu_nbd(target, sock=sock)
    uri = f"nbd+unix:///?socket={sock}"
    # without the group polkit says no
    p = bus.call(chain, "Chain", "Backup", "sa{sv}", uri, "0", user=u, check=False)
    assert p.returncode != 0 and ("not authorized" in p.stderr or "Access denied" in p.stderr
                                  or "interactive authentication required" in p.stderr), p.stderr
    set_group_member(True)
    try:
        # polkit says yes, but the socket is one dctest could not connect to: neither may the daemon for them
        # (gdbus shows AccessDenied's own message, which busctl replaces with a generic one)
        p = bus.gdbus("--object-path", chain, "--method", "org.diskchain.DiskChain1.Chain.Backup", uri, "{}",
                      user=u, check=False)
        assert p.returncode != 0 and "may not connect to this socket" in p.stderr, p.stderr
        assert "org.freedesktop.DBus.Error.AccessDenied" in p.stderr, p.stderr
        assert data(bus.call(M, "Manager", "ListJobs"))[0] == []
        # once dctest could, the daemon connects for them
        os.chmod(hidden, 0o755)
        os.chmod(sock, 0o777)
        job = data(bus.call(chain, "Chain", "Backup", "sa{sv}", uri, "0", user=u))[0]
        wait_gone(bus, job)
    finally:
        set_group_member(False)
    stop(srv)
    judge(target, ref)
