# SPDX-License-Identifier: LGPL-2.1-or-later
from imgtest import tmp  # noqa: F401  (fixture)
