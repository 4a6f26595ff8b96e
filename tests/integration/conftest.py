# SPDX-License-Identifier: LGPL-2.1-or-later
import os
import sys

# the helpers the library's tests share with these (tlsfiles, nbdservers)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))

from bustest import bus, bus_idle, bus_without_polkit, polkit_files, pytest_runtest_makereport  # noqa: F401,E402
