#!/bin/bash
# Install dependencies, build (warnings are errors), and run the whole suite:
# the fuzz corpus replay, the library tests against qemu-img, and the
# integration tests on a private system bus with the real polkitd.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
builddir=${DISKCHAIN_BUILD:-build}
if [ -d "$builddir" ]; then
        meson setup --reconfigure "$builddir" --werror >/dev/null
else
        meson setup "$builddir" --werror >/dev/null
fi
meson compile -C "$builddir"
meson test -C "$builddir" --print-errorlogs
export DISKCHAIN_BUILD=$(cd "$builddir" && pwd)
exec /usr/bin/python3 -m pytest -p no:cacheprovider -q -rf tests "$@"
