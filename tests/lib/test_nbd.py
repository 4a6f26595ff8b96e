# SPDX-License-Identifier: LGPL-2.1-or-later
"""The NBD export (lib/nbd-server.c) judged by real clients: qemu-img,
qemu-io, nbdinfo, nbdcopy and libnbd for what clients do, raw sockets for
what hostile ones do.  dc-nbd-serve exports a chain built with qemu-img;
every test stops it with SIGTERM and requires a clean exit, so that a stuck
export or a crash on the way out fails the test that caused it."""
import json
import random
import os
import signal
import socket
import struct
import subprocess
import time

import pytest

from imgtest import BUILD, assert_clean, dc, qemu_img, qemu_io, qemu_map, run
from nbdservers import flood_reads
from tlsfiles import credentials, needs_tools

nbd = pytest.importorskip("nbd")

DC_NBD_SERVE = os.path.join(BUILD, "tests", "dc-nbd-serve")
MiB = 1 << 20
SIZE = 64 * MiB

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
STRUCTURED_MAGIC = 0x668E33EF
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_GO, OPT_STRUCTURED, OPT_SET_META = 1, 2, 3, 7, 8, 10
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH = 0, 1, 2, 3
NBD_EPERM, NBD_EINVAL, NBD_ENOSPC, NBD_EOVERFLOW, NBD_ENOTSUP = 1, 22, 28, 75, 95


class Server:
    def __init__(self, tmp, image, *args, name="disk", writable=True, sock=True):
        self.sock = str(tmp / "nbd.sock") if sock else None
        self.uri = f"nbd+unix:///{name}?socket={self.sock}"
        cmd = [DC_NBD_SERVE, "--name", name]
        if writable:
            cmd.append("--writable")
        if self.sock:
            cmd += ["--socket", self.sock]
        cmd += list(args) + [str(image)]
        if os.environ.get("DISKCHAIN_VALGRIND"):
            # errors make the exit status 66, which stop() reports with valgrind's words
            cmd = ["valgrind", "-q", "--error-exitcode=66", "--leak-check=full", "--errors-for-leak-kinds=definite",
                   *cmd]
        self.p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  pass_fds=getattr(self, "pass_fds", ()))
        self.tcp_ports = []
        line = self.p.stdout.readline()
        while line.startswith("tcp "):
            self.tcp_ports.append(int(line.split()[1]))
            line = self.p.stdout.readline()
        assert line == "ready\n", line + self.p.stderr.read()
        self.stats = None

    def stop(self, timeout=30):
        """SIGTERM: the export must finish, flush and exit 0 in time."""
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
        try:
            out, err = self.p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            out, err = self.p.communicate()
            raise AssertionError(f"dc-nbd-serve did not exit on SIGTERM:\n{err}")
        assert self.p.returncode == 0, f"dc-nbd-serve exit {self.p.returncode}:\n{out}{err}"
        line = [x for x in out.split("\n") if x.startswith("stats ")][0]
        self.stats = dict(kv.split("=") for kv in line.split()[1:])
        return self.stats

    def kill9(self):
        self.p.kill()
        self.p.communicate()


@pytest.fixture
def chain(tmp):
    """[A] <-- [B] <-- [C], 64 MiB: A data 0-4M, B data 2-6M, C data 5-6M and a zero cluster range at 10M."""
    qemu_img("create", "-q", "-f", "qcow2", tmp / "A.qcow2", "64M")
    qemu_io(tmp / "A.qcow2", "write -P 0xa 0 4M", "write -P 0xa 32M 64k")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "A.qcow2", "-F", "qcow2", tmp / "B.qcow2")
    qemu_io(tmp / "B.qcow2", "write -P 0xb 2M 4M", "write -z 32M 64k")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "B.qcow2", "-F", "qcow2", tmp / "C.qcow2")
    qemu_io(tmp / "C.qcow2", "write -P 0xc 5M 1M", "write -z 10M 1M", "write -P 0xd 40M 192k")
    return tmp / "C.qcow2"


@pytest.fixture
def server(tmp, chain):
    servers = []

    def start(*args, **kw):
        s = Server(tmp, chain, *args, **kw)
        servers.append(s)
        return s
    yield start
    for s in servers:
        if s.p.poll() is None:
            s.stop()


def model(tmp, chain):
    """The chain's content as a raw file, to apply the same writes to."""
    path = tmp / "model.raw"
    qemu_img("convert", "-U", "-O", "raw", chain, path)
    return path


def connect(uri, *contexts):
    h = nbd.NBD()
    for c in contexts:
        h.add_meta_context(c)
    h.connect_uri(uri)
    return h


# --- real clients ---------------------------------------------------------------


def test_qemu_img_info_and_compare(server, chain):
    s = server()
    info = json.loads(qemu_img("info", "--output=json", "-f", "raw", s.uri).stdout)
    assert info["virtual-size"] == SIZE
    qemu_img("compare", "-U", "-f", "raw", "-F", "qcow2", s.uri, chain)


def test_qemu_img_convert_from_export(tmp, server, chain):
    s = server(writable=False)
    qemu_img("convert", "-f", "raw", "-O", "qcow2", s.uri, tmp / "copy.qcow2")
    qemu_img("compare", "-U", "-F", "qcow2", tmp / "copy.qcow2", chain)
    # zero ranges were skipped through base:allocation: the copy holds only the data
    # (A's data at 32M is under a zero cluster of B)
    assert [e["start"] for e in qemu_map(tmp / "copy.qcow2") if e["data"]] == [0, 40 * MiB]


def test_qemu_img_convert_into_export(tmp, server, chain):
    src = tmp / "src.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", src, "64M")
    qemu_io(src, "write -P 0x33 1M 3M", "write -P 0x44 50M 1M")
    s = server()
    qemu_img("convert", "-n", "-f", "qcow2", "-O", "raw", src, s.uri)
    s.stop()
    assert_clean(chain)
    qemu_img("compare", "-F", "qcow2", chain, src)


def test_qemu_io_writes(tmp, server, chain):
    ref = model(tmp, chain)
    cmds = ["write -P 0x51 100k 300k", "aio_write -P 0x52 3M 1M", "aio_flush", "write -z 2M 512k",
            "write -z -u 40M 64k", "discard 5M 64k", "flush", "write -P 0x53 63M 1M",
            "write -P 0x54 12345 777", "writev -P 0x55 20M 4k 8k"]
    s = server()
    run("qemu-io", "-f", "raw", *sum((["-c", c] for c in cmds), []), s.uri)
    # the same writes on the model (discard reads back as zeros there: a raw file punches)
    run("qemu-io", "-f", "raw", *sum((["-c", c] for c in cmds), []), ref)
    qemu_img("compare", "-U", "-f", "raw", "-F", "raw", s.uri, ref)
    stats = s.stop()
    assert int(stats["written"]) >= 300 * 1024 + MiB + MiB
    assert_clean(chain)
    qemu_img("compare", "-F", "raw", chain, ref)


def test_nbdinfo_map_base_allocation(server, chain):
    s = server(writable=False)
    got = json.loads(run("nbdinfo", "--map", "--json", s.uri).stdout)
    want = json.loads(qemu_img("map", "-U", "--output=json", chain).stdout)

    def flags_at(off):
        for e in got:
            if e["offset"] <= off < e["offset"] + e["length"]:
                return e["type"]
        raise AssertionError(f"{off} not mapped")
    assert got[0]["offset"] == 0 and sum(e["length"] for e in got) == SIZE
    for e in want:
        expect = (0 if e["data"] else 1) | (2 if e["zero"] else 0)
        for off in (e["start"], e["start"] + e["length"] - 1):
            assert flags_at(off) == expect, (e, got)


def test_nbdinfo_map_allocation_depth(server, chain):
    s = server(writable=False)
    got = json.loads(run("nbdinfo", "--map=qemu:allocation-depth", "--json", s.uri).stdout)
    want = json.loads(qemu_img("map", "-U", "--output=json", chain).stdout)
    assert sum(e["length"] for e in got) == SIZE
    for e in want:
        depth = e["depth"] + 1 if e["present"] else 0
        for off in (e["start"], e["start"] + e["length"] - 1):
            (g,) = [x for x in got if x["offset"] <= off < x["offset"] + x["length"]]
            assert g["type"] == depth, (e, got)
    # the three layers each supply something
    assert {x["type"] for x in got} == {0, 1, 2, 3}


def test_nbdinfo_list_and_description(server):
    s = server("--description", "the test chain", name="vm1")
    out = run("nbdinfo", "--list", "--json", s.uri).stdout
    exports = json.loads(out)["exports"]
    assert [e["export-name"] for e in exports] == ["vm1"]
    assert exports[0]["description"] == "the test chain"
    assert exports[0]["export-size"] == SIZE


@pytest.mark.parametrize("what", ["multi-conn", "flush", "fua", "trim", "zero", "fast-zero", "df", "cache", "write"])
def test_nbdinfo_can(server, what):
    s = server()
    assert run("nbdinfo", "--can", what, s.uri, check=False).returncode == 0


def test_read_only_export(server, chain):
    s = server(writable=False)
    assert run("nbdinfo", "--is", "readonly", s.uri, check=False).returncode == 0
    assert run("nbdinfo", "--can", "trim", s.uri, check=False).returncode != 0
    p = run("qemu-io", "-f", "raw", "-c", "write 0 4k", s.uri, check=False)
    assert p.returncode != 0 or "failed" in p.stdout + p.stderr
    h = connect(s.uri)
    h.set_strict_mode(0)
    with pytest.raises(nbd.Error) as e:
        h.pwrite(b"x" * 512, 0)
    assert e.value.errno == "EPERM"
    h.shutdown()


def test_nbdcopy_both_ways(tmp, server, chain):
    s = server()
    run("nbdcopy", s.uri, tmp / "out.raw")
    qemu_img("compare", "-U", "-f", "raw", "-F", "qcow2", tmp / "out.raw", chain)
    src = tmp / "in.raw"
    qemu_img("create", "-q", "-f", "raw", src, "64M")
    qemu_io(src, "write -P 0x77 0 1M", "write -P 0x78 33M 5M", fmt="raw")
    run("nbdcopy", src, s.uri)
    s.stop()
    assert_clean(chain)
    qemu_img("compare", "-F", "raw", chain, src)


def test_fd_mode(tmp, chain):
    a, b = socket.socketpair()
    Server.pass_fds = (b.fileno(),)
    try:
        s = Server(tmp, chain, "--fd", str(b.fileno()), sock=False)
    finally:
        del Server.pass_fds
    b.close()
    h = nbd.NBD()
    h.connect_socket(a.detach())  # libnbd owns it now
    assert h.pread(4096, 5 * MiB) == b"\x0c" * 4096
    h.shutdown()
    stats = s.stop()
    assert int(stats["requests"]) >= 1 and int(stats["read"]) >= 4096
    assert int(stats["changed"]) >= 2, "connect and leave are both told"
    assert stats["depth"] == "3", "dc_disk_depth counts the chain's layers"


# --- semantics --------------------------------------------------------------------


def test_structured_read_sends_holes(server):
    s = server(writable=False)
    h = connect(s.uri)
    chunks = []

    def cb(buf, offset, status, err):
        chunks.append((offset, len(buf), status))
        return 0
    data = h.pread_structured(2 * MiB, 9 * MiB, cb)
    assert data == bytes(2 * MiB)
    assert [c[2] for c in chunks] == [nbd.READ_HOLE]
    chunks.clear()
    h.pread_structured(MiB, 5 * MiB + 512 * 1024, cb)
    assert [c[2] for c in chunks] == [nbd.READ_DATA, nbd.READ_HOLE]
    chunks.clear()
    # DF: one data chunk for the whole range
    h.pread_structured(MiB, 5 * MiB + 512 * 1024, cb, nbd.CMD_FLAG_DF)
    assert [c[2] for c in chunks] == [nbd.READ_DATA]
    h.shutdown()


def io_uring_fds(pid):
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            n += os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[io_uring]"
        except OSError:
            pass
    return n


def pread_many(h, reads, issue):
    """READS ((offset, length)) issued with ISSUE(buffer, offset), 16 in flight: the bytes of each."""
    bufs = []
    for off, n in reads:
        bufs.append(nbd.Buffer(n))
        issue(bufs[-1], off)
        while h.aio_in_flight() >= 16:
            h.poll(-1)
    while h.aio_in_flight() > 0:
        h.poll(-1)
    return [b.to_bytearray() for b in bufs]


# (offset, length): one piece of each layout, reads that span several layers and zeros, unaligned
# ones, one past the reader's own limit (256 KiB); reads as zeros are holes to a structured client
LAYOUT_READS = [
    (0, 4096), (3 * MiB, 65536), (2 * MiB, 4096), (5 * MiB + 8192, 131072), (40 * MiB, 196608),
    (10 * MiB, 4096), (10 * MiB, 131072), (8 * MiB, 65536), (60 * MiB, 4096), (32 * MiB, 65536),
    (48 * MiB, 4096), (48 * MiB + 60 * 1024, 8192), (4 * MiB - 2048, 4096), (6 * MiB - 4096, 8192),
    (5 * MiB - 100, 4096), (40 * MiB + 7, 1000), (2 * MiB + 512, 512), (40 * MiB, 131072 + 512),
    (SIZE - 4096, 4096), (SIZE - 131072, 131072), (SIZE - 262144, 262144),
    (2 * MiB + 384 * 1024, 262144), (4 * MiB + 384 * 1024, 262144), (5 * MiB + 128 * 1024, 262144),
    (6 * MiB - 100 * 1024, 262144), (10 * MiB - 128 * 1024, 262144), (32 * MiB - 4096, 262144),
    (48 * MiB - 8192, 262144), (40 * MiB - 30000, 262144), (5 * MiB + 128 * 1024, 262144 + 512),
]


@pytest.mark.parametrize("cache", ["writeback", "none"])
@pytest.mark.parametrize("structured", [True, False])
def test_reads_of_every_layout(tmp, server, chain, cache, structured):
    """Small reads in one piece are the reader's own (through its io_uring), the rest go to the workers:
    both give the chain's bytes for data in each layer, zero clusters, unallocated ranges, compressed
    data and unaligned pieces, 16 at a time, with and without structured replies and DF."""
    rng = random.Random(5)
    for layer, off, n in [("A", 0, 3 * MiB), ("B", 2 * MiB + 512 * 1024, 2 * MiB), ("C", 5 * MiB + 256 * 1024, MiB // 2),
                          ("C", 40 * MiB, 192 * 1024)]:
        (tmp / "unique").write_bytes(rng.randbytes(n))
        qemu_io(tmp / f"{layer}.qcow2", f"write -s {tmp / 'unique'} {off} {n}")
    qemu_io(chain, "write -c -P 0xe 48M 64k")
    want = model(tmp, chain).read_bytes()
    s = server(*(["--cache-none"] if cache == "none" else []), writable=False)
    h = nbd.NBD()
    h.set_request_structured_replies(structured)
    h.connect_uri(s.uri)
    assert h.get_structured_replies_negotiated() == structured
    t0 = time.monotonic()
    # the reader sets it up right after the handshake (not under valgrind: lib/nbd-server.c says why)
    while not os.environ.get("DISKCHAIN_VALGRIND") and not io_uring_fds(s.p.pid):
        assert time.monotonic() - t0 < 5, "the connection's reader has no io_uring"
        time.sleep(0.01)
    reads = LAYOUT_READS + [(rng.randrange(0, SIZE // 4096) * 4096, 4096) for _ in range(100)] + \
        [(rng.randrange(0, 13 * 1024) * 512, rng.choice([512, 4096, 8192, 65536])) for _ in range(300)]
    for flags in ([0, nbd.CMD_FLAG_DF] if structured else [0]):
        chunks = {}

        def issue(buf, off):
            if structured:
                def chunk(sub, offset, status, err):
                    chunks.setdefault(off, set()).add(status)
                    return 0
                h.aio_pread_structured(buf, off, chunk, flags=flags)
            else:
                h.aio_pread(buf, off)
        for (off, n), got in zip(reads, pread_many(h, reads, issue)):
            assert got == want[off:off + n], f"read of {n} at {off} (flags {flags})"
        if structured:
            # a zero cluster and an unallocated range are holes, unless DF asks for data
            assert chunks[10 * MiB] == {nbd.READ_DATA if flags else nbd.READ_HOLE}
            assert chunks[60 * MiB] == {nbd.READ_DATA if flags else nbd.READ_HOLE}
            assert chunks[0] == {nbd.READ_DATA}
    h.shutdown()
    st = s.stop()
    assert int(st["requests"]) >= len(reads)


@pytest.mark.parametrize("cache", ["writeback", "none"])
def test_reads_in_many_pieces(tmp, cache):
    """4 KiB clusters that alternate between the top, its backing file and zeros: a read in at most 8
    pieces is the reader's own (a ring read per piece, zeros filled in), one in more goes to a worker;
    both give the chain's bytes, with a slot's buffer reused from one read to the next."""
    rng = random.Random(11)
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", tmp / "P.qcow2", "4M")
    (tmp / "unique").write_bytes(rng.randbytes(MiB))
    qemu_io(tmp / "P.qcow2", f"write -s {tmp / 'unique'} 0 1M")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "P.qcow2", "-F", "qcow2",
             tmp / "Q.qcow2")
    cmds = []
    for i in range(0, 2 * MiB, 8192):  # every other cluster: over data below up to 1M, over nothing after
        (tmp / f"u{i}").write_bytes(rng.randbytes(4096))
        cmds.append(f"write -s {tmp / f'u{i}'} {i} 4k")
    qemu_io(tmp / "Q.qcow2", *cmds)
    want = model(tmp, tmp / "Q.qcow2").read_bytes()
    s = Server(tmp, tmp / "Q.qcow2", *(["--cache-none"] if cache == "none" else []), writable=False)
    try:
        h = nbd.NBD()
        h.connect_uri(s.uri)
        reads = [(off, n) for off in range(0, 2 * MiB + 4096, 20480)
                 for n in (4096, 32768, 36864, 262144, 12800)] + [(rng.randrange(0, 1024) * 512, 512) for _ in range(64)]
        rng.shuffle(reads)
        for (off, n), got in zip(reads, pread_many(h, reads, h.aio_pread)):
            assert got == want[off:off + n], f"read of {n} at {off}"
        h.shutdown()
    finally:
        s.stop()


def test_block_status_req_one(server):
    s = server(writable=False)
    h = connect(s.uri, "base:allocation", "qemu:allocation-depth")
    got = {}

    def cb(ctx, offset, entries, err):
        got[ctx] = entries
        return 0
    h.block_status(4 * MiB, 8 * MiB, cb, nbd.CMD_FLAG_REQ_ONE)
    # 8M-10M unallocated everywhere, 10M-11M a zero cluster of the top, then unallocated
    assert got == {"base:allocation": [4 * MiB, 3], "qemu:allocation-depth": [2 * MiB, 0]}
    got.clear()
    h.block_status(4 * MiB, 8 * MiB, cb)
    assert got == {"base:allocation": [4 * MiB, 3], "qemu:allocation-depth": [2 * MiB, 0, MiB, 1, MiB, 0]}
    got.clear()
    h.block_status(2 * MiB, MiB, cb)
    assert got == {"base:allocation": [2 * MiB, 0], "qemu:allocation-depth": [MiB, 3, MiB, 2]}
    h.shutdown()


def test_fast_zero_only_where_zero_already(tmp, server, chain):
    s = server()
    h = connect(s.uri)
    # data there: a fast zero would have to write, so it fails at once and changes nothing
    with pytest.raises(nbd.Error) as e:
        h.zero(MiB, 5 * MiB, nbd.CMD_FLAG_FAST_ZERO)
    assert e.value.errno == "ENOTSUP"
    assert h.pread(512, 5 * MiB) == b"\x0c" * 512
    # unallocated and zero clusters: nothing to do, success
    h.zero(4 * MiB, 20 * MiB, nbd.CMD_FLAG_FAST_ZERO)
    # an ordinary zero write does it
    h.zero(MiB, 5 * MiB, nbd.CMD_FLAG_NO_HOLE)
    assert h.pread(512, 5 * MiB) == bytes(512)
    h.shutdown()
    s.stop()
    assert_clean(chain)


def test_out_of_order_completion(server):
    """A big read issued first completes after small ones issued behind it."""
    s = server(writable=False)
    h = connect(s.uri)
    order = []

    def done(name):
        def cb(err):
            order.append(name)
            return 1
        return cb
    for attempt in range(5):
        order.clear()
        big = bytearray(32 * MiB)
        h.aio_pread(big, 0, completion=done("big"))
        for i in range(12):
            h.aio_pread(bytearray(512), 5 * MiB + 512 * i, completion=done(i))
        while h.aio_in_flight() > 0:
            h.poll(-1)
        assert sorted(order, key=str) == sorted(["big"] + list(range(12)), key=str)
        if order[0] != "big":
            break
    assert order[0] != "big", f"replies came back in request order every time: {order}"
    h.shutdown()


def test_flush_is_durable_kill9(tmp, server, chain):
    ref = model(tmp, chain)
    s = server()
    h = connect(s.uri)
    for i in range(16):
        h.pwrite(bytes([0x60 + i]) * (64 * 1024 + 512), 20 * MiB + i * 131072 + 512)
    h.flush()
    s.kill9()
    for i in range(16):
        qemu_io(ref, f"write -P {0x60 + i} {20 * MiB + i * 131072 + 512} {64 * 1024 + 512}", fmt="raw")
    assert_clean(chain)
    qemu_img("compare", "-F", "raw", chain, ref)


def test_fua_is_durable_kill9(tmp, server, chain):
    ref = model(tmp, chain)
    s = server()
    h = connect(s.uri)
    h.pwrite(b"\x91" * 70000, 30 * MiB + 100, nbd.CMD_FLAG_FUA)
    s.kill9()
    qemu_io(ref, f"write -P 0x91 {30 * MiB + 100} 70000", fmt="raw")
    assert_clean(chain)
    qemu_img("compare", "-F", "raw", chain, ref)


def test_multi_conn_flush_covers_other_connection(tmp, server, chain):
    ref = model(tmp, chain)
    s = server()
    h1, h2 = connect(s.uri), connect(s.uri)
    h1.pwrite(b"\x42" * 8192, 7 * MiB)
    h2.flush()
    s.kill9()
    qemu_io(ref, f"write -P 0x42 {7 * MiB} 8192", fmt="raw")
    assert_clean(chain)
    qemu_img("compare", "-F", "raw", chain, ref)


# --- hostile clients ------------------------------------------------------------------


def recv_exact(sk, n):
    b = b""
    while len(b) < n:
        x = sk.recv(n - len(b))
        if not x:
            raise EOFError(f"closed after {len(b)} of {n} bytes")
        b += x
    return b


def closed(sk, timeout=5):
    """True when the server closes the connection (EOF) within TIMEOUT."""
    sk.settimeout(timeout)
    try:
        while sk.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def raw_connect(s):
    sk = socket.socket(socket.AF_UNIX)
    sk.connect(s.sock)
    sk.settimeout(10)
    magic, opt, flags = struct.unpack(">QQH", recv_exact(sk, 18))
    assert (magic, opt) == (NBDMAGIC, IHAVEOPT) and flags == 3
    return sk


def send_opt(sk, opt, data=b""):
    sk.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)


def read_opt_reply(sk):
    magic, opt, typ, ln = struct.unpack(">QIII", recv_exact(sk, 20))
    assert magic == REPLY_MAGIC
    return opt, typ, recv_exact(sk, ln)


def raw_go(s, name=b"disk", structured=False):
    """A handshake by hand up to transmission; returns the socket."""
    sk = raw_connect(s)
    sk.sendall(struct.pack(">I", 3))
    if structured:
        send_opt(sk, OPT_STRUCTURED)
        assert read_opt_reply(sk)[1] == 1
    send_opt(sk, OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
    while True:
        opt, typ, data = read_opt_reply(sk)
        if typ == 1:
            return sk
        assert typ == 3, (typ, data)


def request(sk, cmd, offset, length, cookie=1, flags=0, payload=b""):
    sk.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, cookie, offset, length) + payload)


def simple_reply(sk):
    magic, err, cookie = struct.unpack(">IIQ", recv_exact(sk, 16))
    assert magic == SIMPLE_MAGIC
    return err, cookie


def still_serves(s):
    """A good client still gets the right data."""
    h = connect(s.uri)
    assert h.pread(4096, 5 * MiB) == b"\x0c" * 4096
    h.shutdown()


def test_hostile_bad_client_flags(server):
    s = server()
    for flags in (0, 1 << 5, 0xFFFFFFFF):   # non-fixed newstyle, unknown bits
        sk = raw_connect(s)
        sk.sendall(struct.pack(">I", flags))
        assert closed(sk)
        sk.close()
    still_serves(s)


def test_hostile_bad_option_magic(server):
    s = server()
    sk = raw_connect(s)
    sk.sendall(struct.pack(">I", 1) + struct.pack(">QII", 0x1234, OPT_GO, 0))
    assert closed(sk)
    still_serves(s)


def test_hostile_oversized_option(server):
    s = server()
    sk = raw_connect(s)
    sk.sendall(struct.pack(">I", 1) + struct.pack(">QII", IHAVEOPT, OPT_GO, 0xFFFFFFF0) + b"x" * 4096)
    assert closed(sk)
    still_serves(s)


def test_hostile_malformed_options_answered(server):
    s = server()
    sk = raw_connect(s)
    sk.sendall(struct.pack(">I", 1))
    # GO whose name runs past the option, unknown option, LIST with data, SET before structured
    send_opt(sk, OPT_GO, struct.pack(">I", 1000) + b"ab")
    assert read_opt_reply(sk)[1] == 0x80000003
    send_opt(sk, 999, b"zzz")
    assert read_opt_reply(sk)[1] == 0x80000001
    send_opt(sk, OPT_LIST, b"x")
    assert read_opt_reply(sk)[1] == 0x80000003
    send_opt(sk, OPT_SET_META, struct.pack(">I", 4) + b"disk" + struct.pack(">I", 0))
    assert read_opt_reply(sk)[1] == 0x80000003
    send_opt(sk, OPT_GO, struct.pack(">I", 5) + b"other" + struct.pack(">H", 0))
    assert read_opt_reply(sk)[1] == 0x80000006
    # and then a correct GO still works
    send_opt(sk, OPT_GO, struct.pack(">I", 4) + b"disk" + struct.pack(">H", 0))
    while True:
        opt, typ, data = read_opt_reply(sk)
        if typ == 1:
            break
    request(sk, CMD_READ, 5 * MiB, 512, cookie=77)
    assert simple_reply(sk) == (0, 77)
    assert recv_exact(sk, 512) == b"\x0c" * 512
    send_opt_abort = struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0)
    sk.sendall(send_opt_abort)
    assert closed(sk)
    still_serves(s)


def test_hostile_export_name_unknown_closes(server):
    s = server()
    sk = raw_connect(s)
    sk.sendall(struct.pack(">I", 3))
    send_opt(sk, OPT_EXPORT_NAME, b"nope")
    assert closed(sk)
    sk = raw_connect(s)
    sk.sendall(struct.pack(">I", 3))
    send_opt(sk, OPT_EXPORT_NAME, b"disk")
    size, tflags = struct.unpack(">QH", recv_exact(sk, 10))
    assert size == SIZE and tflags & 1
    sk.close()
    still_serves(s)


def test_hostile_abort(server):
    s = server()
    sk = raw_connect(s)
    sk.sendall(struct.pack(">I", 1))
    send_opt(sk, OPT_ABORT)
    assert read_opt_reply(sk)[1] == 1
    assert closed(sk)
    still_serves(s)


def test_hostile_garbage_after_handshake(server):
    s = server()
    sk = raw_go(s)
    sk.sendall(os.urandom(28))
    assert closed(sk)
    still_serves(s)


def test_hostile_bad_requests_answered(server):
    s = server()
    sk = raw_go(s)
    request(sk, CMD_READ, SIZE - 512, 1024, cookie=1)      # past the end
    assert simple_reply(sk) == (NBD_EINVAL, 1)
    request(sk, CMD_READ, 0, 64 * MiB, cookie=2)           # beyond the maximum payload
    assert simple_reply(sk) == (NBD_EOVERFLOW, 2)
    request(sk, 42, 0, 4096, cookie=3)                     # unknown command
    assert simple_reply(sk) == (NBD_EINVAL, 3)
    request(sk, CMD_READ, 0, 512, cookie=4, flags=1 << 9)  # unknown flag
    assert simple_reply(sk) == (NBD_EINVAL, 4)
    request(sk, CMD_WRITE, SIZE, 512, cookie=5, payload=b"w" * 512)  # write past the end
    assert simple_reply(sk) == (NBD_ENOSPC, 5)
    request(sk, 7, 0, 512, cookie=6)                       # block status without a context
    assert simple_reply(sk) == (NBD_EINVAL, 6)
    request(sk, CMD_READ, 5 * MiB, 512, cookie=7)          # and the connection goes on
    assert simple_reply(sk) == (0, 7)
    assert recv_exact(sk, 512) == b"\x0c" * 512
    sk.close()
    still_serves(s)


def test_hostile_error_chunks_structured(server):
    s = server()
    sk = raw_go(s, structured=True)
    request(sk, CMD_READ, SIZE, 512, cookie=9)
    magic, flags, typ, cookie, ln = struct.unpack(">IHHQI", recv_exact(sk, 20))
    assert (magic, flags, typ, cookie) == (STRUCTURED_MAGIC, 1, 0x8001, 9)
    err, msglen = struct.unpack(">IH", recv_exact(sk, 6))
    assert err == NBD_EINVAL and msglen == ln - 6 and msglen > 0
    recv_exact(sk, msglen)
    sk.close()
    still_serves(s)


def test_hostile_write_larger_than_max(server, chain):
    s = server()
    sk = raw_go(s)
    request(sk, CMD_WRITE, 0, 33 * MiB, payload=b"x" * 65536)
    assert closed(sk)
    still_serves(s)


def test_hostile_disconnect_mid_payload(tmp, server, chain):
    ref = model(tmp, chain)
    s = server()
    for _ in range(5):
        sk = raw_go(s)
        request(sk, CMD_WRITE, 0, MiB, payload=b"x" * 1000)
        sk.close()
    still_serves(s)
    s.stop()
    # no part of the cut writes reached the disk
    assert_clean(chain)
    qemu_img("compare", "-F", "raw", chain, ref)


def test_hostile_connections_beyond_max(server):
    s = server("--max-connections", "4")
    socks = []
    for _ in range(100):
        sk = socket.socket(socket.AF_UNIX)
        sk.connect(s.sock)
        socks.append(sk)
    time.sleep(0.5)
    # four got a greeting; the rest were closed at once
    greeted = 0
    for sk in socks:
        sk.settimeout(2)
        try:
            greeted += len(sk.recv(18)) == 18
        except (socket.timeout, ConnectionResetError):
            pass
    assert greeted == 4
    for sk in socks:
        sk.close()
    time.sleep(0.3)
    still_serves(s)


@pytest.mark.parametrize("length", [MiB, 4096])
def test_hostile_stuck_client_does_not_block_others(server, length):
    """A client that sends requests and never reads its replies stalls only itself, and the stop
    gives up on it after the grace period: reads for the workers (1 MiB) and for the reader's ring."""
    s = server()
    sk = raw_go(s)
    assert flood_reads(sk, length) * length > 4 * MiB  # more than the socket holds
    t0 = time.monotonic()
    still_serves(s)
    assert time.monotonic() - t0 < 5
    t0 = time.monotonic()
    s.stop(timeout=40)
    assert time.monotonic() - t0 < 30
    sk.close()


def test_hostile_slow_handshake_times_out(server):
    s = server()
    sk = raw_connect(s)
    t0 = time.monotonic()
    # a byte every second never finishes the handshake within 10 s
    try:
        for b in struct.pack(">I", 1) + struct.pack(">QII", IHAVEOPT, OPT_LIST, 0)[:12]:
            sk.send(bytes([b]))
            time.sleep(1)
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert closed(sk, timeout=15)
    assert 9 < time.monotonic() - t0 < 20
    still_serves(s)


def test_stop_with_clients_connected(server):
    """SIGTERM while clients are idle in transmission and in the handshake."""
    s = server()
    h = connect(s.uri)
    sk = raw_connect(s)
    sk2 = raw_go(s)
    request(sk2, CMD_READ, 0, 4096, cookie=5)  # its reply fits the socket's buffer
    time.sleep(0.2)
    t0 = time.monotonic()
    s.stop()
    assert time.monotonic() - t0 < 5
    # the request read before the stop was answered
    assert simple_reply(sk2) == (0, 5)
    assert recv_exact(sk2, 4096) == b"\x0a" * 4096
    assert closed(sk2)
    sk.close()
    del h


# --- TLS (NBD_OPT_STARTTLS) over TCP ---------------------------------------------------

OPT_STARTTLS = 5
REP_ACK, REP_ERR_UNSUP, REP_ERR_TLS_REQD = 1, 0x80000001, 0x80000005


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return credentials(tmp_path_factory)


def tls_server(server, pki, *args, addr="127.0.0.1", x509=True, psk=False, verify=True):
    opts = ["--tcp", f"[{addr}]:0" if ":" in addr else f"{addr}:0"]
    if x509:
        opts += ["--tls-dir", str(pki.server)] + (["--tls-verify-peer"] if verify else [])
    if psk:
        opts += ["--tls-psk", str(pki.psk)]
    s = server(*opts, *args, sock=False)
    s.host = f"[{addr}]" if ":" in addr else addr
    s.port = s.tcp_ports[0]
    return s


def nbds(s, creds, user=None):
    """An nbds:// URI for libnbd and nbdinfo: X.509 with the certificates in CREDS, or PSK from the file CREDS."""
    if user:
        return f"nbds://{user}@{s.host}:{s.port}/disk?tls-psk-file={creds}"
    return f"nbds://{s.host}:{s.port}/disk?tls-certificates={creds}"


def qemu_tls(kind, creds, user=None):
    if kind == "psk":
        return ["--object", f"tls-creds-psk,id=tls0,dir={creds.parent},username={user},endpoint=client"]
    return ["--object", f"tls-creds-x509,id=tls0,dir={creds},endpoint=client"]


def qemu_nbd_opts(s):
    host = s.host.strip("[]")
    return f"driver=raw,file.driver=nbd,file.host={host},file.port={s.port},file.export=disk,file.tls-creds=tls0"


def tcp_connect(s):
    sk = socket.create_connection((s.host.strip("[]"), s.port), timeout=10)
    magic, opt, flags = struct.unpack(">QQH", recv_exact(sk, 18))
    assert (magic, opt) == (NBDMAGIC, IHAVEOPT) and flags == 3
    return sk


@needs_tools
def test_tls_x509_real_clients(server, chain, pki):
    """qemu-img and nbdinfo over TLS with a client certificate the CA signed."""
    s = tls_server(server, pki)
    info = json.loads(qemu_img("info", "--output=json", *qemu_tls("x509", pki.client), "--image-opts",
                               qemu_nbd_opts(s)).stdout)
    assert info["virtual-size"] == SIZE
    qemu_img("compare", "-U", *qemu_tls("x509", pki.client), "--image-opts", qemu_nbd_opts(s),
             f"driver=qcow2,file.filename={chain}")
    out = run("nbdinfo", "--json", nbds(s, pki.client)).stdout
    j = json.loads(out)
    assert j["TLS"] is True and j["exports"][0]["export-size"] == SIZE, out
    assert "disk" in run("nbdinfo", "--list", nbds(s, pki.client)).stdout
    st = s.stop()
    assert int(st["clients"]) == 0


@needs_tools
def test_tls_writes_both_ways_multi_conn(tmp, server, chain, pki):
    """nbdcopy (several connections, 32 MiB requests' worth of corked replies) into and out of a TLS export."""
    s = tls_server(server, pki)
    src = tmp / "src.raw"
    with open(src, "wb") as f:
        f.write(os.urandom(SIZE))
    run("nbdcopy", "--connections=4", "--request-size=33554432", src, nbds(s, pki.client))
    run("nbdcopy", "--connections=2", nbds(s, pki.client), tmp / "back.raw")
    assert open(tmp / "back.raw", "rb").read() == open(src, "rb").read()
    s.stop()
    qemu_img("compare", "-f", "qcow2", "-F", "raw", chain, src)


@needs_tools
def test_tls_psk(server, chain, pki):
    """PSK with psktool's keys file: nbdinfo and qemu-img."""
    s = tls_server(server, pki, x509=False, psk=True)
    out = run("nbdinfo", "--json", nbds(s, pki.psk, user="alice")).stdout
    assert json.loads(out)["exports"][0]["export-size"] == SIZE, out
    qemu_img("compare", "-U", *qemu_tls("psk", pki.psk, user="alice"), "--image-opts", qemu_nbd_opts(s),
             f"driver=qcow2,file.filename={chain}")


@needs_tools
def test_tls_ipv6_x509_and_psk(server, chain, pki):
    """Both kinds of credentials on one IPv6 listener; a client uses either.  (qemu-img only:
    libnbd sends an IPv6 literal as TLS server name, which RFC 6066 forbids and GnuTLS refuses.)"""
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    s = tls_server(server, pki, addr="::1", psk=True)
    for creds in (qemu_tls("psk", pki.psk, user="alice"), qemu_tls("x509", pki.client)):
        qemu_img("compare", "-U", *creds, "--image-opts", qemu_nbd_opts(s), f"driver=qcow2,file.filename={chain}")


@needs_tools
def test_tls_plaintext_client_refused(server, pki):
    """Before STARTTLS every option gets TLS_REQD and nothing of the export is told; EXPORT_NAME closes."""
    s = tls_server(server, pki)
    sk = tcp_connect(s)
    sk.sendall(struct.pack(">I", 3))
    for opt, data in ((OPT_LIST, b""), (OPT_STRUCTURED, b""), (OPT_GO, struct.pack(">I", 4) + b"disk\0\0"),
                      (99, b"xyz")):
        send_opt(sk, opt, data)
        o, typ, msg = read_opt_reply(sk)
        assert (o, typ) == (opt, REP_ERR_TLS_REQD) and b"disk" not in msg
    send_opt(sk, OPT_EXPORT_NAME, b"disk")
    assert closed(sk)
    sk.close()
    # real clients without TLS get nowhere either
    p = run("nbdinfo", f"nbd://127.0.0.1:{s.port}/disk", check=False)
    assert p.returncode != 0
    p = run("qemu-img", "info", "-f", "raw", f"nbd://127.0.0.1:{s.port}/disk", check=False)
    assert p.returncode != 0 and "TLS" in p.stderr, p.stderr
    s.stop()
    # and a plaintext export does not offer TLS: STARTTLS is unsupported there
    plain = server("--tcp", "127.0.0.1:0", sock=False)
    sk = socket.create_connection(("127.0.0.1", plain.tcp_ports[0]), timeout=10)
    recv_exact(sk, 18)
    sk.sendall(struct.pack(">I", 3))
    send_opt(sk, OPT_STARTTLS)
    assert read_opt_reply(sk)[:2] == (OPT_STARTTLS, REP_ERR_UNSUP)
    sk.close()
    out = run("nbdinfo", "--json", f"nbd://127.0.0.1:{plain.tcp_ports[0]}/disk").stdout
    assert json.loads(out)["TLS"] is False


@needs_tools
def test_tls_untrusted_certificates_refused(server, pki):
    """verify-peer: a certificate from another CA, or none, is refused; without it a client needs none."""
    s = tls_server(server, pki)
    for creds in (pki.rogue, pki.nocert):
        p = run("nbdinfo", nbds(s, creds), check=False)
        assert p.returncode != 0, (creds, p.stdout)
    p = run("qemu-img", "info", *qemu_tls("x509", pki.rogue), "--image-opts", qemu_nbd_opts(s), check=False)
    assert p.returncode != 0
    run("nbdinfo", nbds(s, pki.client))
    s.stop()
    s = tls_server(server, pki, verify=False)
    run("nbdinfo", nbds(s, pki.nocert))
    # the client still checks the server: a client trusting another CA refuses it
    other = pki.rogue.parent / "trusts-other"
    other.mkdir(exist_ok=True)
    (other / "ca-cert.pem").write_bytes((pki.rogue.parent / "work" / "otherca-cert.pem").read_bytes())
    assert run("nbdinfo", nbds(s, other), check=False).returncode != 0


@needs_tools
def test_tls_wrong_psk_refused(server, pki):
    s = tls_server(server, pki, x509=False, psk=True)
    assert run("nbdinfo", nbds(s, pki.badpsk, user="alice"), check=False).returncode != 0
    assert run("nbdinfo", nbds(s, pki.stranger, user="bob"), check=False).returncode != 0
    p = run("qemu-img", "info", *qemu_tls("psk", pki.badpsk, user="alice"), "--image-opts", qemu_nbd_opts(s),
            check=False)
    assert p.returncode != 0
    run("nbdinfo", nbds(s, pki.psk, user="alice"))


def client_hello():
    """The first flight of a real TLS client, as bytes."""
    import ssl
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def starttls_acked(s):
    sk = tcp_connect(s)
    sk.sendall(struct.pack(">I", 3))
    send_opt(sk, OPT_STARTTLS)
    assert read_opt_reply(sk)[:2] == (OPT_STARTTLS, REP_ACK)
    return sk


@needs_tools
def test_tls_hostile_garbage_in_handshake(server, pki):
    s = tls_server(server, pki)
    sk = starttls_acked(s)
    sk.sendall(b"GET / HTTP/1.0\r\n\r\n" + os.urandom(4096))
    assert closed(sk, timeout=5)
    sk.close()
    # a ClientHello with its body scrambled
    hello = bytearray(client_hello())
    hello[20:60] = os.urandom(40)
    sk = starttls_acked(s)
    try:
        sk.sendall(bytes(hello))
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert closed(sk, timeout=5)
    sk.close()
    run("nbdinfo", nbds(s, pki.client))


@needs_tools
def test_tls_hostile_stall_mid_handshake_times_out(server, pki):
    """Half a ClientHello, then nothing: the 10 s handshake timeout covers the TLS handshake."""
    s = tls_server(server, pki)
    t0 = time.monotonic()
    sk = starttls_acked(s)
    hello = client_hello()
    sk.sendall(hello[:len(hello) // 2])
    stalled = tcp_connect(s)   # and one that stalls before STARTTLS
    assert closed(sk, timeout=15)
    assert 9 < time.monotonic() - t0 < 20
    assert closed(stalled, timeout=5)
    sk.close()
    stalled.close()
    run("nbdinfo", nbds(s, pki.client))


@needs_tools
def test_tls_stop_with_clients_connected(server, pki):
    """SIGTERM with a TLS client idle in transmission and one in the middle of its TLS handshake."""
    s = tls_server(server, pki)
    h = nbd.NBD()
    h.set_tls_certificates(str(pki.client))
    h.set_tls(nbd.TLS_REQUIRE)
    h.connect_tcp("127.0.0.1", str(s.port))
    assert h.pread(4096, 5 * MiB) == b"\x0c" * 4096
    sk = starttls_acked(s)
    sk.sendall(client_hello()[:10])
    time.sleep(0.2)
    t0 = time.monotonic()
    st = s.stop()
    assert time.monotonic() - t0 < 5
    assert int(st["requests"]) >= 1
    sk.close()
    del h


# --- qemu:dirty-bitmap -------------------------------------------------------------


def test_dirty_bitmap_context(tmp, server, chain):
    """--bitmap offers the top layer's bitmap, as it was when the export started, as the context
    qemu:dirty-bitmap:NAME: nbdinfo maps it exactly as qemu-nbd -B does, LIST shows it under the
    qemu: and qemu:dirty-bitmap: namespaces, a client may select it alone or with base:allocation,
    and writes through the export after the start do not show in it."""
    qemu_img("bitmap", "--add", "-g", "4096", chain, "b0")
    qemu_io(chain, "write -P 1 1M 64k", f"write -P 1 {7 * MiB + 512} 512", f"write -P 1 {SIZE - 4096} 4096")
    want = json.loads(run("nbdinfo", "--map=qemu:dirty-bitmap:b0", "--json", "--", "[", "qemu-nbd", "-r", "-f",
                          "qcow2", "-B", "b0", chain, "]").stdout)
    s = server("--bitmap", "b0")
    got = json.loads(run("nbdinfo", "--map=qemu:dirty-bitmap:b0", "--json", s.uri).stdout)
    assert [(e["offset"], e["length"], e["type"]) for e in got] == \
        [(e["offset"], e["length"], e["type"]) for e in want]
    assert [(e["offset"], e["length"]) for e in got if e["type"] & 1] == \
        [(MiB, 65536), (7 * MiB, 4096), (SIZE - 4096, 4096)]
    out = run("nbdinfo", s.uri).stdout
    assert "qemu:dirty-bitmap:b0" in out and "base:allocation" in out, out
    for query, names in [("qemu:", {"qemu:allocation-depth", "qemu:dirty-bitmap:b0"}),
                         ("qemu:dirty-bitmap:", {"qemu:dirty-bitmap:b0"}), ("base:", {"base:allocation"})]:
        h = nbd.NBD()
        h.set_opt_mode(True)
        h.connect_uri(s.uri)
        h.add_meta_context(query)
        got_names = set()
        h.opt_list_meta_context(lambda name: got_names.add(name) or 0)
        h.opt_abort()
        assert got_names == names, (query, got_names)
    # both contexts in one connection, each answered in its own chunk
    h = connect(s.uri, "base:allocation", "qemu:dirty-bitmap:b0")
    assert h.can_meta_context("qemu:dirty-bitmap:b0") and h.can_meta_context("base:allocation")
    seen = {}

    def cb(ctx, off, entries, err):
        seen[ctx] = list(entries)
        return 0
    h.block_status(2 * MiB, MiB - 4096, cb)
    assert seen["qemu:dirty-bitmap:b0"][:4] == [4096, 0, 65536, 1] and "base:allocation" in seen
    # a write through the export after the start is not in the frozen view
    h.pwrite(b"\x07" * 4096, 20 * MiB)
    seen.clear()
    h.block_status(4096, 20 * MiB, cb)
    assert seen["qemu:dirty-bitmap:b0"] == [4096, 0]
    h.shutdown()
    # another name is not offered: a client asking for it gets no such context
    h = connect(s.uri, "qemu:dirty-bitmap:nosuch")
    assert not h.can_meta_context("qemu:dirty-bitmap:nosuch")
    h.shutdown()
    s.stop()
    # ... and the export's write was recorded into the bitmap itself, for the next backup
    assert (20 * MiB, 4096) in [tuple(int(x) for x in line.split()) for line in
                                dc("bitmaps", chain, "b0").stdout.splitlines()]


def test_dirty_bitmap_export_refusals(tmp, chain):
    """No such bitmap, or one left in use by a writer: the export does not start, and says why."""
    p = run(DC_NBD_SERVE, "--name", "disk", "--socket", str(tmp / "s"), "--bitmap", "nosuch", chain, check=False)
    assert p.returncode == 1 and "no bitmap named 'nosuch'" in p.stderr, p.stderr
    qemu_img("bitmap", "--add", chain, "b0")
    run("qemu-io", "-f", "qcow2", "-c", "write 0 4k", "-c", "sigraise 9", chain, check=False)
    p = run(DC_NBD_SERVE, "--name", "disk", "--socket", str(tmp / "s"), "--bitmap", "b0", chain, check=False)
    assert p.returncode == 1 and "inconsistent" in p.stderr, p.stderr
