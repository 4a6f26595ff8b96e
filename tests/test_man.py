# SPDX-License-Identifier: LGPL-2.1-or-later
"""The man pages render without a single groff/man warning."""
import os
import subprocess

import pytest

MAN = os.path.join(os.path.dirname(__file__), "..", "man")


@pytest.mark.parametrize("page", ["diskchaind.8", "diskchainctl.1", "diskchain.conf.5"])
def test_man_page_has_no_warnings(page):
    p = subprocess.run(["man", "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z", os.path.join(MAN, page)],
                       capture_output=True, text=True, env={**os.environ, "MANWIDTH": "80", "LC_ALL": "C.UTF-8"})
    assert p.returncode == 0 and p.stderr == "", p.stderr
    assert len(p.stdout) > 500
