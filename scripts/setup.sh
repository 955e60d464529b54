#!/usr/bin/env bash
# Install invictusd and everything its tests need on a Debian machine (run as root).
#
# Debian packages come from apt. invictusd and its Python dependencies go into a virtual
# environment of their own (/opt/invictusd, or $INVICTUSD_VENV) built on Debian's
# /usr/bin/python3, linked as /usr/local/bin/invictusd: nothing is installed into Debian's
# Python, so an `apt upgrade` cannot break invictusd and invictusd cannot break apt. The one
# Debian Python package the environment sees is python3-systemd (the journald binding).
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
VENV=${INVICTUSD_VENV:-/opt/invictusd}
PY=/usr/bin/python3

need=()
for pkg_cmd in iproute2:ip nftables:nft conntrack:conntrack conntrackd:conntrackd \
               keepalived:keepalived tcpdump:tcpdump tshark:tshark iputils-ping:ping \
               procps:pgrep systemd:systemd-analyze; do
  command -v "${pkg_cmd#*:}" >/dev/null 2>&1 || need+=("${pkg_cmd%%:*}")
done
# Checked from / : the checkout's systemd/ directory (the unit) must not pass for the binding.
py_has() { [ -x "$PY" ] && (cd / && "$PY" -c "import $1" >/dev/null 2>&1); }
[ -x "$PY" ] || need+=(python3)
py_has "ensurepip, venv" || need+=(python3-venv)
py_has systemd.journal || need+=(python3-systemd)
if ((${#need[@]})); then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# A stale environment (another interpreter, or a broken one) is rebuilt from scratch.
if ! "$VENV/bin/python" -c 'import sys; sys.exit(sys.base_prefix != "/usr")' 2>/dev/null; then
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
fi
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
binding=$(cd / && "$PY" -c 'import os, systemd; print(os.path.dirname(systemd.__file__))')
mkdir -p "$site/_debian"
ln -sfn "$binding" "$site/_debian/systemd"
echo "$site/_debian" > "$site/debian-python3-systemd.pth"

"$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade '.[test]'
ln -sfn "$VENV/bin/invictusd" /usr/local/bin/invictusd
install -d -m 700 /etc/invictusd
echo "setup: done ($("$VENV/bin/invictusd" --version) in $VENV; /usr/local/bin/invictusd)"
