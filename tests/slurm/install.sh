#!/usr/bin/env bash
# Idempotent install of a minimal real Slurm (controller + compute daemon +
# client commands) and MUNGE from the distribution packages (Debian/Ubuntu).
#
#   sudo tests/slurm/install.sh        # or as root
#
# Installs: munge slurmctld slurmd slurm-client (pulls slurm-wlm-basic-plugins), iproute2, util-linux.
# The packages' own init scripts/systemd units are NOT used by the test
# scripts; start-cluster.sh runs private daemons under a temp dir.
set -euo pipefail

# iproute2 (ip) and util-linux (nsenter): the multi-node cluster (SLURM_TEST_NODES)
PKGS=(munge slurmctld slurmd slurm-client iproute2 util-linux)

missing=()
for p in "${PKGS[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$p")
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    echo "slurm/munge already installed: $(slurmd -V 2>/dev/null || true)"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

export DEBIAN_FRONTEND=noninteractive
# policy-rc.d: keep the packages' maintainer scripts from starting the system
# daemons (munged on /run/munge, slurmctld/slurmd on the default ports) on
# hosts where that would otherwise happen (e.g. CI VMs with systemd). Only
# created if absent, and removed again afterwards.
created_policy=0
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod 755 /usr/sbin/policy-rc.d
    created_policy=1
fi
cleanup() {
    if [ "$created_policy" -eq 1 ]; then $SUDO rm -f /usr/sbin/policy-rc.d; fi
}
trap cleanup EXIT

$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"

# On systemd hosts the units may still have been enabled/started; stop them so
# they do not hold the default ports or the default munge socket.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    $SUDO systemctl stop slurmctld slurmd munge >/dev/null 2>&1 || true
fi

echo "installed: $(slurmd -V)"
