# SPDX-License-Identifier: LGPL-2.1-or-later
"""The man pages render without a single groff/man warning; the D-Bus API's
page, generated at build time from interfaces/*.xml, documents every member
of every interface there."""
import glob
import os
import re
import subprocess
import xml.etree.ElementTree as ET

import pytest

HERE = os.path.dirname(__file__)
MAN = os.path.join(HERE, "..", "man")
BUILD = os.environ.get("DISKCHAIN_BUILD", os.path.join(HERE, "..", "build"))
API = os.path.join(BUILD, "man", "org.diskchain.DiskChain1.5")


def render(path):
    p = subprocess.run(["man", "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z", path],
                       capture_output=True, text=True, env={**os.environ, "MANWIDTH": "80", "LC_ALL": "C.UTF-8"})
    assert p.returncode == 0 and p.stderr == "", p.stderr
    return p.stdout


@pytest.mark.parametrize("page", ["diskchaind.8", "diskchainctl.1", "diskchain.conf.5", "diskchain.plan.5"])
def test_man_page_has_no_warnings(page):
    assert len(render(os.path.join(MAN, page))) > 500


def test_api_man_page_documents_every_member():
    text = render(API)
    plain = subprocess.run(["man", "-E", "UTF-8", "-l", "-Tascii", API], capture_output=True, text=True,
                           env={**os.environ, "MANWIDTH": "200", "LC_ALL": "C.UTF-8"}).stdout
    plain = re.sub(r".\x08", "", plain)
    members = 0
    for xml in glob.glob(os.path.join(HERE, "..", "interfaces", "*.xml")):
        for iface in ET.parse(xml).getroot().iter("interface"):
            assert f"INTERFACE {iface.get('name')}" in plain, iface.get("name")
            for m in iface:
                if m.tag in ("method", "property", "signal"):
                    members += 1
                    assert re.search(rf"^\s+{m.get('name')}[( ]", plain, re.M), (iface.get("name"), m.get("name"))
    assert members > 100 and "(undocumented)" not in plain
    assert len(text) > 20000
