# SPDX-License-Identifier: LGPL-2.1-or-later
"""A user sees speed honestly: a Job's Rate and ExpectedEndTime are measured
from its progress and agree with each other and with StartTime, and
diskchainctl's progress line and summary show those same numbers, in human
units."""
import os
import pty
import re
import subprocess
import time

from bustest import CTL, instrumented, qemu_io
from test_bus import M, create, data, prop, wait_gone, wait_status

MIB = 1 << 20
SPEED = 2 * MIB


def near_speed(rate):
    """A rate measured under the speed limit: never above it, and near it unless valgrind or ASan slow the daemon."""
    return (instrumented() or SPEED / 2 <= rate) and rate <= 2 * SPEED


SIZE = 8 * MIB


def now_us():
    return int(time.time() * 1e6)


def source(bus, name="src.qcow2", size=SIZE):
    """An image whose every byte is data, so a backup copies all of it under the speed limit."""
    create(bus, name, size)
    qemu_io(os.path.join(bus.root, name), f"write -P 0x5a 0 {size}")
    time.sleep(0.3)  # let the daemon see qemu-io's writes
    return data(bus.call(M, "Manager", "GetChain", "s", name))[0]


def backup(bus, chain, target, *opts):
    return data(bus.call(chain, "Chain", "Backup", "sa{sv}", target, str(len(opts) // 3), *opts))[0]


def numbers(bus, job):
    return {n: prop(bus, job, "Job", n) for n in ("CurrentProgress", "TotalProgress", "Rate", "ExpectedEndTime",
                                                  "StartTime", "Status")}


def human(v):
    """diskchainctl's (and qemu-img's) sizes: three significant digits, binary units."""
    units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
    d, i = float(v), 0
    while d >= 999.5 and i < len(units) - 1:
        d /= 1024
        i += 1
    return f"{d:.3g} {units[i]}"


def assert_running_numbers(n, t):
    """Rate near the speed limit; ExpectedEndTime is when the rest takes at that rate, and plausible."""
    assert near_speed(n["Rate"]), n
    left = (n["TotalProgress"] - n["CurrentProgress"]) / n["Rate"]
    assert n["ExpectedEndTime"] > t, n
    # measured on the last 250 ms tick, read since: within a second of the rest at that rate
    assert abs((n["ExpectedEndTime"] - t) / 1e6 - left) < 1.0, (n, left)
    # and the whole job, start to expected end, takes about what the limit allows
    assert 0.5 * SIZE / SPEED <= (n["ExpectedEndTime"] - n["StartTime"]) / 1e6 <= 2 * SIZE / SPEED, n


def assert_final_numbers(n):
    """An ended job: Rate is its average, ExpectedEndTime when it ended."""
    assert n["CurrentProgress"] == n["TotalProgress"] > 0, n
    elapsed = (n["ExpectedEndTime"] - n["StartTime"]) / 1e6
    assert 0 < elapsed and n["ExpectedEndTime"] <= now_us(), n
    assert abs(n["Rate"] - n["CurrentProgress"] / elapsed) <= 0.01 * n["Rate"] + 1, (n, elapsed)


def test_rate_and_expected_end_of_a_rate_limited_job(bus):
    chain = source(bus)
    job = backup(bus, chain, "bk.qcow2", "speed", "t", str(SPEED), "max-chunk", "t", "65536",
                 "auto-dismiss", "b", "false")
    time.sleep(0.6)  # past the first 250 ms tick: measured already, from the start
    t = now_us()
    n = numbers(bus, job)
    assert n["Status"] == "running" and n["Rate"] > 0 and n["ExpectedEndTime"] > 0, n
    assert n["StartTime"] <= t
    time.sleep(1.0)
    t = now_us()
    assert_running_numbers(numbers(bus, job), t)

    # paused: nothing moves, so the rate is 0 and the end unknown; measured anew after
    bus.call(job, "Job", "Pause")
    wait_status(bus, job, "paused")
    time.sleep(0.4)
    n = numbers(bus, job)
    assert n["Rate"] == 0 and n["ExpectedEndTime"] == 0, n
    time.sleep(0.6)
    bus.call(job, "Job", "Resume")
    time.sleep(0.8)
    t = now_us()
    n = numbers(bus, job)
    assert n["Status"] == "running" and near_speed(n["Rate"]), n

    wait_status(bus, job, "concluded")
    n = numbers(bus, job)
    assert_final_numbers(n)
    # the average counts the pause: a second of it in about five
    assert 0.5 * SPEED <= n["Rate"] <= 1.1 * SPEED, n
    bus.call(job, "Job", "Dismiss")
    wait_gone(bus, job)


def test_a_quick_job_has_its_average(bus):
    """A job done before the first measurement still says how fast it was (it showed 0.0 MiB/s)."""
    chain = source(bus, size=4 * MIB)
    job = backup(bus, chain, "quick.qcow2", "auto-dismiss", "b", "false")
    wait_status(bus, job, "concluded")
    n = numbers(bus, job)
    assert_final_numbers(n)
    assert n["Rate"] > 0


def run_on_tty(bus, *args):
    """diskchainctl with its stderr on a terminal, as a user runs it: (stdout, what the terminal got)."""
    master, slave = pty.openpty()
    p = subprocess.Popen([CTL, *args], env={**os.environ, **bus.env}, stdout=subprocess.PIPE, stderr=slave,
                         text=True)
    os.close(slave)
    tty = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the other side is closed
            break
        if not chunk:
            break
        tty += chunk
    os.close(master)
    out = p.stdout.read()
    assert p.wait() == 0, (out, tty)
    return out, tty.decode()


SIZE_RE = r"[0-9.]+ (?:B|KiB|MiB|GiB)"
LEFT_RE = r"(?:[0-9]\.[0-9]s|[0-9]+s|[0-9]+m [0-9]{2}s)"


def seconds(left):
    m = re.fullmatch(r"(?:(\d+)m )?([0-9.]+)s", left)
    return int(m.group(1) or 0) * 60 + float(m.group(2))


def test_diskchainctl_progress_line_and_summary(bus):
    source(bus)
    out, tty = run_on_tty(bus, "backup", "src.qcow2", "bar.qcow2", "--speed", str(SPEED), "--max-chunk", "64K",
                          "--job-id", "bar", "--no-auto-dismiss")
    lines = [l.strip() for l in tty.split("\r") if l.strip()]
    # every line is status, bar, percentage, rate and time left, "--" for what is not known yet
    for l in lines:
        assert re.fullmatch(r"[a-z]+ +\[[#.]{30}\] +\d+% +(?:" + SIZE_RE + r"/s|--) +(?:" + LEFT_RE + r"|--) left",
                            l), (l, tty)
    shown = [re.fullmatch(r"running +\[[#.]{30}\] +(\d+)% +(" + SIZE_RE + r")/s +(" + LEFT_RE + r") left", l)
             for l in lines]
    shown = [m for m in shown if m]
    assert len(shown) >= 4, tty  # about every half second for four seconds
    for m in shown:
        rate = float(m.group(2).split()[0]) * {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20}[m.group(2).split()[1]]
        assert near_speed(rate), m.group(0)
        # the time left is the rest at the rate shown (rounded, and measured up to a tick before)
        rest = SIZE * (100 - int(m.group(1))) / 100 / rate
        assert abs(seconds(m.group(3)) - rest) <= 0.1 * rest + 1.0, m.group(0)
    assert "?" not in tty and "0.0 MiB/s" not in tty, tty
    # the bar moves and the time left counts down
    assert int(shown[0].group(1)) < int(shown[-1].group(1)), tty
    assert seconds(shown[0].group(3)) > seconds(shown[-1].group(3)), tty

    # the summary is the ended job's own numbers: progress, StartTime to ExpectedEndTime, Rate
    job = data(bus.call(M, "Manager", "GetJob", "s", "bar"))[0]
    n = numbers(bus, job)
    assert_final_numbers(n)
    m = re.fullmatch(r"bar: completed, (" + SIZE_RE + r") in (" + LEFT_RE + r") \((" + SIZE_RE + r")/s\)\n", out)
    assert m, out
    assert m.group(1) == human(n["CurrentProgress"]) == "8 MiB"
    assert m.group(3) == human(n["Rate"])
    elapsed = (n["ExpectedEndTime"] - n["StartTime"]) / 1e6
    assert m.group(2) == f"{elapsed:.1f}s" and 3 <= elapsed <= 8, (out, elapsed)

    # job info shows the same, in the same words
    info = subprocess.run([CTL, "job", "info", "bar"], env={**os.environ, **bus.env}, capture_output=True,
                          text=True, check=True).stdout
    assert "progress: 8 MiB of 8 MiB (100%)" in info and f"speed limit: {human(SPEED)}/s" in info, info
    assert f"done: {m.group(1)} in {m.group(2)} ({m.group(3)}/s)" in info, info
    bus.call(job, "Job", "Dismiss")


def test_diskchainctl_job_info_while_running(bus):
    source(bus)
    bus.ctl("backup", "src.qcow2", "slow.qcow2", "--speed", str(SPEED), "--max-chunk", "64K", "--job-id", "slow",
            "--no-wait")
    time.sleep(1.0)
    info = bus.ctl("job", "info", "slow").stdout
    m = re.search(r"^rate: (" + SIZE_RE + r")/s\ntime left: (" + LEFT_RE + r")$", info, re.M)
    assert m, info
    bus.ctl("job", "pause", "slow")
    job = data(bus.call(M, "Manager", "GetJob", "s", "slow"))[0]
    wait_status(bus, job, "paused")
    time.sleep(0.4)
    info = bus.ctl("job", "info", "slow").stdout
    assert "rate: --\ntime left: --\n" in info, info
    bus.ctl("job", "cancel", "slow")
    wait_gone(bus, job)
