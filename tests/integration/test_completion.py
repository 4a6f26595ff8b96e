# SPDX-License-Identifier: LGPL-2.1-or-later
"""Bash completion of diskchainctl (completion/diskchainctl.bash), run by bash
itself with bash-completion's helpers loaded, as an interactive shell would:
commands, options and their values, image paths in the roots (absolute and
relative to the first root), chains, job ids, export names and plan names,
from the daemon on the test's bus."""
import os
import subprocess

import pytest

from bustest import CTL, SRC, qemu_img
from test_bus import M, create, data, wait_gone

SCRIPT = os.path.join(SRC, "completion", "diskchainctl.bash")
BASH_COMPLETION = "/usr/share/bash-completion/bash_completion"


def complete(bus, line):
    """The words bash offers after LINE (completing its last word; a trailing space: a new word)."""
    words = line.split(" ")
    prog = f"""
        [ -r {BASH_COMPLETION} ] && . {BASH_COMPLETION}
        . {SCRIPT}
        COMP_WORDS=({' '.join(repr(w) for w in [CTL] + words[1:])})
        COMP_CWORD={len(words) - 1}
        COMP_LINE={line!r}
        COMP_POINT=${{#COMP_LINE}}
        _diskchainctl diskchainctl "${{COMP_WORDS[COMP_CWORD]}}" "${{COMP_WORDS[COMP_CWORD-1]}}"
        printf '%s\\n' "${{COMPREPLY[@]}}"
    """
    p = subprocess.run(["bash", "-c", prog], env={**os.environ, **bus.env}, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    return sorted(w for w in p.stdout.split("\n") if w)


@pytest.mark.skipif(not os.path.exists(BASH_COMPLETION), reason="bash-completion is not installed")
def test_bash_completion(bus):
    assert "backup" in complete(bus, "diskchainctl ba") and "bitmap" in complete(bus, "diskchainctl b")
    assert complete(bus, "diskchainctl --no") == ["--no-ask-password"]
    assert complete(bus, "diskchainctl backup x y --sync in") == ["incremental"]
    assert "--bitmap-mode" in complete(bus, "diskchainctl backup x y --bi")
    assert complete(bus, "diskchainctl mirror x y --copy-mode w") == ["write-blocking"]
    assert complete(bus, "diskchainctl job p") == ["pause"]
    # images and chains, from the daemon
    create(bus, "base.qcow2", 1 << 20)
    create(bus, "vm.qcow2", 1 << 20, "backing", "s", "base.qcow2")
    got = complete(bus, "diskchainctl info ")
    assert {"base.qcow2", "vm.qcow2", os.path.join(bus.root, "vm.qcow2")} <= set(got), got
    assert complete(bus, "diskchainctl info vm") == ["vm.qcow2"]
    assert complete(bus, "diskchainctl backup v") == ["vm.qcow2"]  # chains: base is no active layer
    assert complete(bus, "diskchainctl stream b") == []
    assert complete(bus, "diskchainctl stream vm.qcow2 --base b") == ["base.qcow2"]
    # a job id
    big = os.path.join(bus.root, "big.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", big, str(64 << 20))
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 1 0 64M", big], check=True, capture_output=True)
    chain = data(bus.call(M, "Manager", "GetChain", "s", "big.qcow2"))[0]
    job = data(bus.call(chain, "Chain", "Backup", "sa{sv}", "copy.qcow2", "2", "speed", "t", str(1 << 20),
                        "job-id", "s", "slowjob"))[0]
    assert complete(bus, "diskchainctl job pause s") == ["slowjob"]
    assert complete(bus, "diskchainctl wait ") == ["slowjob"]
    bus.call(job, "Job", "Cancel", "b", "false")
    wait_gone(bus, job)
    # a plan name
    subprocess.run([CTL, "plan", "create", "nightly", "--chain", "vm.qcow2", "--destination", "backups"],
                   env={**os.environ, **bus.env}, check=True, capture_output=True)
    assert complete(bus, "diskchainctl plan run n") == ["nightly"]
    assert complete(bus, "diskchainctl plan create x --level d") == ["differential"]
