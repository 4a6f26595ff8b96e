# SPDX-License-Identifier: LGPL-2.1-or-later
from bustest import bus, bus_idle, bus_without_polkit, polkit_files, pytest_runtest_makereport  # noqa: F401  (fixtures, hook)
