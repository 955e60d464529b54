"""invictusd configuration files for the two firewalls of a ``Lab``."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from invictusd.lab.topology import Lab

LAN_VRID = 51
WAN_VRID = 52
PASSWORD = "s3cret"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return str(value)


def daemon_config(
    lab: Lab,
    node: str,
    *,
    start_as_master: bool = False,
    sync: bool = False,
    vrrp_extra: dict[str, Any] | None = None,
    sync_extra: dict[str, Any] | None = None,
    interfaces: tuple[str, ...] = ("lan", "wan"),
    password: str | None = PASSWORD,
    table_extra: dict[str, dict[str, Any]] | None = None,
    families: tuple[int, ...] = (4, 6),
    extra: str = "",
) -> str:
    """The TOML of ``node`` (fw1 or fw2): LAN and WAN in one group, optional sync.

    ``table_extra`` adds keys to one table (``{"lan": {"unicast_peers": [...]}}``);
    ``families`` picks the virtual addresses (IPv6 ones only when the lab has IPv6);
    ``password=None`` leaves the key out (VRRPv3 needs none); ``extra`` is more TOML text
    appended after the tables (``[[track]]``, ``[hooks]``, ``[metrics]``...).
    """
    c = lab.config
    i = 0 if node == "fw1" else 1
    tables = {
        "lan": (c.lan_if, c.fw_lan_ips[i], c.lan_vip, LAN_VRID, f"{c.lan_vip6}/{c.prefix6}"),
        "wan": (c.wan_if, c.fw_wan_ips[i], c.wan_vip, WAN_VRID, f"{c.wan_vip6}/{c.prefix6}"),
    }
    lines = [
        "[node]",
        f'name = "{node}"',
        f'control_socket = "{control_socket(lab, node)}"',
        f'runtime_dir = "{runtime_dir(lab, node)}"',
        "",
    ]
    for which in interfaces:
        ifname, real, vip, vrid, vip6 = tables[which]
        vips = ([f"{vip}/{c.prefix4}"] if 4 in families else []) + (
            [vip6] if c.ipv6 and 6 in families else [])
        lines += [
            "[[vrrp]]",
            f'interface = "{ifname}"',
            *([f'real_address = "{real}"'] if 4 in families else []),
            f"virtual_addresses = {_toml_value(vips)}",
            f"virtual_id = {vrid}",
            *([f'password = "{password}"'] if password is not None else []),
            f"start_as_master = {_toml_value(start_as_master)}",
        ]
        lines += [f"{k} = {_toml_value(v)}" for k, v in (vrrp_extra or {}).items()]
        lines += [f"{k} = {_toml_value(v)}" for k, v in (table_extra or {}).get(which, {}).items()]
        lines.append("")
    lines += ["[sync]", f"enabled = {_toml_value(sync)}"]
    if sync:
        lines += [
            f'interface = "{c.sync_if}"',
            f'peer_address = "{c.sync_ips[1 - i]}"',
        ]
        more = sync_extra or {}
        if "mark_bit" not in more:
            lines.append("mark_bit = 30")
        if not {"key_file", "key_credential"} & set(more):
            lines.append(f'key_file = "{sync_key(lab)}"')
        lines += [f"{k} = {_toml_value(v)}" for k, v in more.items()]
    # More tables ([[track]], [hooks], [metrics]...), as TOML text.
    return "\n".join(lines) + "\n" + (f"\n{extra.strip()}\n" if extra.strip() else "")


def sync_key(lab: Lab) -> Path:
    """The lab's shared sync key (random per lab, mode 600), as `invictusd keygen` writes it."""
    path = lab.workdir / "sync.key"
    if not path.exists():
        lab.write_file("sync.key", secrets.token_hex(32) + "\n")
        path.chmod(0o600)
    return path


def runtime_dir(lab: Lab, node: str) -> str:
    return str(lab.workdir / f"{node}-run")


def control_socket(lab: Lab, node: str) -> str:
    return str(lab.workdir / f"{node}.sock")


def write_config(lab: Lab, node: str, **kw: Any) -> Path:
    path = lab.write_file(f"{node}.toml", daemon_config(lab, node, **kw))
    path.chmod(0o600)
    return path
