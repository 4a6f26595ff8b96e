#!/bin/bash
# Install the Debian packages diskchain builds, runs and is tested with.
# Each one and why: see README.md, "Dependencies".
set -euo pipefail
pkgs=(meson ninja-build pkg-config gcc
      libsystemd-dev libglib2.0-dev zlib1g-dev libzstd-dev liburing-dev libgnutls28-dev libdbus-1-dev libpolkit-gobject-1-dev
      dbus polkitd
      qemu-utils libnbd-bin libnbd-dev python3-libnbd nbdkit qemu-system-x86 gnutls-bin valgrind
      python3-pytest python3-gi libglib2.0-bin man-db groff-base util-linux passwd strace
      systemd bash-completion
      cockpit-ws cockpit-bridge chromium nodejs)
missing=()
for p in "${pkgs[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# Debian's nodejs comes without npm (NodeSource's has it)
command -v npm >/dev/null || apt-get install -y -qq --no-install-recommends npm
# The Cockpit page's npm packages, as package-lock.json pins them: PatternFly's
# stylesheet (installed with the page) and playwright-core (its browser test)
(cd "$(dirname "$0")/../cockpit" && npm ci --no-audit --no-fund --loglevel=error)
