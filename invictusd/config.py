"""TOML configuration -> frozen dataclasses.

Every error names the file, the line and the key (``ConfigError``). Loading is pure: it
reads the file (and secret files it names) but never looks at the system. Checks that need
the system's interfaces (an interface exists, an address lies in its subnet) are in
``check_system``, which takes a snapshot of the interfaces as plain data.
"""

from __future__ import annotations

import contextlib
import difflib
import ipaddress
import os
import re
import shutil
import stat
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
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
    """One error (``path``, ``line``, ``key``, ``message``), or several (``errors``).

    Parsing goes on after an error and reports every one it finds; the exception raised
    then carries them all in ``errors`` (in file order) and names the first in its own
    fields, so code that handles a single error keeps working.
    """

    def __init__(self, path: str, line: int | None, key: str, message: str) -> None:
        where = f"{path}:{line}" if line else path
        super().__init__(f"{where}: {key}: {message}")
        self.path, self.line, self.key, self.message = path, line, key, message
        self.errors: tuple[ConfigError, ...] = (self,)

    @classmethod
    def of(cls, errors: Sequence[ConfigError]) -> ConfigError:
        """One exception for ``errors`` (at least one), sorted by line."""
        ordered = sorted(errors, key=lambda e: e.line or 0)
        if len(ordered) == 1:
            return ordered[0]
        first = ordered[0]
        combined = cls(first.path, first.line, first.key, first.message)
        combined.args = ("\n".join(str(e) for e in ordered),)
        combined.errors = tuple(ordered)
        return combined


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
    rcvbuf_max_mb: int = 256  # an overrun doubles the event buffer up to this
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


FAULT_WEIGHT = "fault"


@dataclass(frozen=True, slots=True)
class TrackConfig:
    """One ``[[track]]`` health check: a command (argv) or an interface."""

    name: str
    command: tuple[str, ...] = ()
    interface: str = ""
    interval: float = 2.0
    timeout: float = 2.0
    fall: int = 2
    rise: int = 2
    weight: int | None = None  # None: "fault"


@dataclass(frozen=True, slots=True)
class HooksConfig:
    on_master: tuple[str, ...] = ()
    on_backup: tuple[str, ...] = ()
    on_fault: tuple[str, ...] = ()
    on_stop: tuple[str, ...] = ()
    timeout: float = 30.0


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    listen: str = ""  # as written; "" = no listener
    host: str = ""
    port: int = 0


@dataclass(frozen=True, slots=True)
class Config:
    path: str
    node: NodeConfig
    vrrp: tuple[VrrpConfig, ...]
    sync: SyncConfig
    lines: Mapping[str, int] = field(default_factory=dict, compare=False, repr=False)
    warnings: tuple[str, ...] = ()
    track: tuple[TrackConfig, ...] = ()
    hooks: HooksConfig = HooksConfig()
    metrics: MetricsConfig = MetricsConfig()

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


_PLACEHOLDER: dict[type, Any] = {str: "", int: 0, float: 0.0, bool: False, list: [], dict: {}}


class _Reader:
    """Typed access to one table, with errors that name the key and its line.

    Errors are collected, never raised: a bad or missing value is recorded in ``errors``
    (once per key) and a stand-in value is returned so that the rest of the table is still
    checked; ``failed`` then tells the caller to drop what it built from the table.
    Validations that raise ``ConfigError`` run inside ``guard()``.
    """

    def __init__(
        self, path: str, lines: Mapping[str, int], where: str, table: Mapping[str, Any],
        known: frozenset[str] = frozenset(), errors: list[ConfigError] | None = None,
    ) -> None:
        self.path, self.lines, self.where, self.table = path, lines, where, table
        self.known = known
        self.errors: list[ConfigError] = [] if errors is None else errors
        self.failed = False
        self._bad: set[str] = set()

    def err(self, key: str, message: str) -> ConfigError:
        full = f"{self.where}.{key}" if key and self.where else key or self.where
        line = self.lines.get(full) or self.lines.get(self.where)
        return ConfigError(self.path, line, full, message)

    def report(self, error: ConfigError) -> None:
        """Record ``error``; a key that already has one gets no second (follow-on) error."""
        self.failed = True
        if error.key not in self._bad:
            self._bad.add(error.key)
            self.errors.append(error)

    def bad(self, key: str) -> bool:
        """``key`` has an error already."""
        return self.err(key, "").key in self._bad

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Run a validation; a ``ConfigError`` it raises is recorded and checking goes on."""
        try:
            yield
        except ConfigError as e:
            for one in e.errors:
                self.report(one)

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        kinds = (kind,) if isinstance(kind, type) else kind
        fallback = _PLACEHOLDER.get(kinds[0]) if default is ... else default
        if key not in self.table:
            if default is ...:
                self.report(self.err(key, "is required"))
            return fallback
        value = self.table[key]
        # bool is an int in Python; never accept true for a number or 1 for a flag.
        wrong = not isinstance(value, kind) or (isinstance(value, bool) and bool not in kinds)
        if wrong:
            names = " or ".join(k.__name__ for k in kinds)
            shown = "" if key in SECRET_KEYS else f" {value!r}"
            self.report(self.err(key, f"must be {names}, got {type(value).__name__}{shown}"))
            return fallback
        return value

    def int_in(self, key: str, lo: int, hi: int, default: Any = ...) -> int:
        value: int = self.get(key, int, default)
        if not lo <= value <= hi:
            self.report(self.err(key, f"{value} is out of range {lo}..{hi}"))
            return lo
        return value

    def number(self, key: str, lo: float, hi: float, default: float) -> float:
        raw = self.get(key, (int, float), default)
        try:
            value = float(raw)
        except OverflowError:  # TOML integers are unbounded in tomllib
            self.report(self.err(key, f"{str(raw)[:20]}... is out of range {lo}..{hi}"))
            return lo
        if not lo <= value <= hi:
            self.report(self.err(key, f"{value} is out of range {lo}..{hi}"))
            return lo
        return value

    def warning(self, key: str, message: str) -> str:
        """A warning that names the key and its line like an error does (never refuses)."""
        return str(self.err(key, message))

    def finish(self) -> None:
        """Every key that no table of this kind has is an error, with the closest known key."""
        for key in self.table:
            if key in self.known:
                continue
            close = difflib.get_close_matches(key, sorted(self.known), n=1, cutoff=0.6)
            hint = f'; did you mean "{close[0]}"?' if close else " (see README)"
            self.report(self.err(key, f"unknown key{hint}"))


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


VRRP_KEYS = frozenset({
    "interface", "real_address", "virtual_address", "virtual_addresses", "virtual_id",
    "password", "password_file", "password_credential", "start_as_master", "priority",
    "preempt", "advert_interval", "preempt_delay", "garp_repeat", "garp_refresh",
    "version", "unicast_peers",
})
PASSWORD_KEYS = ("password", "password_file", "password_credential")


def _version(r: _Reader) -> int | None:
    """2 or 3; None if the key is wrong (recorded), so that the checks that depend on the
    version are skipped rather than reported against a version nobody wrote."""
    version: int = r.get("version", int, 2)
    if r.bad("version"):
        return None
    if version not in (2, 3):
        r.report(r.err("version", f"{version} is not a VRRP version spoken here (2 or 3)"))
        return None
    return version


def _advert_interval(r: _Reader, version: int | None) -> float:
    """v2: whole seconds 1..255 (as before); v3: 0.01..40.95 s in whole centiseconds.

    With an unknown version only the type is checked (the version's error is reported)."""
    if version is None:
        r.get("advert_interval", (int, float), 1)
        return 1
    if version == 2:
        raw = r.table.get("advert_interval")
        if isinstance(raw, float):
            r.report(r.err("advert_interval", f"{raw} is not a whole number of seconds: VRRPv2 "
                           "advertises whole seconds (1..255); sub-second intervals need "
                           "version = 3"))
            return 1
        return r.int_in("advert_interval", 1, 255, 1)
    value = r.number("advert_interval", 0.01, MAX_INTERVAL_V3, 1.0)
    centis = round(value * 100)
    if abs(value * 100 - centis) > 1e-6:
        r.report(r.err("advert_interval", f"{value} is not a whole number of centiseconds "
                       "(VRRPv3 carries the interval in 1/100 s, e.g. 0.1 or 0.05)"))
        return 1.0
    return centis / 100


def _unicast_peers(r: _Reader, version: int | None,
                   families: tuple[bool, bool] | None) -> tuple[IPv4 | IPv6, ...]:
    """The peers, checked against the version (None: unknown, its checks skipped) and the
    table's address families (``(has IPv4, has IPv6)``; None: the addresses have an error,
    so whether each family has a peer is not checked)."""
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
    if families is None:
        return tuple(peers)
    has4, has6 = families
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


def _vrrp(r: _Reader, base: Path, warnings: list[str]) -> VrrpConfig | None:
    """One [[vrrp]] table; None if it has errors (each recorded in ``r``)."""
    interface = r.get("interface", str)
    if not interface or len(interface) > 15 or "/" in interface or " " in interface:
        r.report(r.err("interface", f"{interface!r} is not a valid interface name"))
    version = _version(r)
    real = r.get("real_address", str, None)
    real_address = None
    with r.guard():
        real_address = _address(r, "real_address", real) if real is not None else None

    single = r.get("virtual_address", str, None)
    many = r.get("virtual_addresses", list, None)
    key = "virtual_address" if single is not None else "virtual_addresses"
    parsed: list[tuple[IPv4If | IPv6If, bool]] = []
    # A value of the wrong type is reported already: nothing more to say of the addresses.
    typed = not (r.bad("virtual_address") or r.bad("virtual_addresses"))
    with r.guard():
        if typed and (single is None) == (many is None):
            raise r.err("virtual_address", "give exactly one of virtual_address or virtual_addresses")
        raw = [single] if single is not None else many
        if typed and not raw:
            raise r.err(key, "needs at least one address")
        parsed = [(_interface_addr(r, key, v), "/" in v) for v in raw or ()]
    vips = tuple(a for a, _ in parsed if isinstance(a, IPv4If))
    vips6 = tuple(a for a, _ in parsed if isinstance(a, IPv6If))
    if parsed:
        with r.guard():
            if not vips and version == 2:
                raise r.err(key, "needs at least one IPv4 address (VRRPv2 advertises IPv4 "
                            "addresses; version = 3 advertises IPv6 ones too)")
            if len({a.ip for a, _ in parsed}) != len(parsed):
                raise r.err(key, "lists the same address twice")
            # One advert carries them all; the kernel's receive filter checks it in a bounded
            # program.
            if len(vips) > MAX_COUNT[4]:
                raise r.err(key, f"lists {len(vips)} IPv4 addresses; an advert carries at most "
                            f"{MAX_COUNT[4]}")
            if version == 3 and len(vips6) > MAX_COUNT[6]:
                raise r.err(key, f"lists {len(vips6)} IPv6 addresses; a VRRPv3 advert carries "
                            f"at most {MAX_COUNT[6]} (it must fit a 1500-byte link)")
            if real_address is not None and any(v.ip == real_address for v in vips):
                raise r.err(key, f"{real_address} is also the real_address")
        if not vips and real_address is not None:
            r.report(r.err("real_address", "is the source of IPv4 adverts, but the table has "
                           "no IPv4 virtual address"))

    password = b""
    password_keys = [k for k in PASSWORD_KEYS if k in r.table]
    # Version 2 needs a password; version 3 sends none, but accepts one (with a warning) so
    # that a pair moves from version 2 to 3 by changing one key.
    if version == 2 or password_keys:
        with r.guard():
            password = _password(r, base, warnings)
    if version == 3 and password_keys:
        warnings.append(r.warning(
            password_keys[0], "VRRPv3 has no authentication: the password is not sent and "
            "authenticates nothing; restrict who is heard with unicast_peers (accepted, so that "
            "a pair moves from version 2 to 3 by changing one key)"))
    start_as_master = r.get("start_as_master", bool, False)
    priority = r.int_in(
        "priority", 1, 254, MASTER_PRIORITY if start_as_master else DEFAULT_PRIORITY
    )
    peers: tuple[IPv4 | IPv6, ...] = ()
    with r.guard():
        families = (bool(vips), bool(vips6)) if parsed and not r.bad(key) else None
        peers = _unicast_peers(r, version, families)
    v = VrrpConfig(
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
        version=version or 2,
        unicast_peers=peers,
    )
    return None if r.failed else v


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
    "install_mark_rule", "flush_ms", "resync_interval", "rcvbuf_mb", "rcvbuf_max_mb", "replica_bit",
    "generation_bit", "replica_timeout", "max_replica_entries", "digest_interval",
    "zones", "families", "preempt_hold_max",
})


def _sync(r: _Reader, vrrp: Sequence[VrrpConfig], base: Path, warnings: list[str]) -> SyncConfig:
    enabled = r.get("enabled", bool, False)
    if not enabled:
        # A disabled table may keep its settings for later (a misspelt key is still an error).
        return SyncConfig(enabled=False)
    interface = r.get("interface", str)
    if any(v.interface == interface for v in vrrp):
        r.report(r.err(
            "interface", f"{interface!r} is a [[vrrp]] interface; the sync link must be "
            "a dedicated interface without virtual addresses"
        ))
    peer = None
    with r.guard():
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
    rcvbuf_mb = r.int_in("rcvbuf_mb", 1, 2048, 64)
    rcvbuf_max_mb = r.int_in("rcvbuf_max_mb", 1, 2048, max(256, rcvbuf_mb))
    if rcvbuf_max_mb < rcvbuf_mb:
        raise r.err("rcvbuf_max_mb", f"{rcvbuf_max_mb} is below rcvbuf_mb ({rcvbuf_mb}): the buffer "
                    "only ever grows from rcvbuf_mb")
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
        rcvbuf_mb=rcvbuf_mb,
        rcvbuf_max_mb=rcvbuf_max_mb,
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


TOP_KEYS = frozenset({"node", "vrrp", "sync", "track", "hooks", "metrics"})
NODE_KEYS = frozenset({"name", "control_socket", "runtime_dir"})


def parse(text: str, path: str = "<config>") -> Config:
    """The configuration in ``text``, or ``ConfigError`` listing every error found."""
    lines = _key_lines(text)
    try:
        data = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, ValueError) as e:  # ValueError: int over 4300 digits
        m = re.search(r"line (\d+)", str(e))
        raise ConfigError(path, int(m.group(1)) if m else None, "toml", str(e)) from None
    base = Path(path).parent
    warnings: list[str] = []
    errors: list[ConfigError] = []

    def reader(where: str, table: Mapping[str, Any], known: frozenset[str]) -> _Reader:
        return _Reader(path, lines, where, table, known, errors)

    top = reader("", data, TOP_KEYS)
    nr = reader("node", top.get("node", dict, {}), NODE_KEYS)
    node = NodeConfig(
        name=nr.get("name", str, os.uname().nodename),
        control_socket=nr.get("control_socket", str, DEFAULT_SOCKET),
        runtime_dir=nr.get("runtime_dir", str, DEFAULT_RUNTIME_DIR),
    )
    nr.finish()

    tables = top.get("vrrp", list, None)
    if not tables:
        if not top.bad("vrrp"):
            top.report(ConfigError(path, None, "vrrp", "at least one [[vrrp]] table is required"))
        tables = []
    elif not all(isinstance(t, dict) for t in tables):
        top.report(top.err("vrrp", "must be [[vrrp]] tables"))
        tables = []
    vrrp: list[VrrpConfig] = []
    for i, t in enumerate(tables):
        vr = reader(f"vrrp[{i}]", t, VRRP_KEYS)
        v = _vrrp(vr, base, warnings)
        vr.finish()
        if v is None:
            continue
        with vr.guard():
            _vrrp_agrees(vr, v, vrrp, t)
        if not vr.failed:
            vrrp.append(v)

    sr = reader("sync", top.get("sync", dict, {"enabled": False}), SYNC_KEYS)
    sync = SyncConfig(enabled=False)
    with sr.guard():
        sync = _sync(sr, vrrp, base, warnings)
    sr.finish()

    track = _tracks(top.get("track", list, []), reader, top)
    hr = reader("hooks", top.get("hooks", dict, {}), HOOKS_KEYS)
    hooks = _hooks(hr)
    hr.finish()
    mr = reader("metrics", top.get("metrics", dict, {}), METRICS_KEYS)
    metrics = _metrics(mr)
    mr.finish()
    top.finish()
    if errors:
        raise ConfigError.of(errors)
    return Config(path, node, tuple(vrrp), sync, lines, tuple(warnings), track, hooks, metrics)


def _vrrp_agrees(vr: _Reader, v: VrrpConfig, previous: Sequence[VrrpConfig],
                 t: Mapping[str, Any]) -> None:
    """The tables of a node form one group: no shared interface, VRID or address; the same
    VRRP version, priority, preemption and interval."""
    for j, prev in enumerate(previous):
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


# ---- [[track]], [hooks], [metrics] ---------------------------------------------------------

TRACK_KEYS = frozenset({
    "name", "command", "interface", "interval", "timeout", "fall", "rise", "weight",
})
COMMAND_ONLY = ("interval", "timeout", "fall", "rise")
HOOKS = ("on_master", "on_backup", "on_fault", "on_stop")
HOOKS_KEYS = frozenset({*HOOKS, "timeout"})
METRICS_KEYS = frozenset({"listen"})
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _argv(r: _Reader, key: str) -> tuple[str, ...]:
    """An argv (list of strings, no shell) whose program exists and is executable.

    A bare name is looked up in PATH now, so the daemon runs exactly what ``check`` saw.
    """
    raw = r.get(key, list)
    if r.bad(key):
        return ()
    if not raw or not all(isinstance(a, str) for a in raw):
        raise r.err(key, f"must be a non-empty list of strings (an argv, no shell), got {raw!r}")
    if any("\0" in a for a in raw):
        raise r.err(key, "contains a NUL character")
    program = raw[0]
    if "/" not in program:
        found = shutil.which(program, path=os.environ.get("PATH") or DEFAULT_PATH)
        if found is None:
            raise r.err(key, f"{program!r} is not found in PATH; give its absolute path")
        return (found, *raw[1:])
    if not program.startswith("/"):
        raise r.err(key, f"{program!r}: give an absolute path (or a name found in PATH)")
    try:
        mode = os.stat(program).st_mode
    except OSError as e:
        raise r.err(key, f"{program}: {e.strerror.lower() if e.strerror else e}") from None
    if not stat.S_ISREG(mode) or not os.access(program, os.X_OK):
        raise r.err(key, f"{program} is not an executable file")
    return tuple(raw)


def _weight(r: _Reader) -> int | None:
    raw = r.table.get("weight", FAULT_WEIGHT)
    if raw == FAULT_WEIGHT:
        return None
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise r.err("weight", f'must be "{FAULT_WEIGHT}" or an integer -254..254, got {raw!r}')
    if not -254 <= raw <= 254:
        raise r.err("weight", f"{raw} is out of range -254..254")
    return raw


def _track(r: _Reader) -> TrackConfig | None:
    command = "command" in r.table
    if command == ("interface" in r.table):
        r.report(r.err("command", "give exactly one of command or interface"))
        return None
    argv: tuple[str, ...] = ()
    interface = ""
    if command:
        with r.guard():
            argv = _argv(r, "command")
    else:
        interface = r.get("interface", str)
        if not interface or len(interface) > 15 or "/" in interface or " " in interface:
            r.report(r.err("interface", f"{interface!r} is not a valid interface name"))
        for k in COMMAND_ONLY:
            if k in r.table:
                r.report(r.err(k, "only for command checks (an interface is watched through "
                                  "link events and acts at once)"))
    default_name = os.path.basename(argv[0]) if argv else interface or r.where
    name = r.get("name", str, default_name)
    if "name" in r.table and not r.bad("name") and (
            not 0 < len(name) <= 64 or not name.isprintable()):
        r.report(r.err("name", f"{name!r}: give a printable name of 1..64 characters"))
    weight = None
    with r.guard():
        weight = _weight(r)
    interval = r.number("interval", 0.1, 86400, 2.0)
    timeout = r.number("timeout", 0.01, 86400, interval)
    if timeout > interval:
        r.report(r.err("timeout", f"{timeout} exceeds the interval ({interval}); a check runs "
                                  "once at a time"))
    t = TrackConfig(
        name=name, command=argv, interface=interface, interval=interval, timeout=timeout,
        fall=r.int_in("fall", 1, 100, 2), rise=r.int_in("rise", 1, 100, 2), weight=weight,
    )
    return None if r.failed else t


def _tracks(
    tables: list[Any], reader: Callable[[str, Mapping[str, Any], frozenset[str]], _Reader],
    top: _Reader,
) -> tuple[TrackConfig, ...]:
    if not all(isinstance(t, dict) for t in tables):
        top.report(top.err("track", "must be [[track]] tables"))
        return ()
    out: list[TrackConfig] = []
    names: dict[str, int] = {}
    for i, table in enumerate(tables):
        tr = reader(f"track[{i}]", table, TRACK_KEYS)
        t = _track(tr)
        tr.finish()
        if t is None:
            continue
        if t.name in names:
            tr.report(tr.err("name", f"{t.name!r} is also the name of track[{names[t.name]}]; "
                                     "give each check its own name"))
            continue
        names[t.name] = i
        out.append(t)
    return tuple(out)


def _hooks(r: _Reader) -> HooksConfig:
    argvs: dict[str, tuple[str, ...]] = {}
    for k in HOOKS:
        if k in r.table:
            with r.guard():
                argvs[k] = _argv(r, k)
    return HooksConfig(timeout=r.number("timeout", 0.1, 3600, 30.0), **argvs)


def _metrics(r: _Reader) -> MetricsConfig:
    listen = r.get("listen", str, "")
    if not listen:
        return MetricsConfig()
    host, sep, port = listen.rpartition(":")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ip = ipaddress.ip_address(bare)
        if ip.version == 6 and bare == host:
            raise ValueError("IPv6 needs brackets")
        number = int(port)
        if not sep or not 1 <= number <= 65535:
            raise ValueError("port")
    except ValueError:
        r.report(r.err("listen", f"{listen!r}: give an address and a port, like "
                                 "\"127.0.0.1:9842\" or \"[::1]:9842\""))
        return MetricsConfig()
    return MetricsConfig(listen=listen, host=str(ip), port=number)


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
    that contains it. Raises ``ConfigError`` listing every problem found.
    """
    errors: list[ConfigError] = []
    resolved: list[VrrpConfig] = []
    for i, v in enumerate(cfg.vrrp):
        try:
            resolved.append(_check_vrrp(cfg, i, v, links))
        except ConfigError as e:
            errors.append(e)
    if cfg.sync.enabled:
        try:
            _check_sync(cfg, links)
        except ConfigError as e:
            errors.append(e)
    warnings = list(cfg.warnings)
    for i, t in enumerate(cfg.track):
        if t.interface and t.interface not in links:
            line = cfg.lines.get(f"track[{i}].interface")
            warnings.append(f"{cfg.path}:{line}: track[{i}].interface: no interface "
                            f"{t.interface!r} on this system (yet); the check is down until "
                            "it appears")
    if errors:
        raise ConfigError.of(errors)
    return replace(cfg, vrrp=tuple(resolved), warnings=tuple(warnings))


def _check_vrrp(cfg: Config, i: int, v: VrrpConfig, links: Mapping[str, LinkInfo]) -> VrrpConfig:
    where = f"vrrp[{i}]"
    link = links.get(v.interface)
    if link is None:
        raise cfg.error(f"{where}.interface", f"no interface {v.interface!r} on this system")
    own = [a for a in link.addresses if a.ip not in {x.ip for x in v.virtual_addresses}]
    if not v.virtual_addresses:
        # Version 3 with IPv6 addresses only: no IPv4 instance, no IPv4 source needed.
        _check_vips6(cfg, i, v, link)
        return _resolve_link_peers(cfg, i, v, link, None, ())
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
        return _resolve_link_peers(cfg, i, v, link, real.ip, tuple(vips))
    return _replace_vrrp(v, real.ip, tuple(vips))


def _check_sync(cfg: Config, links: Mapping[str, LinkInfo]) -> None:
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
