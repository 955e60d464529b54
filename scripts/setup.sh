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
python3 -m pip install -q --disable-pip-version-check -e '.[test]'
echo "setup: done ($(python3 -m invictusd --version))"
