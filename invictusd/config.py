"""TOML configuration -> frozen dataclasses.

Every error names the file, the line and the key (``ConfigError``). Loading is pure: it
reads the file (and secret files it names) but never looks at the system. Checks that need
the system's interfaces (an interface exists, an address lies in its subnet) are in
``check_system``, which takes a snapshot of the interfaces as plain data.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from invictusd.vrrp.filter import MAX_COUNT, MAX_PEERS
from invictusd.vrrp.packet import MAX_PASSWORD

IPv4 = ipaddress.IPv4Address
IPv6 = ipaddress.IPv6Address
IPv4If = ipaddress.IPv4Interface
IPv6If = ipaddress.IPv6Interface
LINK_LOCAL6 = ipaddress.IPv6Network("fe80::/10")
MAX_INTERVAL_V3 = 40.95  # seconds: VRRPv3's 12-bit Max Adver Int in centiseconds

DEFAULT_SOCKET = "/run/invictusd/invictusd.sock"
DEFAULT_RUNTIME_DIR = "/run/invictusd"
DEFAULT_PRIORITY = 100
MASTER_PRIORITY = 150
DEFAULT_SYNC_PORT = 3781
DEFAULT_MARK_BIT = 30
MAX_SECRET_FILE = 4096  # bytes; a password or key file is far smaller
MIN_KEY = 16  # bytes of sync key
# Keys whose value is a secret: an error about them never shows the value.
SECRET_KEYS = frozenset({"password"})
KEYGEN_HINT = (
    "create one with `invictusd keygen --output /etc/invictusd/sync.key`, copy it to the "
    "peer and set key_file on both firewalls"
)


class ConfigError(ValueError):
    def __init__(self, path: str, line: int | None, key: str, message: str) -> None:
        where = f"{path}:{line}" if line else path
        super().__init__(f"{where}: {key}: {message}")
        self.path, self.line, self.key, self.message = path, line, key, message


@dataclass(frozen=True, slots=True)
class NodeConfig:
    name: str
    control_socket: str
    # Where the daemon records what it installs (addresses, rules) for cleanup to undo.
    runtime_dir: str = DEFAULT_RUNTIME_DIR


@dataclass(frozen=True, slots=True)
class VrrpConfig:
    interface: str
    real_address: IPv4 | None
    virtual_addresses: tuple[IPv4If, ...]  # "/32" until check_system fills a missing prefix
    virtual_id: int
    password: bytes = field(repr=False)
    start_as_master: bool
    priority: int
    preempt: bool
    advert_interval: float  # seconds; an int under version 2 (whole seconds)
    preempt_delay: float
    garp_repeat: int
    garp_refresh: float
    prefix_given: tuple[bool, ...] = ()
    # Moved with the group and announced by unsolicited neighbour advertisements, but not
    # carried in VRRPv2 adverts (which hold IPv4 only), as keepalived's excluded addresses.
    # Under version 3 they have their own IPv6 instance, advertised from the link-local.
    virtual_addresses6: tuple[IPv6If, ...] = ()
    # 2 (RFC 3768) or 3 (RFC 5798); equal in every table. Under 3, advert_interval is in
    # centiseconds (a float such as 0.1) and the password is not sent.
    version: int = 2
    # Adverts go to these addresses only and are accepted only from them (empty: multicast).
    unicast_peers: tuple[IPv4 | IPv6, ...] = ()
    # Version 3 with IPv6 addresses: the interface's link-local address, the source of the
    # IPv6 adverts (filled by check_system).
    link_local: IPv6 | None = None


@dataclass(frozen=True, slots=True)
class SyncConfig:
    enabled: bool
    interface: str = ""
    peer_address: IPv4 | None = None
    mark_bit: int = DEFAULT_MARK_BIT
    port: int = DEFAULT_SYNC_PORT
    key: bytes = field(default=b"", repr=False)
    key_source: str = ""  # "key_file" or "key_credential" (never the key itself)
    install_mark_rule: bool = True
    flush_ms: float = 0.0
    resync_interval: float = 0.0  # 0 = only on start, overrun, gap or digest mismatch
    rcvbuf_mb: int = 64
    replica_bit: int = 29  # the mark bit of entries held for the peer (never announced)
    generation_bit: int = 28  # the mark bit of the resync that last refreshed a replica entry
    replica_timeout: int = 432_000  # seconds a replica entry lives without the master's word
    max_replica_entries: int = 0  # 0: 90% of nf_conntrack_max
    digest_interval: float = 300.0  # seconds between digests of the whole table (0: none)
    preempt_hold_max: float = 0.0  # 0: preemption waits for the peer's table however long
    # What the receiver accepts from the peer: anything else is dropped and counted.
    zones: frozenset[int] = frozenset({0})
    families: frozenset[int] = frozenset({4})

    @property
    def mark_mask(self) -> int:
        return 1 << self.mark_bit


@dataclass(frozen=True, slots=True)
class Config:
    path: str
    node: NodeConfig
    vrrp: tuple[VrrpConfig, ...]
    sync: SyncConfig
    lines: Mapping[str, int] = field(default_factory=dict, compare=False, repr=False)
    warnings: tuple[str, ...] = ()

    def line_of(self, key: str) -> int | None:
        return self.lines.get(key)

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(self.path, self.lines.get(key), key, message)


# ---- locating keys in the text -------------------------------------------------------------

_HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.-]+)\s*\]\]?")
_KEY = re.compile(r"^\s*([A-Za-z0-9_-]+)\s*=")


def _key_lines(text: str) -> dict[str, int]:
    """Map "node.name", "vrrp[0].password", "vrrp[0]" ... to 1-based line numbers."""
    lines: dict[str, int] = {}
    counts: dict[str, int] = {}
    prefix = ""
    for number, raw in enumerate(text.splitlines(), start=1):
        m = _HEADER.match(raw)
        if m:
            name = m.group(2)
            if m.group(1) == "[[":
                idx = counts.get(name, 0)
                counts[name] = idx + 1
                prefix = f"{name}[{idx}]"
            else:
                prefix = name
            lines.setdefault(prefix, number)
            continue
        k = _KEY.match(raw)
        if k:
            lines.setdefault(f"{prefix}.{k.group(1)}" if prefix else k.group(1), number)
    return lines


class _Reader:
    """Typed access to one table, with errors that name the key and its line."""

    def __init__(self, path: str, lines: Mapping[str, int], where: str, table: Mapping[str, Any]):
        self.path, self.lines, self.where, self.table = path, lines, where, table
        self.used: set[str] = set()

    def err(self, key: str, message: str) -> ConfigError:
        full = f"{self.where}.{key}" if key and self.where else key or self.where
        line = self.lines.get(full) or self.lines.get(self.where)
        return ConfigError(self.path, line, full, message)

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        self.used.add(key)
        if key not in self.table:
            if default is ...:
                raise self.err(key, "is required")
            return default
        value = self.table[key]
        # bool is an int in Python; never accept true for a number or 1 for a flag.
        wrong = not isinstance(value, kind) or (
            isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,))
        )
        if wrong:
            kinds = (kind,) if isinstance(kind, type) else kind
            names = " or ".join(k.__name__ for k in kinds)
            shown = "" if key in SECRET_KEYS else f" {value!r}"
            raise self.err(key, f"must be {names}, got {type(value).__name__}{shown}")
        return value

    def int_in(self, key: str, lo: int, hi: int, default: Any = ...) -> int:
        value: int = self.get(key, int, default)
        if not lo <= value <= hi:
            raise self.err(key, f"{value} is out of range {lo}..{hi}")
        return value

    def number(self, key: str, lo: float, hi: float, default: float) -> float:
        raw = self.get(key, (int, float), default)
        try:
            value = float(raw)
        except OverflowError:  # TOML integers are unbounded in tomllib
            raise self.err(key, f"{str(raw)[:20]}... is out of range {lo}..{hi}") from None
        if not lo <= value <= hi:
            raise self.err(key, f"{value} is out of range {lo}..{hi}")
        return value

    def warning(self, key: str, message: str) -> str:
        """A warning that names the key and its line like an error does (never refuses)."""
        return str(self.err(key, message))

    def finish(self) -> None:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            raise self.err(unknown[0], "unknown key (check the spelling; see README)")


def _read_secret(r: _Reader, key: str, value: str, base: Path) -> bytes:
    """Read a secret from a file (``*_file``) or a systemd credential (``*_credential``).

    A secret file that group or others can read, or that neither root nor the user running
    invictusd owns, is refused: someone else could read or replace the secret.
    """
    if key.endswith("_credential"):
        directory = os.environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            raise r.err(key, "CREDENTIALS_DIRECTORY is not set (LoadCredential= in the unit?)")
        path = Path(directory) / value
    else:
        path = Path(value) if Path(value).is_absolute() else base / value
    try:
        st = path.stat()
        # A device or FIFO (/dev/zero, /dev/stdin) would be read without end or block start-up.
        if not stat.S_ISREG(st.st_mode):
            raise r.err(key, f"cannot read {path}: not a regular file")
        if key.endswith("_file"):
            _check_private(r, key, path, st)
        with path.open("rb") as f:
            data = f.read(MAX_SECRET_FILE + 1)
    except OSError as e:
        raise r.err(key, f"cannot read {path}: {e.strerror}") from None
    except ValueError as e:  # a NUL in the name: os.stat refuses it before any I/O
        if isinstance(e, ConfigError):
            raise
        raise r.err(key, f"cannot read {str(path)!r}: {e}") from None
    if len(data) > MAX_SECRET_FILE:
        raise r.err(key, f"{path} is over {MAX_SECRET_FILE} bytes; not a key file")
    return data.rstrip(b"\r\n")


def _private_problem(path: Path, st: os.stat_result) -> str:
    """Why ``path`` is not private enough to hold a secret ("" if it is)."""
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        return (f"{path} is readable or writable by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); chmod 600 it")
    if st.st_uid not in (0, os.geteuid()):
        return f"{path} is owned by uid {st.st_uid}, not root; chown root it"
    return ""


def _check_private(r: _Reader, key: str, path: Path, st: os.stat_result) -> None:
    problem = _private_problem(path, st)
    if problem:
        raise r.err(key, f"refusing a secret file: {problem}")


def _address(r: _Reader, key: str, value: Any) -> IPv4:
    if not isinstance(value, str):
        raise r.err(key, f"must be an IPv4 address string, got {value!r}")
    try:
        return IPv4(value)
    except ValueError:
        raise r.err(key, f"{value!r} is not an IPv4 address") from None


def _interface_addr(r: _Reader, key: str, value: Any) -> IPv4If | IPv6If:
    if not isinstance(value, str):
        raise r.err(key, f"must be an address string like \"10.0.0.1/24\", got {value!r}")
    if ":" in value:
        if "/" not in value:
            raise r.err(key, f"IPv6 address {value!r} needs its prefix, e.g. \"fd10::1/64\"")
        try:
            return IPv6If(value)
        except ValueError:
            raise r.err(key, f"{value!r} is not an IPv6 address/prefix") from None
    try:
        return IPv4If(value)
    except ValueError:
        raise r.err(key, f"{value!r} is not an IPv4 address[/prefix]") from None


def _version(r: _Reader) -> int:
    version: int = r.get("version", int, 2)
    if version not in (2, 3):
        raise r.err("version", f"{version} is not a VRRP version spoken here (2 or 3)")
    return version


def _advert_interval(r: _Reader, version: int) -> float:
    """v2: whole seconds 1..255 (as before); v3: 0.01..40.95 s in whole centiseconds."""
    if version == 2:
        raw = r.table.get("advert_interval")
        if isinstance(raw, float):
            raise r.err("advert_interval", f"{raw} is not a whole number of seconds: VRRPv2 "
                        "advertises whole seconds (1..255); sub-second intervals need version = 3")
        return r.int_in("advert_interval", 1, 255, 1)
    value = r.number("advert_interval", 0.01, MAX_INTERVAL_V3, 1.0)
    centis = round(value * 100)
    if abs(value * 100 - centis) > 1e-6:
        raise r.err("advert_interval", f"{value} is not a whole number of centiseconds "
                    "(VRRPv3 carries the interval in 1/100 s, e.g. 0.1 or 0.05)")
    return centis / 100


def _unicast_peers(r: _Reader, version: int, has4: bool, has6: bool) -> tuple[IPv4 | IPv6, ...]:
    raw = r.get("unicast_peers", list, None)
    if raw is None:
        return ()
    key = "unicast_peers"
    if not raw:
        raise r.err(key, "lists no peer (remove the key to advertise by multicast)")
    peers: list[IPv4 | IPv6] = []
    for value in raw:
        if not isinstance(value, str):
            raise r.err(key, f"must list address strings, got {value!r}")
        if "%" in value:
            raise r.err(key, f"{value!r}: give the address without a scope; the table's "
                        "interface is the scope")
        try:
            peer = ipaddress.ip_address(value)
        except ValueError:
            raise r.err(key, f"{value!r} is not an IP address") from None
        if isinstance(peer, IPv6):
            if version == 2:
                raise r.err(key, f"{value}: VRRPv2 runs over IPv4 only (IPv6 peers need "
                            "version = 3)")
            if peer not in LINK_LOCAL6:
                raise r.err(key, f"{value}: VRRPv3 over IPv6 is sent from link-local "
                            "addresses; list the peer's fe80:: address (that is the source "
                            "checked on receipt)")
        elif peer.is_multicast or peer.is_unspecified:
            raise r.err(key, f"{value} is not a unicast address")
        if peer in peers:
            raise r.err(key, f"lists {value} twice")
        peers.append(peer)
    peers4 = any(isinstance(p, IPv4) for p in peers)
    peers6 = any(isinstance(p, IPv6) for p in peers)
    for family, cls in ((4, IPv4), (6, IPv6)):
        if sum(isinstance(p, cls) for p in peers) > MAX_PEERS:
            raise r.err(key, f"lists more than {MAX_PEERS} IPv{family} peers (the kernel's "
                        "receive filter checks the source against each)")
    if peers4 and not has4:
        raise r.err(key, "lists IPv4 peers, but the table has no IPv4 virtual address")
    if has4 and not peers4:
        raise r.err(key, "lists no IPv4 peer for the IPv4 virtual addresses")
    if version == 3 and has6 and not peers6:
        raise r.err(key, "lists no IPv6 (link-local) peer for the IPv6 virtual addresses, "
                    "which version 3 advertises separately")
    if peers6 and not has6:
        raise r.err(key, "lists IPv6 peers, but the table has no IPv6 virtual address")
    return tuple(peers)


def _vrrp(r: _Reader, base: Path, warnings: list[str]) -> VrrpConfig:
    interface = r.get("interface", str)
    if not interface or len(interface) > 15 or "/" in interface or " " in interface:
        raise r.err("interface", f"{interface!r} is not a valid interface name")
    version = _version(r)
    real = r.get("real_address", str, None)
    real_address = _address(r, "real_address", real) if real is not None else None

    single = r.get("virtual_address", str, None)
    many = r.get("virtual_addresses", list, None)
    if (single is None) == (many is None):
        raise r.err("virtual_address", "give exactly one of virtual_address or virtual_addresses")
    key = "virtual_address" if single is not None else "virtual_addresses"
    raw = [single] if single is not None else many
    if not raw:
        raise r.err(key, "needs at least one address")
    parsed = [(_interface_addr(r, key, v), "/" in v) for v in raw]
    vips = tuple(a for a, _ in parsed if isinstance(a, IPv4If))
    vips6 = tuple(a for a, _ in parsed if isinstance(a, IPv6If))
    if not vips and version == 2:
        raise r.err(key, "needs at least one IPv4 address (VRRPv2 advertises IPv4 addresses; "
                    "version = 3 advertises IPv6 ones too)")
    if not vips and real_address is not None:
        raise r.err("real_address", "is the source of IPv4 adverts, but the table has no IPv4 "
                    "virtual address")
    if len({a.ip for a, _ in parsed}) != len(parsed):
        raise r.err(key, "lists the same address twice")
    # One advert carries them all; the kernel's receive filter checks it in a bounded program.
    if len(vips) > MAX_COUNT[4]:
        raise r.err(key, f"lists {len(vips)} IPv4 addresses; an advert carries at most "
                    f"{MAX_COUNT[4]}")
    if version == 3 and len(vips6) > MAX_COUNT[6]:
        raise r.err(key, f"lists {len(vips6)} IPv6 addresses; a VRRPv3 advert carries at most "
                    f"{MAX_COUNT[6]} (it must fit a 1500-byte link)")
    if real_address is not None and any(v.ip == real_address for v in vips):
        raise r.err(key, f"{real_address} is also the real_address")

    if version == 2:
        password = _password(r, base, warnings)
    elif any(k in r.table for k in ("password", "password_file", "password_credential")):
        password = _password(r, base, warnings)
        given = next(k for k in ("password", "password_file", "password_credential")
                     if k in r.table)
        warnings.append(r.warning(
            given, "VRRPv3 has no authentication: the password is not sent and authenticates "
            "nothing; restrict who is heard with unicast_peers (accepted, so that a pair moves "
            "from version 2 to 3 by changing one key)"))
    else:
        password = b""
    start_as_master = r.get("start_as_master", bool, False)
    priority = r.int_in(
        "priority", 1, 254, MASTER_PRIORITY if start_as_master else DEFAULT_PRIORITY
    )
    return VrrpConfig(
        interface=interface,
        real_address=real_address,
        virtual_addresses=vips,
        virtual_id=r.int_in("virtual_id", 1, 255),
        password=password,
        start_as_master=start_as_master,
        priority=priority,
        preempt=r.get("preempt", bool, start_as_master),
        advert_interval=_advert_interval(r, version),
        preempt_delay=r.number("preempt_delay", 0, 3600, 0.0),
        garp_repeat=r.int_in("garp_repeat", 1, 100, 5),
        garp_refresh=r.number("garp_refresh", 0, 86400, 60.0),
        prefix_given=tuple(given for a, given in parsed if isinstance(a, IPv4If)),
        virtual_addresses6=vips6,
        version=version,
        unicast_peers=_unicast_peers(r, version, bool(vips), bool(vips6)),
    )


def _password(r: _Reader, base: Path, warnings: list[str]) -> bytes:
    sources = [k for k in ("password", "password_file", "password_credential") if k in r.table]
    if len(sources) != 1:
        raise r.err("password", "give exactly one of password, password_file, password_credential")
    key = sources[0]
    value = r.get(key, str)
    secret: bytes = (
        value.encode() if key == "password" else _read_secret(r, key, value, base)
    )
    if not secret:
        raise r.err(key, "is empty")
    if len(secret) > MAX_PASSWORD:
        raise r.err(
            key, f"is {len(secret)} bytes; VRRP auth type 1 carries at most {MAX_PASSWORD} "
            "(refusing to truncate it)"
        )
    if b"\0" in secret:
        raise r.err(key, "contains a NUL byte")
    return secret


SYNC_KEYS = frozenset({
    "enabled", "interface", "peer_address", "mark_bit", "port", "key_file", "key_credential",
    "install_mark_rule", "flush_ms", "resync_interval", "rcvbuf_mb", "replica_bit",
    "generation_bit", "replica_timeout", "max_replica_entries", "digest_interval",
    "zones", "families", "preempt_hold_max",
})


def _sync(r: _Reader, vrrp: Sequence[VrrpConfig], base: Path, warnings: list[str]) -> SyncConfig:
    enabled = r.get("enabled", bool, False)
    if not enabled:
        # A disabled table may keep its settings for later, but a misspelt key is still an error.
        r.used.update(k for k in r.table if k in SYNC_KEYS)
        return SyncConfig(enabled=False)
    interface = r.get("interface", str)
    for v in vrrp:
        if v.interface == interface:
            raise r.err(
                "interface", f"{interface!r} is a [[vrrp]] interface; the sync link must be "
                "a dedicated interface without virtual addresses"
            )
    peer = _address(r, "peer_address", r.get("peer_address", str))
    key_sources = [k for k in ("key_file", "key_credential") if k in r.table]
    if len(key_sources) > 1:
        raise r.err("key_file", "give at most one of key_file, key_credential")
    if not key_sources:
        # VRRPv2 sends its password in clear in every advert (VRRPv3 has none): it can never
        # be the sync key.
        raise r.err("key_file", "is required: replication needs a key of its own (VRRPv2's "
                    f"password travels in clear, VRRPv3 has none); {KEYGEN_HINT}")
    ks = key_sources[0]
    key = _read_secret(r, ks, r.get(ks, str), base)
    if len(key) < MIN_KEY:
        raise r.err(ks, f"key is {len(key)} bytes; use at least {MIN_KEY} ({KEYGEN_HINT})")
    zones = _zones(r)
    families = _families(r, vrrp)
    mark_bit = r.int_in("mark_bit", 0, 31, DEFAULT_MARK_BIT)
    replica_bit = r.int_in("replica_bit", 0, 31, 29)
    generation_bit = r.int_in("generation_bit", 0, 31, 28)
    if len({mark_bit, replica_bit, generation_bit}) != 3:
        clash = "generation_bit" if "generation_bit" in r.table else "replica_bit"
        raise r.err(clash, f"mark_bit {mark_bit}, replica_bit {replica_bit} and generation_bit "
                    f"{generation_bit} must be three different bits of the conntrack mark")
    return SyncConfig(
        enabled=True,
        interface=interface,
        peer_address=peer,
        mark_bit=mark_bit,
        port=r.int_in("port", 1, 65535, DEFAULT_SYNC_PORT),
        key=key,
        key_source=ks,
        install_mark_rule=r.get("install_mark_rule", bool, True),
        # 0: a lone event leaves at once; a burst still fills datagrams, because events are
        # read in batches per wake-up (measured lag p50 6 ms -> see README benchmarks).
        flush_ms=r.number("flush_ms", 0, 1000, 0.0),
        resync_interval=r.number("resync_interval", 0, 86400 * 7, 0.0),
        rcvbuf_mb=r.int_in("rcvbuf_mb", 1, 2048, 64),
        replica_bit=replica_bit,
        generation_bit=generation_bit,
        replica_timeout=r.int_in("replica_timeout", 600, 2_000_000, 432_000),
        max_replica_entries=r.int_in("max_replica_entries", 0, 1 << 31, 0),
        digest_interval=r.number("digest_interval", 0, 86400, 300.0),
        preempt_hold_max=r.number("preempt_hold_max", 0, 86400 * 7, 0.0),
        zones=zones,
        families=families,
    )


def _zones(r: _Reader) -> frozenset[int]:
    raw = r.get("zones", list, [0])
    if not raw or not all(isinstance(z, int) and not isinstance(z, bool) and 0 <= z <= 0xFFFF
                          for z in raw):
        raise r.err("zones", "must be a non-empty list of conntrack zones 0..65535")
    return frozenset(raw)


_FAMILIES = {"ipv4": 4, "ipv6": 6}


def _families(r: _Reader, vrrp: Sequence[VrrpConfig]) -> frozenset[int]:
    """Address families replicated: by default IPv4, plus IPv6 when a group moves IPv6
    addresses (without one, IPv6 flows through this pair cannot fail over anyway)."""
    uses6 = any(v.virtual_addresses6 for v in vrrp)
    raw = r.get("families", list, ["ipv4", "ipv6"] if uses6 else ["ipv4"])
    if not raw or not all(isinstance(f, str) and f in _FAMILIES for f in raw):
        raise r.err("families", 'must be a non-empty list of "ipv4", "ipv6"')
    return frozenset(_FAMILIES[f] for f in raw)


def _vip_set(v: VrrpConfig) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    return {a.ip for a in v.virtual_addresses} | {a.ip for a in v.virtual_addresses6}


def parse(text: str, path: str = "<config>") -> Config:
    lines = _key_lines(text)
    try:
        data = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, ValueError) as e:  # ValueError: int over 4300 digits
        m = re.search(r"line (\d+)", str(e))
        raise ConfigError(path, int(m.group(1)) if m else None, "toml", str(e)) from None
    base = Path(path).parent
    warnings: list[str] = []
    top = _Reader(path, lines, "", data)

    node_t = top.get("node", dict, {})
    nr = _Reader(path, lines, "node", node_t)
    node = NodeConfig(
        name=nr.get("name", str, os.uname().nodename),
        control_socket=nr.get("control_socket", str, DEFAULT_SOCKET),
        runtime_dir=nr.get("runtime_dir", str, DEFAULT_RUNTIME_DIR),
    )
    nr.finish()

    tables = top.get("vrrp", list, None)
    if not tables:
        raise ConfigError(path, None, "vrrp", "at least one [[vrrp]] table is required")
    vrrp: list[VrrpConfig] = []
    for i, t in enumerate(tables):
        if not isinstance(t, dict):
            raise ConfigError(path, lines.get("vrrp"), "vrrp", "must be [[vrrp]] tables")
        vr = _Reader(path, lines, f"vrrp[{i}]", t)
        v = _vrrp(vr, base, warnings)
        vr.finish()
        for j, prev in enumerate(vrrp):
            if prev.interface == v.interface:
                raise vr.err("interface", f"{v.interface!r} is already used by vrrp[{j}]")
            if prev.virtual_id == v.virtual_id:
                raise vr.err("virtual_id", f"{v.virtual_id} is already used by vrrp[{j}]")
            if prev.version != v.version:
                raise vr.err(
                    "version",
                    f"{v.version} differs from vrrp[{j}] ({prev.version}); every [[vrrp]] "
                    "table of a node moves as one group and speaks one VRRP version",
                )
            if prev.start_as_master != v.start_as_master:
                raise vr.err(
                    "start_as_master",
                    "must be the same in every [[vrrp]] table: they move as one group",
                )
            for k in ("priority", "preempt", "advert_interval"):
                if getattr(prev, k) != getattr(v, k):
                    raise vr.err(
                        k if k in t else "start_as_master",
                        f"{getattr(v, k)} differs from vrrp[{j}] ({getattr(prev, k)}); every "
                        "[[vrrp]] table of a node moves as one group and must agree",
                    )
            shared = _vip_set(prev) & _vip_set(v)
            if shared:
                key = "virtual_address" if "virtual_address" in t else "virtual_addresses"
                raise vr.err(key, f"{sorted(map(str, shared))} also in vrrp[{j}]")
        vrrp.append(v)

    sr = _Reader(path, lines, "sync", top.get("sync", dict, {"enabled": False}))
    sync = _sync(sr, vrrp, base, warnings)
    sr.finish()
    top.finish()
    return Config(path, node, tuple(vrrp), sync, lines, tuple(warnings))


def load(path: str | os.PathLike[str]) -> Config:
    p = Path(path)
    try:
        st = p.stat()
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(str(p), None, "file", f"cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(str(p), None, "file", f"not UTF-8: {e}") from None
    # Before anything else: a secret others can read is refused whatever else is wrong.
    inline = sorted((line, key) for key, line in _key_lines(text).items() if key.endswith(".password"))
    problem = _private_problem(p, st) if inline else ""
    if problem:
        line, key = inline[0]
        raise ConfigError(str(p), line, key, f"refusing a config file that holds a password: {problem}")
    return parse(text, str(p))


# ---- checks against the system ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LinkInfo:
    """What ``check_system`` needs to know of one interface."""

    name: str
    addresses: tuple[IPv4If, ...]
    addresses6: tuple[IPv6If, ...] = ()


def check_system(cfg: Config, links: Mapping[str, LinkInfo]) -> Config:
    """Interfaces exist, addresses fit their subnets; returns the config with prefixes filled.

    A virtual address written without a prefix takes the prefix of the interface's subnet
    that contains it.
    """
    resolved: list[VrrpConfig] = []
    for i, v in enumerate(cfg.vrrp):
        where = f"vrrp[{i}]"
        link = links.get(v.interface)
        if link is None:
            raise cfg.error(f"{where}.interface", f"no interface {v.interface!r} on this system")
        own = [a for a in link.addresses if a.ip not in {x.ip for x in v.virtual_addresses}]
        if not v.virtual_addresses:
            # Version 3 with IPv6 addresses only: no IPv4 instance, no IPv4 source needed.
            _check_vips6(cfg, i, v, link)
            resolved.append(_resolve_link_peers(cfg, i, v, link, None, ()))
            continue
        if not own:
            raise cfg.error(f"{where}.interface", f"{v.interface} has no IPv4 address of its own")
        if v.real_address is not None:
            match = [a for a in own if a.ip == v.real_address]
            if not match:
                raise cfg.error(
                    f"{where}.real_address",
                    f"{v.real_address} is not on {v.interface} "
                    f"(it has {', '.join(str(a) for a in own)})",
                )
            real = match[0]
        else:
            real = own[0]
        key = f"{where}.virtual_address" if f"{where}.virtual_address" in cfg.lines else (
            f"{where}.virtual_addresses")
        vips = []
        for vip, explicit in zip(v.virtual_addresses, v.prefix_given, strict=True):
            nets = [a.network for a in own if vip.ip in a.network]
            if not nets:
                raise cfg.error(
                    key, f"{vip.ip} is not in the subnet of {v.interface} "
                    f"({', '.join(str(a.network) for a in own)})"
                )
            if explicit and vip.network not in nets:
                raise cfg.error(key, f"{vip} does not match {v.interface}'s subnet {nets[0]}")
            vips.append(vip if explicit else IPv4If(f"{vip.ip}/{nets[0].prefixlen}"))
        _check_vips6(cfg, i, v, link)
        if v.version == 3 or v.unicast_peers:
            resolved.append(_resolve_link_peers(cfg, i, v, link, real.ip, tuple(vips)))
            continue
        resolved.append(_replace_vrrp(v, real.ip, tuple(vips)))
    if cfg.sync.enabled:
        link = links.get(cfg.sync.interface)
        if link is None:
            raise cfg.error("sync.interface", f"no interface {cfg.sync.interface!r} on this system")
        if not link.addresses:
            raise cfg.error("sync.interface", f"{cfg.sync.interface} has no IPv4 address")
        peer = cfg.sync.peer_address
        assert peer is not None  # enabled sync always has a peer (checked by parse)
        if not any(peer in a.network for a in link.addresses):
            raise cfg.error(
                "sync.peer_address",
                f"{peer} is not on {cfg.sync.interface}'s subnet "
                f"({', '.join(str(a.network) for a in link.addresses)})",
            )
        if any(peer == a.ip for a in link.addresses):
            raise cfg.error("sync.peer_address", f"{peer} is this node's own address")
    return Config(cfg.path, cfg.node, tuple(resolved), cfg.sync, cfg.lines, cfg.warnings)


def _check_vips6(cfg: Config, i: int, v: VrrpConfig, link: LinkInfo) -> None:
    where = f"vrrp[{i}]"
    key = f"{where}.virtual_address" if f"{where}.virtual_address" in cfg.lines else (
        f"{where}.virtual_addresses")
    own6 = [a for a in link.addresses6 if a.ip not in {x.ip for x in v.virtual_addresses6}]
    for vip6 in v.virtual_addresses6:
        if not any(vip6.network == a.network for a in own6):
            raise cfg.error(
                key, f"{vip6} is not in an IPv6 subnet of {v.interface} "
                f"({', '.join(str(a.network) for a in own6) or 'it has none'})"
            )


def _resolve_link_peers(cfg: Config, i: int, v: VrrpConfig, link: LinkInfo, real: IPv4 | None,
                vips: tuple[IPv4If, ...]) -> VrrpConfig:
    """The checks of version 3 and unicast_peers: a link-local source, peers on the link."""
    where = f"vrrp[{i}]"
    link_local = None
    if v.version == 3 and v.virtual_addresses6:
        lls = [a.ip for a in link.addresses6 if a.ip in LINK_LOCAL6]
        if not lls:
            raise cfg.error(
                f"{where}.interface", f"{v.interface} has no IPv6 link-local address: version 3 "
                "advertises the IPv6 virtual addresses from it (is IPv6 disabled there?)"
            )
        link_local = lls[0]
    own = {a.ip for a in link.addresses} | {a.ip for a in link.addresses6}
    for peer in v.unicast_peers:
        if peer in own:
            raise cfg.error(f"{where}.unicast_peers", f"{peer} is an address of this node's "
                            f"{v.interface}, not of a peer")
        # The TTL of 255 is checked on receipt: a peer behind a router can never be heard.
        if isinstance(peer, IPv4) and not any(peer in a.network for a in link.addresses):
            raise cfg.error(
                f"{where}.unicast_peers", f"{peer} is not on {v.interface}'s subnets "
                f"({', '.join(str(a.network) for a in link.addresses) or 'none'}): adverts "
                "must arrive with TTL 255, so peers are on the same link"
            )
    if real is None:
        return replace(v, link_local=link_local, prefix_given=())
    return replace(_replace_vrrp(v, real, vips), link_local=link_local)


def _replace_vrrp(v: VrrpConfig, real: IPv4, vips: tuple[IPv4If, ...]) -> VrrpConfig:
    return replace(v, real_address=real, virtual_addresses=vips, prefix_given=(True,) * len(vips))


def runtime_dir_of(path: str | os.PathLike[str]) -> str:
    """``[node] runtime_dir`` of the file at ``path``, read leniently: cleanup must find the
    record of installed state even when the file no longer validates (or no longer parses:
    then the default)."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        value = data.get("node", {}).get("runtime_dir", DEFAULT_RUNTIME_DIR)
    except (OSError, ValueError, AttributeError):
        return DEFAULT_RUNTIME_DIR
    return value if isinstance(value, str) and value else DEFAULT_RUNTIME_DIR
