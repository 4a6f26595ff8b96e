# SPDX-License-Identifier: LGPL-2.1-or-later
"""The systemd unit verifies and stays hardened; the activation file points at it."""
import os
import re
import shutil
import subprocess

import pytest

SRC = os.path.join(os.path.dirname(__file__), "..")
BUILD = os.environ.get("DISKCHAIN_BUILD", os.path.join(SRC, "build"))


def man_path(tmp_path):
    """verify looks up the units' Documentation= pages with man(1): a MANPATH that finds ours in the
    source tree, installed or not."""
    man = tmp_path / "man"
    for page in os.listdir(os.path.join(SRC, "man")):
        if re.search(r"\.[1-8]$", page):
            d = man / f"man{page[-1]}"
            d.mkdir(parents=True, exist_ok=True)
            (d / page).symlink_to(os.path.abspath(os.path.join(SRC, "man", page)))
    return f"{man}:"


@pytest.fixture
def unit(tmp_path):
    text = open(os.path.join(BUILD, "units", "diskchaind.service")).read()
    # point ExecStart at the binary we just built, so verify can find it
    text = re.sub(r"^ExecStart=.*$", f"ExecStart={os.path.join(BUILD, 'daemon', 'diskchaind')}", text, flags=re.M)
    path = tmp_path / "diskchaind.service"
    path.write_text(text)
    return path


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed")
def test_unit_verifies_and_is_hardened(unit, tmp_path):
    env = {**os.environ, "MANPATH": man_path(tmp_path)}
    p = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, env=env)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    p = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--threshold=30", str(unit)],
                       capture_output=True, text=True)
    m = re.search(r"Overall exposure level for diskchaind.service: ([0-9.]+)", p.stdout)
    assert m and float(m.group(1)) <= 3.0, p.stdout[-500:]


def test_activation_file_names_the_unit():
    text = open(os.path.join(BUILD, "units", "org.diskchain.DiskChain1.service")).read()
    assert "Name=org.diskchain.DiskChain1" in text
    assert "SystemdService=diskchaind.service" in text
    exe = re.search(r"^Exec=(.*)$", text, re.M).group(1)
    assert exe.endswith("/diskchaind")
    unit = open(os.path.join(BUILD, "units", "diskchaind.service")).read()
    assert "BusName=org.diskchain.DiskChain1" in unit and "Type=dbus" in unit
    assert f"ExecStart={exe}" in unit


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed")
def test_backup_plan_units(tmp_path):
    """The generator gives each plan its timer with the plan's schedule (and nothing for a plan it cannot
    read); the timer and the service verify; the schedules pass systemd-analyze calendar; the backup
    service is hardened as the daemon is, measured the same way."""
    plans = tmp_path / "plans.d"
    plans.mkdir()
    (plans / "vm.conf").write_text("[Plan]\nChain=/x/vm.qcow2\nDestination=/x/b\nSchedule=*-*-* 01:30:00\n"
                                   "RandomizedDelaySec=900\n")
    (plans / "db.conf").write_text("[Plan]\nChain=/x/db.qcow2\nDestination=/x/b\n")  # the default: daily
    (plans / "bad.conf").write_text("[Plan\nSchedule=daily\n")
    (plans / "-no.conf").write_text("[Plan]\n")
    out = tmp_path / "gen"
    out.mkdir()
    p = subprocess.run([os.path.join(BUILD, "tools", "diskchain-plan-generator"), str(out), str(out), str(out)],
                       capture_output=True, text=True, env={**os.environ, "DISKCHAIN_PLANS_DIR": str(plans)})
    assert p.returncode == 1 and "bad.conf" in p.stderr and "-no.conf: no valid plan name" in p.stderr, p.stderr
    assert sorted(os.listdir(out / "timers.target.wants")) == ["diskchain-backup@db.timer",
                                                               "diskchain-backup@vm.timer"]
    drop = (out / "diskchain-backup@vm.timer.d" / "50-plan.conf").read_text()
    assert "OnCalendar=\nOnCalendar=*-*-* 01:30:00\nRandomizedDelaySec=900\n" in drop, drop
    assert "OnCalendar=daily" in (out / "diskchain-backup@db.timer.d" / "50-plan.conf").read_text()
    units = tmp_path / "units"
    units.mkdir()
    svc = open(os.path.join(BUILD, "units", "diskchain-backup@.service")).read()
    svc = re.sub(r"^ExecStart=\S+", f"ExecStart={os.path.join(BUILD, 'tools', 'diskchainctl')}", svc, flags=re.M)
    (units / "diskchain-backup@.service").write_text(svc)
    shutil.copy(os.path.join(BUILD, "units", "diskchain-backup@.timer"), units)
    shutil.copytree(out / "diskchain-backup@vm.timer.d", units / "diskchain-backup@vm.timer.d")
    env = {**os.environ, "MANPATH": man_path(tmp_path), "SYSTEMD_UNIT_PATH": f"{units}:"}
    p = subprocess.run(["systemd-analyze", "verify", "diskchain-backup@vm.timer", "diskchain-backup@vm.service"],
                       capture_output=True, text=True, env=env, cwd=units)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    for spec in ["*-*-* 01:30:00", "daily"]:
        p = subprocess.run(["systemd-analyze", "calendar", spec], capture_output=True, text=True)
        assert p.returncode == 0 and "Next elapse" in p.stdout, p.stdout
    p = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--threshold=30",
                        str(units / "diskchain-backup@.service")], capture_output=True, text=True)
    m = re.search(r"Overall exposure level for diskchain-backup@\S*: ([0-9.]+)", p.stdout)
    assert m and float(m.group(1)) <= 2.0, p.stdout[-500:]
