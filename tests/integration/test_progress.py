# SPDX-License-Identifier: LGPL-2.1-or-later
"""A user sees speed honestly: a Job's Rate and ExpectedEndTime are measured
from its progress and agree with each other and with StartTime."""
import os
import time

from bustest import qemu_io
from test_bus import M, create, data, prop, wait_gone, wait_status

MIB = 1 << 20
SPEED = 2 * MIB
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


def assert_running_numbers(n, t):
    """Rate near the speed limit; ExpectedEndTime is when the rest takes at that rate, and plausible."""
    assert SPEED // 2 <= n["Rate"] <= 2 * SPEED, n
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
    assert n["Status"] == "running" and SPEED // 2 <= n["Rate"] <= 2 * SPEED, n

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

