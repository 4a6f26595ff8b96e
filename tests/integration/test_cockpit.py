# SPDX-License-Identifier: LGPL-2.1-or-later
"""The Cockpit page in a real browser: the private bus with the real polkitd
and the daemon, the page as `meson install` lays it out, cockpit-ws with a
local session of cockpit-bridge on a loopback port (as root, and as the
unprivileged test user), and headless Chromium driven by
tests/cockpit/browser.mjs.  It loads the page, sees the seed chain and its
allocation map, backs up from the dialog and watches the progress bar reach
completion, pauses and resumes a job, completes a mirror, exports the chain,
creates and runs a plan, and sees the refusal shown to an unprivileged user;
any JavaScript error fails it.  qemu-img then judges what the page made.
Screenshots of each view go to BUILD/test-artifacts/cockpit/ (the README
shows copies of the main ones, in docs/)."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest

from bustest import BUILD, SRC, TEST_USER, qemu_img
from test_bus import make_seed_chain

COCKPIT_WS = "/usr/lib/cockpit/cockpit-ws"
SHOTS = os.path.join(BUILD, "test-artifacts", "cockpit")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def package():
    """The page as meson installs it (install tag cockpit), in a data dir of its own."""
    dest = tempfile.mkdtemp(prefix="diskchain-cockpit-")
    os.chmod(dest, 0o755)
    subprocess.run(["meson", "install", "-C", BUILD, "--destdir", dest, "--tags", "cockpit", "--quiet"], check=True,
                   capture_output=True)
    found = [r for r, _, files in os.walk(dest) if "manifest.json" in files and r.endswith("/cockpit/diskchain")]
    assert len(found) == 1, found
    for r, dirs, files in os.walk(dest):
        for n in dirs:
            os.chmod(os.path.join(r, n), 0o755)
    yield os.path.dirname(os.path.dirname(found[0]))  # .../share
    shutil.rmtree(dest, ignore_errors=True)


def cockpit_ws(bus, share, user=None):
    """cockpit-ws on a loopback port with a local cockpit-bridge session (as USER), on the test's bus."""
    port = free_port()
    home = tempfile.mkdtemp(prefix="diskchain-cockpit-home-")
    cmd = [COCKPIT_WS, "--local-session=cockpit-bridge", "--port", str(port), "--address", "127.0.0.1"]
    if user:
        shutil.chown(home, user, user)
        cmd = ["setpriv", "--reuid", user, "--regid", user, "--init-groups", "--"] + cmd
    env = {**os.environ, **bus.env, "XDG_DATA_DIRS": f"{share}:/usr/share", "HOME": home,
           "XDG_RUNTIME_DIR": home, "LANG": "C.UTF-8"}
    # a process group of its own: the bridge starts a session bus, which must go with it
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    for _ in range(100):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        assert p.poll() is None, p.stdout.read()
        time.sleep(0.05)
    p.home = home
    return p, f"http://127.0.0.1:{port}/cockpit/@localhost/diskchain/index.html"


def browse(scenario, url):
    os.makedirs(SHOTS, exist_ok=True)
    p = subprocess.run(["node", os.path.join(SRC, "tests", "cockpit", "browser.mjs"), scenario, url, SHOTS],
                       capture_output=True, text=True, timeout=600)
    lines = p.stdout.strip().splitlines()
    summary = json.loads(lines[-1]) if lines else {}
    assert p.returncode == 0 and not summary.get("problems"), "\n".join(
        [f"exit {p.returncode}", *summary.get("problems", []), p.stderr[-3000:]])
    return summary


def stop(p):
    """cockpit-ws and everything it started (the bridge, its session bus) are gone."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(p.pid, 0)
            except ProcessLookupError:
                break
            p.poll()
            time.sleep(0.05)
    p.wait()
    shutil.rmtree(p.home, ignore_errors=True)


def calls_to_daemon(bus):
    """busctl monitor of every method call to the daemon; stop() returns their (realtime µs, member)."""
    p = subprocess.Popen(["busctl", "--system", "monitor", "--json=short", "--match",
                          "type='method_call',destination='org.diskchain.DiskChain1'"],
                         env={**os.environ, **bus.env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert "Monitoring bus message stream" in p.stderr.readline()

    def stop_monitor():
        p.terminate()
        out = p.communicate()[0]
        return [(m.get("timestamp-realtime", 0), m.get("member")) for m in map(json.loads, out.splitlines())]
    return stop_monitor


def page_session(bus, package, scenario, user=None):
    """SCENARIO of browser.mjs through cockpit-ws (as USER): its summary and the calls the daemon got."""
    ws, url = cockpit_ws(bus, package, user=user)
    monitor = calls_to_daemon(bus)
    try:
        s = browse(scenario, url)
    finally:
        calls = monitor()
        stop(ws)
    return s, calls


def test_cockpit_page_as_admin(bus, package):
    make_seed_chain(bus)
    s, calls = page_session(bus, package, "admin")
    # no polling: while the page sat still, not one call reached the daemon (and some did before and after)
    idle = [c for c in calls if s["idleFrom"] * 1000 <= c[0] <= s["idleTo"] * 1000]
    assert not idle, idle
    assert any(c[0] < s["idleFrom"] * 1000 for c in calls) and any(c[0] > s["idleTo"] * 1000 for c in calls)
    assert s["layers"] == ["A.qcow2", "B.qcow2", "C.qcow2", "D.qcow2"]
    assert s["depths"] == [0, 1, 2, 3], s  # every layer of the seed holds data the map shows
    # the progress bar moved through the middle and reached the end
    assert any(0 < x < 100 for x in s["progress"]) and "completed" in s["backupNotice"], s
    assert s["paused"] and s["resumed"]
    assert s["mirrored"] == ["D-mirror.qcow2"], s
    assert s["exportUri"].startswith("nbd+unix:///vm?socket="), s
    assert s["points"] == 1
    assert s["committed"] and s["imageLifecycle"] and "clean" in s["check"], s
    r = bus.root
    assert s["bitmapAdded"] and s["incremental"] and s["planEdited"], s
    assert s["writeBlocking"] and s["disabledShown"] and s["bitmapRemoved"], s
    assert "Schedule=*-*-* 02:15:00" in open(os.path.join(bus.dir, "plans.d", "nightly.conf")).read()
    info = json.loads(qemu_img("info", "--output=json", os.path.join(r, "D-mirror.qcow2")).stdout)
    assert {"nightly", "diskchain-plan-nightly"} == {b["name"] for b in info["format-specific"]["data"]["bitmaps"]}
    qemu_img("check", os.path.join(r, "D-incr.qcow2"))
    out = qemu_img("check", os.path.join(r, "D-backup.qcow2")).stdout  # the dialog's compress reached the job
    assert float(re.search(r"([\d.]+)% compressed clusters", out).group(1)) > 50, out
    for img in ("D-backup.qcow2", "D-mirror.qcow2"):
        qemu_img("check", os.path.join(r, img))
        p = qemu_img("compare", "-F", "raw", os.path.join(r, img), os.path.join(bus.dir, "D.ref"), check=False)
        assert p.returncode == 0, (img, p.stdout)
    # the commit left D's content as it was, on [A] <-- [B] <-- [D]
    qemu_img("check", os.path.join(r, "B.qcow2"))
    assert qemu_img("compare", "-F", "raw", os.path.join(r, "D.qcow2"), os.path.join(bus.dir, "D.ref"),
                    check=False).returncode == 0
    assert not os.path.exists(os.path.join(r, "new.qcow2"))
    assert not os.path.exists(os.path.join(r, "D-slow.qcow2")) or qemu_img(
        "check", os.path.join(r, "D-slow.qcow2"), check=False).returncode == 0


def test_cockpit_page_refusal_for_an_unprivileged_user(bus, package):
    make_seed_chain(bus)
    s, _ = page_session(bus, package, "limited", user=TEST_USER)
    assert "Not authorized" in s["refusal"] and "org.diskchain" in s["refusal"], s
    assert not os.path.exists(os.path.join(bus.root, "E.qcow2"))


def test_cockpit_page_with_thousands_of_images(bus, package):
    """Two thousand images in the root (a chain each): the page draws a page of them and asks the
    allocation map of those only, shows more on request, and its filter finds one while keeping focus."""
    for i in range(2000):
        with open(os.path.join(bus.root, f"disk-{i:04d}.raw"), "wb") as f:
            f.truncate(1 << 20)
    subprocess.run(["busctl", "--system", "call", "org.diskchain.DiskChain1", "/org/diskchain/DiskChain1",
                    "org.diskchain.DiskChain1.Manager", "ListImages"], env={**os.environ, **bus.env}, check=True,
                   capture_output=True)
    s, calls = page_session(bus, package, "many")
    assert s["drawn"] == 25 and "(1975 not shown)" in s["more"], s
    assert s["drawnAfterMore"] == 50, s
    assert s["filtered"].endswith("/disk-1777.raw") and s["focusKept"], s
    maps = [c for c in calls if c[1] == "Map"]
    # the drawn cards' maps (51 cards; a card asks again when its layer's properties change as the
    # daemon reads the files in), not two thousand
    assert 51 <= len(maps) <= 150, len(maps)


def test_cockpit_page_when_the_daemon_leaves_idle(bus_idle, package):
    """diskchaind exits when idle (here after 2 s): the open page starts it again at once, keeps showing
    the chain meanwhile, and its actions work on the new daemon."""
    bus = bus_idle
    make_seed_chain(bus)
    s, _ = page_session(bus, package, "idle")
    assert s["reconnects"] >= 1 and s["layers"] == ["A.qcow2", "B.qcow2", "C.qcow2", "D.qcow2"] and s["snapshot"], s
    assert "idle, exiting" in open(bus.log).read()
