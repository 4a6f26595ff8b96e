# SPDX-License-Identifier: LGPL-2.1-or-later
"""NBD servers the tests start (qemu-nbd, qemu-storage-daemon, nbdkit) and the
fixture that makes sure each is gone after its test, whatever happened.  A
test module imports `servers` (an autouse fixture) with the helpers."""
import os
import signal
import socket
import struct
import subprocess
import time

import pytest

SERVERS = []


@pytest.fixture(autouse=True)
def servers():
    """Every NBD server a test starts is gone after it."""
    yield
    while SERVERS:
        p = SERVERS.pop()
        if p.poll() is None:
            p.kill()
        p.wait()


def start(args):
    p = subprocess.Popen([str(a) for a in args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    SERVERS.append(p)
    return p


def wait_socket(path, proc):
    for _ in range(100):
        if os.path.exists(path):
            return
        assert proc.poll() is None, f"the NBD server exited: {proc.stderr.read()}"
        time.sleep(0.05)
    raise AssertionError(f"{path} never appeared")


def wait_port(port, proc):
    for _ in range(100):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        assert proc.poll() is None, f"the NBD server exited: {proc.stderr.read()}"
        time.sleep(0.05)
    raise AssertionError(f"port {port} never opened")


def serve(args, sock):
    """Start ARGS and wait for its unix socket SOCK."""
    p = start(args)
    wait_socket(sock, p)
    return p


def stop(p):
    p.send_signal(signal.SIGTERM)
    p.wait(10)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flood_reads(sk, length):
    """As a client that never reads its replies: READ requests of LENGTH bytes on the connected,
    negotiated socket SK (simple replies), until the server has taken none for a second, that is,
    until its replies fill the socket.  Returns how many were sent."""
    sk.setblocking(False)
    sent, blocked = 0, None
    while True:
        try:
            sk.send(struct.pack(">IHHQQI", 0x25609513, 0, 0, sent, 0, length))
            sent += 1
            blocked = None
        except BlockingIOError:
            blocked = blocked or time.monotonic()
            if time.monotonic() - blocked > 1:
                return sent
            time.sleep(0.01)
