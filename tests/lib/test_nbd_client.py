# SPDX-License-Identifier: LGPL-2.1-or-later
"""The library's NBD target (lib/nbd-client.c) against real servers: a mirror
under a live writer (dc-live) onto qemu-storage-daemon soft-cancelled into a
point-in-time copy, complete refused, and TLS (PSK) with qemu-nbd.  Every
server is stopped before qemu-img judges its image."""
import os
import signal
import subprocess
import time

import pytest

from imgtest import BUILD, assert_clean, dc, qemu_img, qemu_io, run
from nbdservers import serve, servers, stop  # noqa: F401 (servers: the autouse fixture)

DC_LIVE = os.path.join(BUILD, "tests", "dc-live")
@pytest.fixture
def chain(tmp):
    """[A] <-- [B] <-- [C], 32 MiB, fragmented."""
    qemu_img("create", "-q", "-f", "qcow2", tmp / "A.qcow2", "32M")
    qemu_io(tmp / "A.qcow2", "write -P 0xa 0 20M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "A.qcow2", "-F", "qcow2", tmp / "B.qcow2")
    qemu_io(tmp / "B.qcow2", "write -P 0xb 8M 8M", "write -z 1M 1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "B.qcow2", "-F", "qcow2", tmp / "C.qcow2")
    for i in range(0, 32, 3):
        qemu_io(tmp / "C.qcow2", f"write -P {0xc0 + i} {i}M 64k")
    return tmp


def qsd(t, target, sock):
    return serve(["qemu-storage-daemon", "--blockdev", f"driver=file,filename={target},node-name=f",
                  "--blockdev", "driver=qcow2,file=f,node-name=t",
                  "--nbd-server", f"addr.type=unix,addr.path={sock}",
                  "--export", "type=nbd,id=e,node-name=t,name=tgt,writable=on"], sock)


@pytest.mark.parametrize("mode", ["background", "write-blocking"])
def test_mirror_under_writes_soft_cancel(chain, mode):
    t = chain
    qemu_img("create", "-q", "-f", "qcow2", t / "T.qcow2", "32M")
    srv = qsd(t, t / "T.qcow2", t / "q.sock")
    p = run(DC_LIVE, t, "mirror", t / "C.qcow2", f"nbd+unix:///tgt?socket={t}/q.sock", "full", mode, "cancel",
            check=False, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "ready" in p.stdout.split("\n") and "completed ok" in p.stdout, p.stdout
    writes = int([line for line in p.stdout.split("\n") if line.startswith("writes ")][0].split()[1])
    assert writes > 50
    stop(srv)
    assert_clean(t / "T.qcow2")
    assert qemu_img("compare", "-F", "raw", t / "T.qcow2", t / "point.raw", check=False).returncode == 0
    # writes after the cancel stayed out of the copy
    assert qemu_img("compare", "-F", "raw", t / "T.qcow2", t / "model.raw", check=False).returncode == 1


def test_complete_is_refused(chain):
    t = chain
    qemu_img("create", "-q", "-f", "qcow2", t / "T.qcow2", "32M")
    srv = qsd(t, t / "T.qcow2", t / "q.sock")
    p = run(DC_LIVE, t, "mirror", t / "C.qcow2", f"nbd+unix:///tgt?socket={t}/q.sock", "full", "background",
            "complete", check=False, timeout=120)
    assert p.returncode != 0
    assert "cannot become the chain's active layer; cancel it once ready" in p.stderr, p.stderr
    stop(srv)


def test_tls_psk(chain):
    t = chain
    keys = t / "keys"
    keys.mkdir()
    (keys / "keys.psk").write_text("alice:" + os.urandom(32).hex() + "\n")
    os.chmod(keys / "keys.psk", 0o600)
    qemu_img("create", "-q", "-f", "qcow2", t / "T.qcow2", "32M")
    sock = t / "tls.sock"
    srv = serve(["qemu-nbd", "-f", "qcow2", "--socket", sock, "--object",
                 f"tls-creds-psk,id=tls0,endpoint=server,dir={keys}", "--tls-creds", "tls0", t / "T.qcow2"], sock)
    # without TLS the server refuses the client
    p = dc("job", "backup", t / "C.qcow2", f"nbd+unix:///?socket={sock}", "full", check=False)
    assert p.returncode != 0 and "cannot connect" in p.stderr, p.stderr
    # a wrong key does not get in either
    (t / "bad.psk").write_text("alice:" + os.urandom(32).hex() + "\n")
    p = dc("job", "backup", t / "C.qcow2", f"nbds+unix://alice@/?socket={sock}&tls-psk-file={t}/bad.psk", "full",
           check=False)
    assert p.returncode != 0, p.stdout
    p = dc("job", "backup", t / "C.qcow2", f"nbds+unix://alice@/?socket={sock}&tls-psk-file={keys}/keys.psk",
           "full")
    assert "completed ok" in p.stdout
    stop(srv)
    assert_clean(t / "T.qcow2")
    assert qemu_img("compare", t / "T.qcow2", t / "C.qcow2", check=False).returncode == 0


def test_a_uri_is_never_a_backing_file(chain):
    t = chain
    qemu_img("create", "-q", "-f", "qcow2", t / "T.qcow2", "32M")
    srv = qsd(t, t / "T.qcow2", t / "q.sock")
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", f"nbd+unix:///tgt?socket={t}/q.sock", "-F", "raw",
             t / "o.qcow2", "32M")
    p = dc("read", t / "o.qcow2", "0", "512", check=False)
    assert p.returncode != 0 and "protocol name" in p.stderr, p.stderr
    stop(srv)


def test_full_backup_overwrites_what_the_export_held(chain):
    """An export is never new: a full backup writes every unit (zeros where the export does not read as zeros),
    not only what the chain has allocated."""
    t = chain
    qemu_img("create", "-q", "-f", "qcow2", t / "T.qcow2", "32M")
    qemu_io(t / "T.qcow2", "write -P 0x55 0 32M")
    srv = qsd(t, t / "T.qcow2", t / "q.sock")
    p = dc("job", "backup", t / "C.qcow2", f"nbd+unix:///tgt?socket={t}/q.sock", "full")
    assert "completed ok" in p.stdout
    stop(srv)
    assert_clean(t / "T.qcow2")
    assert qemu_img("compare", t / "T.qcow2", t / "C.qcow2", check=False).returncode == 0


def test_a_server_that_stops_answering_fails_the_job(chain):
    """A server stopped mid-backup (SIGSTOP: the connection stays open, no reply comes): after the stall
    time the connection is shut down, the job fails with a clear error instead of hanging, and its
    thread and the program end."""
    from imgtest import DC_TOOL
    t = chain
    qemu_img("create", "-q", "-f", "qcow2", t / "T.qcow2", "32M")
    sock = t / "n.sock"
    srv = serve(["qemu-nbd", "-f", "qcow2", "--socket", sock, "-x", "tgt", t / "T.qcow2"], sock)
    job = subprocess.Popen([DC_TOOL, "job", "backup", str(t / "C.qcow2"), f"nbd+unix:///tgt?socket={sock}", "full"],
                           env={**os.environ, "DC_NBD_STALL_MS": "1500", "DC_JOB_SPEED": str(4 << 20)},
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1)
    srv.send_signal(signal.SIGSTOP)
    try:
        out, err = job.communicate(timeout=30)
    finally:
        srv.send_signal(signal.SIGCONT)
    assert job.returncode == 1, out + err
    assert "did not answer for 1 s" in out, out
