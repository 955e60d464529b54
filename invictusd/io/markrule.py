"""The nftables rule that marks connections for replication, in a table of our own.

Like DrakInvictus' init script (which used a mangle PREROUTING CONNMARK rule), new
connections get bit ``mark_bit`` of the ct mark; we mark only *forwarded* ones, in the
forward hook before the filter chains (priority mangle), so the firewall's own traffic
(VRRP, the sync link, management) is never replicated.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess

TABLE = "invictusd"


class MarkRuleError(RuntimeError):
    pass


def mark_ruleset(mark_bit: int) -> str:
    mask = 1 << mark_bit
    return (
        f"table inet {TABLE} {{\n"
        "    chain mark_forward {\n"
        "        type filter hook forward priority mangle; policy accept;\n"
        f"        ct state new ct mark set ct mark or 0x{mask:08x} "
        'comment "invictusd: replicate this connection"\n'
        "    }\n"
        "}\n"
    )


def _nft(script: str) -> None:
    nft = shutil.which("nft")
    if nft is None:
        raise MarkRuleError("nft not found: install nftables or set [sync] install_mark_rule = false")
    proc = subprocess.run([nft, "-f", "-"], input=script, text=True, capture_output=True, timeout=10)
    if proc.returncode != 0:
        raise MarkRuleError(f"nft failed: {proc.stderr.strip()}")


def install_mark_rule(mark_bit: int) -> None:
    """(Re)create our table atomically: one nft transaction deletes any old copy first."""
    _nft(f"table inet {TABLE}\ndelete table inet {TABLE}\n" + mark_ruleset(mark_bit))


def remove_table(table: str) -> None:
    """Delete nft table ``table`` ("inet invictusd") if it exists; raises MarkRuleError."""
    _nft(f"table {table}\ndelete table {table}\n")


def remove_mark_rule() -> None:
    # Nothing to remove, or no nft: either way no rule of ours is left.
    with contextlib.suppress(MarkRuleError):
        remove_table(f"inet {TABLE}")
