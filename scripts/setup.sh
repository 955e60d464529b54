#!/usr/bin/env bash
# Install everything invictusd and its tests need on a Debian machine (run as root).
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
need=()
for pkg_cmd in iproute2:ip nftables:nft conntrack:conntrack conntrackd:conntrackd \
               keepalived:keepalived tcpdump:tcpdump tshark:tshark iputils-ping:ping \
               procps:pgrep systemd:systemd-analyze; do
  command -v "${pkg_cmd#*:}" >/dev/null 2>&1 || need+=("${pkg_cmd%%:*}")
done
if ((${#need[@]})); then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if ! python3 -m pip --version >/dev/null 2>&1; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends python3-pip >/dev/null
fi
pip_flags=(-q --disable-pip-version-check)
# Debian's own python3 is "externally managed" (PEP 668); this machine is a firewall that
# runs invictusd as a system service, so install into it as the admin asked.
if python3 -c 'import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")))'; then
  pip_flags+=(--break-system-packages)
fi
python3 -m pip install "${pip_flags[@]}" -e '.[test]'
echo "setup: done ($(python3 -m invictusd --version))"
