# SPDX-License-Identifier: LGPL-2.1-or-later
"""A private system bus with the real polkitd, and diskchaind activated on it.

Each test module gets its own dbus-daemon (a private bus exported through
DBUS_SYSTEM_BUS_ADDRESS), polkitd on that bus, and diskchaind started by bus
activation from the build tree.  The project's polkit action file and group
rule are installed where polkitd reads them for the duration of the session
and removed afterwards.  The daemon's log is printed only when a test fails.
"""
import grp
import re
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time

import pytest

SRC = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BUILD = os.environ.get("DISKCHAIN_BUILD", os.path.join(SRC, "build"))
DAEMON = os.path.join(BUILD, "daemon", "diskchaind")
CTL = os.path.join(BUILD, "tools", "diskchainctl")
TEST_USER = "dctest"
ACTIONS_DIR = "/usr/share/polkit-1/actions"
RULES_DIR = "/etc/polkit-1/rules.d"


def sh(*args, check=True, env=None, user=None, **kw):
    e = dict(os.environ)
    if env:
        e.update(env)
    cmd = [str(a) for a in args]
    if user:
        cmd = ["setpriv", "--reuid", user, "--regid", user, "--init-groups", "--"] + cmd
    p = subprocess.run(cmd, capture_output=True, text=True, env=e, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def ensure_user():
    try:
        grp.getgrnam("diskchain")
    except KeyError:
        sh("groupadd", "--system", "diskchain")
    try:
        pwd.getpwnam(TEST_USER)
    except KeyError:
        sh("useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", TEST_USER)
    set_group_member(False)


def set_group_member(member):
    if member:
        sh("gpasswd", "-a", TEST_USER, "diskchain")
    else:
        sh("gpasswd", "-d", TEST_USER, "diskchain", check=False)


def instrumented():
    """The daemon runs under ASan/UBSan or valgrind: its time and memory say nothing about ours."""
    if os.environ.get("DISKCHAIN_VALGRIND"):
        return True
    p = subprocess.run(["ldd", DAEMON], capture_output=True, text=True)
    return "libasan" in p.stdout or "libubsan" in p.stdout


def kill_daemon(bus):
    """kill -9 the daemon, if it runs, and wait until it is gone."""
    pid = bus.daemon_pid()
    if pid:
        os.kill(pid, signal.SIGKILL)
        for _ in range(100):
            if not os.path.exists(f"/proc/{pid}"):
                break
            time.sleep(0.02)


class Bus:
    def __init__(self, idle_timeout=30, polkit=True, config=None, prefix=""):
        self.dir = tempfile.mkdtemp(prefix="diskchain-test-")
        os.chmod(self.dir, 0o755)
        self.root = os.path.join(self.dir, "images")
        os.mkdir(self.root)
        os.chmod(self.root, 0o755)
        self.log = os.path.join(self.dir, "daemon.log")
        self.socket = os.path.join(self.dir, "bus")
        self.address = f"unix:path={self.socket}"
        services = os.path.join(self.dir, "services")
        os.mkdir(services)
        self.state = os.path.join(self.dir, "state")
        self.config = os.path.join(self.dir, "diskchain.conf")
        with open(self.config, "w") as f:
            # backup plans in the test's directory, never /etc's
            f.write(config if config and "[Plans]" in config else f"[Plans]\nDirectory={self.dir}/plans.d\n" + (config or ""))
        self.idle_timeout = idle_timeout
        wrap = ""
        if os.environ.get("DISKCHAIN_VALGRIND"):
            # -q: valgrind writes only errors, as "==PID== ..." lines in the log
            wrap = "valgrind -q --leak-check=full --errors-for-leak-kinds=definite --show-leak-kinds=definite "
        with open(os.path.join(services, "org.diskchain.DiskChain1.service"), "w") as f:
            f.write("[D-BUS Service]\nName=org.diskchain.DiskChain1\n"
                    f"Exec=/bin/sh -c '{prefix}exec {wrap}{DAEMON} --config {self.config} --root {self.root} "
                    f"--state-dir {self.state} --runtime-dir {self.dir}/run "
                    f"--idle-timeout {idle_timeout} --log-level debug >>{self.log} 2>&1'\nUser=root\n")
        conf = os.path.join(self.dir, "bus.conf")
        with open(conf, "w") as f:
            f.write(f"""<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>{self.address}</listen>
  <auth>EXTERNAL</auth>
  <servicedir>{services}</servicedir>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Properties"/>
  </policy>
  <policy user="root">
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Monitoring"/>
  </policy>
  <include>{SRC}/policy/org.diskchain.DiskChain1.conf</include>
  <includedir>/usr/share/dbus-1/system.d</includedir>
</busconfig>
""")
        self.env = {"DBUS_SYSTEM_BUS_ADDRESS": self.address}
        self.bus = subprocess.Popen(["dbus-daemon", "--config-file", conf, "--nofork", "--nopidfile"],
                                    env={**os.environ, **self.env}, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
        for _ in range(100):
            if os.path.exists(self.socket):
                break
            time.sleep(0.05)
        os.chmod(self.socket, 0o777)
        self.polkit = None
        if polkit:
            self.polkit = subprocess.Popen(["/usr/lib/polkit-1/polkitd", "--no-debug"],
                                           env={**os.environ, **self.env}, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL)
            for _ in range(100):
                if self.name_has_owner("org.freedesktop.PolicyKit1"):
                    break
                time.sleep(0.05)

    def name_has_owner(self, name):
        p = sh("busctl", "--system", "call", "org.freedesktop.DBus", "/org/freedesktop/DBus",
               "org.freedesktop.DBus", "NameHasOwner", "s", name, env=self.env, check=False)
        return p.stdout.strip() == "b true"

    def daemon_pid(self):
        p = sh("busctl", "--system", "call", "org.freedesktop.DBus", "/org/freedesktop/DBus",
               "org.freedesktop.DBus", "GetConnectionUnixProcessID", "s", "org.diskchain.DiskChain1",
               env=self.env, check=False)
        return int(p.stdout.split()[1]) if p.returncode == 0 else None

    def busctl(self, *args, check=True, user=None):
        return sh("busctl", "--system", *args, env=self.env, check=check, user=user)

    def call(self, path, iface, method, sig="", *args, check=True, user=None, timeout=120):
        a = ["--timeout", str(timeout), "--json=short", "call", "org.diskchain.DiskChain1", path,
             f"org.diskchain.DiskChain1.{iface}", method]
        if sig:
            a += [sig, *args]
        return self.busctl(*a, check=check, user=user)

    def gdbus(self, *args, check=True, user=None):
        return sh("gdbus", "call", "--system", "--dest", "org.diskchain.DiskChain1", *args,
                  env=self.env, check=check, user=user)

    def ctl(self, *args, check=True, user=None):
        return sh(CTL, *args, env=self.env, check=check, user=user)

    def stop(self):
        pid = self.daemon_pid()
        procs = [p for p in (self.polkit, self.bus) if p]
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
        if pid:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        # the daemon loses its bus and exits; make sure
        for _ in range(100):
            if not pid or not os.path.exists(f"/proc/{pid}"):
                break
            time.sleep(0.05)
        self.log_text = self.daemon_log()
        shutil.rmtree(self.dir, ignore_errors=True)
        return self.log_text

    def daemon_log(self):
        try:
            return open(self.log).read()
        except FileNotFoundError:
            return ""


@pytest.fixture(scope="session", autouse=True)
def polkit_files():
    """Install the action file and group rule where polkitd reads them, and
    put back whatever was there before (an installed diskchain, say)."""
    ensure_user()
    saved = []
    for src, dst in ((os.path.join(SRC, "policy", "org.diskchain.policy"), ACTIONS_DIR),
                     (os.path.join(SRC, "policy", "50-diskchain.rules"), RULES_DIR)):
        os.makedirs(dst, exist_ok=True)
        target = os.path.join(dst, os.path.basename(src))
        before = open(target, "rb").read() if os.path.exists(target) else None
        shutil.copy(src, target)
        saved.append((target, before))
    yield
    for target, before in saved:
        if before is None:
            os.unlink(target)
        else:
            open(target, "wb").write(before)
    set_group_member(False)


SANITIZER_MARKS = ("AddressSanitizer", "LeakSanitizer", "runtime error:", "==ERROR")


def finish(request, b):
    """Stop everything; print the daemon's log only if the test failed, and
    fail the test if a sanitizer complained in the daemon."""
    log = b.stop()
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        print("---- diskchaind log ----\n" + log)
    bad = [m for m in SANITIZER_MARKS if m in log] + re.findall(r"^==\d+== .*", log, re.M)
    assert not bad, "sanitizer report in the daemon's log:\n" + log


@pytest.fixture
def bus(request):
    b = Bus()
    yield b
    finish(request, b)


@pytest.fixture
def bus_without_polkit(request):
    b = Bus(polkit=False)
    yield b
    finish(request, b)


@pytest.fixture
def bus_idle(request):
    b = Bus(idle_timeout=2)
    yield b
    finish(request, b)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


def qemu_img(*args, check=True):
    return sh("qemu-img", *args, check=check)


def qemu_io(img, *cmds):
    a = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        a += ["-c", c]
    return sh(*a, img)
