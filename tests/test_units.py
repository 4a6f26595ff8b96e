# SPDX-License-Identifier: LGPL-2.1-or-later
"""The systemd unit verifies and stays hardened; the activation file points at it."""
import os
import re
import shutil
import subprocess

import pytest

SRC = os.path.join(os.path.dirname(__file__), "..")
BUILD = os.environ.get("DISKCHAIN_BUILD", os.path.join(SRC, "build"))


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
    # verify looks up the unit's Documentation= pages with man(1): let it
    # find ours in the source tree, installed or not
    man = tmp_path / "man"
    for page in os.listdir(os.path.join(SRC, "man")):
        if re.search(r"\.[1-8]$", page):
            d = man / f"man{page[-1]}"
            d.mkdir(parents=True, exist_ok=True)
            (d / page).symlink_to(os.path.abspath(os.path.join(SRC, "man", page)))
    env = {**os.environ, "MANPATH": f"{man}:"}
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
