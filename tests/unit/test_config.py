"""TOML configuration: the issue's exact shape, defaults, every error naming file:line and key,
secrets from files, and the system checks against a plain-data interface snapshot."""

from __future__ import annotations

import os
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from invictusd import config
from invictusd.config import (
    DEFAULT_SOCKET,
    Config,
    ConfigError,
    LinkInfo,
    SyncConfig,
    VrrpConfig,
    check_system,
    load,
    parse,
)

A = IPv4Address
IF = IPv4Interface

# The shape from issue 2, verbatim apart from the comments.
MINIMAL = """\
[node]
name = "fw1"
control_socket = "/run/invictusd/invictusd.sock"

[[vrrp]]
interface = "lan0"
real_address = "10.0.0.2"
virtual_address = "10.0.0.1/24"
virtual_id = 51
password = "secret"
start_as_master = false
"""

WAN = """
[[vrrp]]
interface = "wan0"
real_address = "192.0.2.2"
virtual_addresses = ["192.0.2.1/24", "192.0.2.10/24"]
virtual_id = 52
password = "secret"
start_as_master = false
"""


def line_of(text: str, needle: str, occurrence: int = 1) -> int:
    """1-based line of the ``occurrence``-th line containing ``needle``."""
    hits = [n for n, line in enumerate(text.splitlines(), start=1) if needle in line]
    return hits[occurrence - 1]


def error(text: str, path: str = "/etc/invictusd.toml") -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(text, path)
    return info.value


def assert_error(
    text: str, key: str, needle: str | None, words: tuple[str, ...] = (), occurrence: int = 1
) -> ConfigError:
    err = error(text)
    assert err.key == key
    assert err.path == "/etc/invictusd.toml"
    expected_line = line_of(text, needle, occurrence) if needle is not None else None
    assert err.line == expected_line, str(err)
    where = f"/etc/invictusd.toml:{expected_line}" if expected_line else "/etc/invictusd.toml"
    assert str(err).startswith(f"{where}: {key}: "), str(err)
    for w in words:
        assert w in err.message, err.message
    return err


def edit(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


# ---- the valid minimal config and defaults -----------------------------------------------


def test_minimal_config_exact_values() -> None:
    cfg = parse(MINIMAL, "/etc/invictusd.toml")
    assert cfg.path == "/etc/invictusd.toml"
    assert cfg.node.name == "fw1"
    assert cfg.node.control_socket == "/run/invictusd/invictusd.sock" == DEFAULT_SOCKET
    assert cfg.vrrp == (
        VrrpConfig(
            interface="lan0",
            real_address=A("10.0.0.2"),
            virtual_addresses=(IF("10.0.0.1/24"),),
            virtual_id=51,
            password=b"secret",
            start_as_master=False,
            priority=100,
            preempt=False,
            advert_interval=1,
            preempt_delay=0.0,
            garp_repeat=5,
            garp_refresh=60.0,
            prefix_given=(True,),
        ),
    )
    assert cfg.sync == SyncConfig(enabled=False)
    assert cfg.warnings == ()
    assert cfg.line_of("vrrp[0].password") == 10
    assert cfg.line_of("vrrp[0]") == 5


def test_password_is_not_in_repr() -> None:
    cfg = parse(MINIMAL)
    assert "secret" not in repr(cfg.vrrp[0])


def test_node_table_is_optional() -> None:
    cfg = parse(MINIMAL.split("\n\n", 1)[1])
    assert cfg.node.name == os.uname().nodename
    assert cfg.node.control_socket == DEFAULT_SOCKET


def test_start_as_master_defaults_priority_150_and_preempt() -> None:
    cfg = parse(edit(MINIMAL, "start_as_master = false", "start_as_master = true"))
    v = cfg.vrrp[0]
    assert (v.start_as_master, v.priority, v.preempt) == (True, 150, True)


def test_start_as_master_false_defaults_priority_100_no_preempt() -> None:
    v = parse(edit(MINIMAL, "start_as_master = false\n", "")).vrrp[0]
    assert (v.start_as_master, v.priority, v.preempt) == (False, 100, False)


def test_explicit_priority_and_preempt_override_defaults() -> None:
    text = edit(
        MINIMAL, "start_as_master = false", "start_as_master = true\npriority = 200\npreempt = false"
    )
    v = parse(text).vrrp[0]
    assert (v.priority, v.preempt) == (200, False)


def test_optional_vrrp_keys() -> None:
    text = MINIMAL + (
        "advert_interval = 3\npreempt_delay = 12.5\ngarp_repeat = 2\ngarp_refresh = 0\n"
    )
    v = parse(text).vrrp[0]
    assert (v.advert_interval, v.preempt_delay, v.garp_repeat, v.garp_refresh) == (3, 12.5, 2, 0)


def test_two_interfaces_and_virtual_addresses_list() -> None:
    cfg = parse(MINIMAL + WAN)
    assert [v.interface for v in cfg.vrrp] == ["lan0", "wan0"]
    assert cfg.vrrp[1].virtual_addresses == (IF("192.0.2.1/24"), IF("192.0.2.10/24"))
    assert cfg.vrrp[1].prefix_given == (True, True)


def test_virtual_address_without_prefix_is_host_until_check_system() -> None:
    v = parse(edit(MINIMAL, '"10.0.0.1/24"', '"10.0.0.1"')).vrrp[0]
    assert v.virtual_addresses == (IF("10.0.0.1/32"),)
    assert v.prefix_given == (False,)


def test_real_address_optional() -> None:
    v = parse(edit(MINIMAL, 'real_address = "10.0.0.2"\n', "")).vrrp[0]
    assert v.real_address is None


# ---- errors: key and line ----------------------------------------------------------------


def test_unknown_key_in_vrrp() -> None:
    text = edit(MINIMAL, "virtual_id = 51", "virtual_id = 51\nvirtaul_address = 1")
    assert_error(text, "vrrp[0].virtaul_address", "virtaul_address", ("unknown key",))


def test_unknown_key_in_node() -> None:
    text = edit(MINIMAL, 'name = "fw1"', 'name = "fw1"\nsocket = "/x"')
    assert_error(text, "node.socket", "socket =", ("unknown key",))


def test_unknown_top_level_key_and_table() -> None:
    assert_error("verbose = true\n" + MINIMAL, "verbose", "verbose", ("unknown key",))
    assert_error(MINIMAL + "\n[logging]\nlevel = 1\n", "logging", "[logging]", ("unknown key",))


def test_unknown_key_in_second_vrrp_table() -> None:
    text = MINIMAL + WAN + "colour = 1\n"
    assert_error(text, "vrrp[1].colour", "colour", ("unknown key",))


def test_password_longer_than_8_is_an_error_not_truncated() -> None:
    text = edit(MINIMAL, '"secret"', '"secret123"')
    err = assert_error(text, "vrrp[0].password", "password =", ("9 bytes", "truncate"))
    assert "secret123" not in str(err)


def test_password_exactly_8_is_fine() -> None:
    assert parse(edit(MINIMAL, '"secret"', '"12345678"')).vrrp[0].password == b"12345678"


def test_password_length_counts_bytes() -> None:
    # 5 characters, 10 bytes in UTF-8: what goes on the wire is bytes.
    assert_error(edit(MINIMAL, '"secret"', '"ééééé"'), "vrrp[0].password", "password", ("10 bytes",))


def test_password_empty_or_nul() -> None:
    assert_error(edit(MINIMAL, '"secret"', '""'), "vrrp[0].password", "password", ("empty",))
    assert_error(edit(MINIMAL, '"secret"', '"se\\u0000t"'), "vrrp[0].password", "password", ("NUL",))


def test_password_missing() -> None:
    text = edit(MINIMAL, 'password = "secret"\n', "")
    assert_error(text, "vrrp[0].password", "[[vrrp]]", ("exactly one",))


def test_password_and_password_file_both() -> None:
    text = edit(MINIMAL, 'password = "secret"', 'password = "secret"\npassword_file = "pw"')
    assert_error(text, "vrrp[0].password", "password =", ("exactly one",))


def _write(path: Path, data: bytes, mode: int) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


def test_password_file(tmp_path: Path) -> None:
    _write(tmp_path / "vrrp.pw", b"s3cr3t\n", 0o600)
    text = edit(MINIMAL, 'password = "secret"', 'password_file = "vrrp.pw"')
    cfg = parse(text, str(tmp_path / "invictusd.toml"))  # relative to the config's directory
    assert cfg.vrrp[0].password == b"s3cr3t"
    assert cfg.warnings == ()
    absolute = edit(MINIMAL, 'password = "secret"', f'password_file = "{tmp_path}/vrrp.pw"')
    assert parse(absolute, "/nonexistent/x.toml").vrrp[0].password == b"s3cr3t"


def test_password_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    pw = _write(tmp_path / "vrrp.pw", b"s3cr3t", 0o644)
    text = edit(MINIMAL, 'password = "secret"', 'password_file = "vrrp.pw"')
    with pytest.raises(ConfigError) as info:
        parse(text, str(tmp_path / "invictusd.toml"))
    assert (info.value.key, info.value.line) == ("vrrp[0].password_file", line_of(text, "password_file"))
    assert str(pw) in info.value.message and "chmod 600" in info.value.message
    pw.chmod(0o640)
    with pytest.raises(ConfigError):
        parse(text, str(tmp_path / "invictusd.toml"))
    pw.chmod(0o600)
    assert parse(text, str(tmp_path / "invictusd.toml")).vrrp[0].password == b"s3cr3t"


def test_secret_file_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    pw = _write(tmp_path / "vrrp.pw", b"s3cr3t", 0o600)
    os.chown(pw, 4242, 4242)
    text = edit(MINIMAL, 'password = "secret"', 'password_file = "vrrp.pw"')
    with pytest.raises(ConfigError) as info:
        parse(text, str(tmp_path / "invictusd.toml"))
    assert info.value.key == "vrrp[0].password_file" and "uid 4242" in info.value.message


def test_password_file_too_long_is_an_error(tmp_path: Path) -> None:
    _write(tmp_path / "vrrp.pw", b"123456789\n", 0o600)
    text = edit(MINIMAL, 'password = "secret"', 'password_file = "vrrp.pw"')
    with pytest.raises(ConfigError) as info:
        parse(text, str(tmp_path / "c.toml"))
    assert info.value.key == "vrrp[0].password_file"
    assert info.value.line == line_of(text, "password_file")
    assert "9 bytes" in info.value.message


def test_password_file_missing(tmp_path: Path) -> None:
    text = edit(MINIMAL, 'password = "secret"', 'password_file = "nope.pw"')
    with pytest.raises(ConfigError) as info:
        parse(text, str(tmp_path / "c.toml"))
    assert info.value.key == "vrrp[0].password_file"
    assert info.value.line == line_of(text, "password_file")
    assert "cannot read" in info.value.message
    assert str(tmp_path / "nope.pw") in info.value.message


def test_password_file_with_nul_in_name_is_a_config_error() -> None:
    text = edit(MINIMAL, 'password = "secret"', 'password_file = "a\\u0000b"')
    with pytest.raises(ConfigError) as info:
        parse(text, "/etc/invictusd.toml")
    assert info.value.key == "vrrp[0].password_file"
    assert "cannot read" in info.value.message


def test_password_credential(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path / "vrrp-pw", b"cred\n", 0o644)  # credentials dirs are private already
    text = edit(MINIMAL, 'password = "secret"', 'password_credential = "vrrp-pw"')
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    assert_error(text, "vrrp[0].password_credential", "password_credential", ("CREDENTIALS",))
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    cfg = parse(text)
    assert cfg.vrrp[0].password == b"cred"
    assert cfg.warnings == ()


@pytest.mark.parametrize("vrid", ["0", "256", "-1", "1000"])
def test_vrid_out_of_range(vrid: str) -> None:
    text = edit(MINIMAL, "virtual_id = 51", f"virtual_id = {vrid}")
    assert_error(text, "vrrp[0].virtual_id", "virtual_id", ("out of range 1..255",))


@pytest.mark.parametrize("vrid", ["1", "255"])
def test_vrid_bounds_accepted(vrid: str) -> None:
    assert parse(edit(MINIMAL, "virtual_id = 51", f"virtual_id = {vrid}")).vrrp[0].virtual_id == int(
        vrid
    )


def test_vrid_missing() -> None:
    text = edit(MINIMAL, "virtual_id = 51\n", "")
    assert_error(text, "vrrp[0].virtual_id", "[[vrrp]]", ("required",))


def test_duplicate_interface() -> None:
    text = MINIMAL + edit(WAN, '"wan0"', '"lan0"')
    assert_error(text, "vrrp[1].interface", 'interface = "lan0"', ("vrrp[0]",), occurrence=2)


def test_duplicate_vrid() -> None:
    text = MINIMAL + edit(WAN, "virtual_id = 52", "virtual_id = 51")
    assert_error(text, "vrrp[1].virtual_id", "virtual_id = 51", ("vrrp[0]",), occurrence=2)


def test_duplicate_virtual_address_across_tables() -> None:
    text = MINIMAL + edit(WAN, '"192.0.2.10/24"', '"10.0.0.1/24"')
    assert_error(text, "vrrp[1].virtual_addresses", "virtual_addresses", ("10.0.0.1",))
    text = MINIMAL + edit(
        WAN, 'virtual_addresses = ["192.0.2.1/24", "192.0.2.10/24"]', 'virtual_address = "10.0.0.1"'
    )
    assert_error(text, "vrrp[1].virtual_address", "10.0.0.1", ("10.0.0.1",), occurrence=2)


def test_start_as_master_must_match_across_tables() -> None:
    text = MINIMAL + edit(WAN, "start_as_master = false", "start_as_master = true")
    assert_error(text, "vrrp[1].start_as_master", "start_as_master = true", ("same",))


def test_missing_interface() -> None:
    text = edit(MINIMAL, 'interface = "lan0"\n', "")
    assert_error(text, "vrrp[0].interface", "[[vrrp]]", ("required",))


@pytest.mark.parametrize("name", ['""', '"a/b"', '"has space"', '"sixteen-chars-xx"'])
def test_bad_interface_name(name: str) -> None:
    text = edit(MINIMAL, '"lan0"', name)
    assert_error(text, "vrrp[0].interface", "interface =", ("not a valid interface name",))


def test_no_vrrp_table() -> None:
    err = error('[node]\nname = "x"\n')
    assert (err.key, err.line) == ("vrrp", None)


@pytest.mark.parametrize(
    ("old", "new", "key", "needle"),
    [
        ('real_address = "10.0.0.2"', 'real_address = "10.0.0.256"', "real_address", "real_address"),
        ('real_address = "10.0.0.2"', 'real_address = "fe80::1"', "real_address", "real_address"),
        ('real_address = "10.0.0.2"', "real_address = 10", "real_address", "real_address"),
        ('"10.0.0.1/24"', '"10.0.0.1/33"', "virtual_address", "virtual_address"),
        ('"10.0.0.1/24"', '"10.0.0/24"', "virtual_address", "virtual_address"),
        ('"10.0.0.1/24"', '"lan"', "virtual_address", "virtual_address"),
        ('"10.0.0.1/24"', '"10.0.0.2/24"', "virtual_address", "virtual_address"),  # = real
    ],
)
def test_bad_address(old: str, new: str, key: str, needle: str) -> None:
    assert_error(edit(MINIMAL, old, new), f"vrrp[0].{key}", needle)


def test_virtual_addresses_list_errors() -> None:
    text = MINIMAL + edit(WAN, '"192.0.2.10/24"', "5")
    assert_error(text, "vrrp[1].virtual_addresses", "virtual_addresses", ("address string",))
    text = MINIMAL + edit(WAN, '"192.0.2.10/24"', '"192.0.2.1/24"')
    assert_error(text, "vrrp[1].virtual_addresses", "virtual_addresses", ("twice",))
    text = MINIMAL + edit(WAN, '["192.0.2.1/24", "192.0.2.10/24"]', "[]")
    assert_error(text, "vrrp[1].virtual_addresses", "virtual_addresses", ("at least one",))


def test_virtual_address_and_addresses_both_or_neither() -> None:
    both = edit(MINIMAL, 'virtual_address = "10.0.0.1/24"',
                'virtual_address = "10.0.0.1/24"\nvirtual_addresses = ["10.0.0.5/24"]')
    assert_error(both, "vrrp[0].virtual_address", "virtual_address =", ("exactly one",))
    neither = edit(MINIMAL, 'virtual_address = "10.0.0.1/24"\n', "")
    assert_error(neither, "vrrp[0].virtual_address", "[[vrrp]]", ("exactly one",))


@pytest.mark.parametrize(
    ("old", "new", "key", "words"),
    [
        ("virtual_id = 51", "virtual_id = true", "virtual_id", ("must be int", "bool")),
        ("virtual_id = 51", 'virtual_id = "51"', "virtual_id", ("must be int", "str")),
        ("virtual_id = 51", "virtual_id = 51.0", "virtual_id", ("must be int", "float")),
        ("start_as_master = false", "start_as_master = 0", "start_as_master", ("must be bool",)),
        ("start_as_master = false", 'start_as_master = "no"', "start_as_master", ("must be bool",)),
        ('password = "secret"', "password = 123", "password", ("must be str",)),
        ('interface = "lan0"', "interface = ['lan0']", "interface", ("must be str",)),
        ("start_as_master = false", "start_as_master = false\npriority = true", "priority",
         ("must be int", "bool")),
        ("start_as_master = false", "start_as_master = false\npreempt_delay = true",
         "preempt_delay", ("must be int or float", "bool")),
        ("start_as_master = false", "start_as_master = false\npreempt = 1", "preempt",
         ("must be bool",)),
    ],
)
def test_type_errors(old: str, new: str, key: str, words: tuple[str, ...]) -> None:
    text = edit(MINIMAL, old, new)
    assert_error(text, f"vrrp[0].{key}", new.split("\n")[-1].split(" =")[0] + " =", words)


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ("priority = 0", "priority"),
        ("priority = 255", "priority"),
        ("advert_interval = 0", "advert_interval"),
        ("advert_interval = 256", "advert_interval"),
        ("preempt_delay = -1", "preempt_delay"),
        ("preempt_delay = nan", "preempt_delay"),
        ("preempt_delay = inf", "preempt_delay"),
        ("garp_repeat = 0", "garp_repeat"),
        ("garp_refresh = -0.5", "garp_refresh"),
    ],
)
def test_values_out_of_range(line: str, key: str) -> None:
    text = MINIMAL + line + "\n"
    assert_error(text, f"vrrp[0].{key}", line, ("out of range",))


def test_huge_number_is_a_config_error() -> None:
    text = MINIMAL + "preempt_delay = " + "9" * 400 + "\n"
    err = error(text)
    assert err.key == "vrrp[0].preempt_delay"
    assert err.line == line_of(text, "preempt_delay")


def test_integer_beyond_python_digit_limit_is_a_config_error() -> None:
    err = error(MINIMAL + "priority = " + "9" * 5000 + "\n")
    assert err.key == "toml"


def test_node_type_errors() -> None:
    assert_error(edit(MINIMAL, 'name = "fw1"', "name = 1"), "node.name", "name =", ("must be str",))
    assert_error("node = 5\n" + MINIMAL.split("\n\n", 1)[1], "node", "node =", ("must be dict",))


def test_vrrp_must_be_array_of_tables() -> None:
    err = error('vrrp = [1, 2]\n')
    assert err.key == "vrrp"
    assert "[[vrrp]]" in err.message
    assert_error('[vrrp]\ninterface = "lan0"\n', "vrrp", "[vrrp]", ("must be list",))


def test_toml_syntax_error_names_line() -> None:
    text = MINIMAL + "\npriority = = 3\n"
    err = error(text)
    assert err.key == "toml"
    assert err.line == line_of(text, "= =")


def test_toml_duplicate_key_names_line() -> None:
    text = MINIMAL + 'password = "other"\n'
    err = error(text)
    assert err.key == "toml"
    assert err.line == len(text.splitlines())


def test_error_without_line_formats_path_only() -> None:
    err = ConfigError("/x.toml", None, "vrrp", "boom")
    assert str(err) == "/x.toml: vrrp: boom"
    assert str(ConfigError("/x.toml", 7, "k", "m")) == "/x.toml:7: k: m"


# ---- [sync] ------------------------------------------------------------------------------

SYNC_NOKEY = """
[sync]
enabled = true
interface = "sync0"
peer_address = "172.31.0.2"
"""
SYNC = SYNC_NOKEY + 'key_credential = "sync-key"\n'
SYNC_KEY = b"0123456789abcdef0123456789abcdef"


@pytest.fixture(autouse=True)
def _credentials(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The key SYNC names, as a systemd credential (tests that test credentials override it)."""
    d = tmp_path_factory.getbasetemp() / "credentials"
    if not d.exists():
        d.mkdir()
        (d / "sync-key").write_bytes(SYNC_KEY)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(d))


def test_sync_disabled_is_accepted_and_ignored() -> None:
    text = MINIMAL + "\n[sync]\nenabled = false\ninterface = \"lan0\"\nmark_bit = 99\n"
    assert parse(text).sync == SyncConfig(enabled=False)
    assert parse(MINIMAL + "\n[sync]\nenabled = false\n").sync == SyncConfig(enabled=False)


def test_sync_enabled_type_error() -> None:
    text = MINIMAL + "\n[sync]\nenabled = 1\n"
    assert_error(text, "sync.enabled", "enabled", ("must be bool",))


def test_sync_enabled_minimal() -> None:
    cfg = parse(MINIMAL + SYNC)
    s = cfg.sync
    assert (s.enabled, s.interface, s.peer_address) == (True, "sync0", A("172.31.0.2"))
    assert (s.mark_bit, s.mark_mask, s.port) == (30, 1 << 30, 3781)
    assert s.key == SYNC_KEY and s.key_source == "key_credential"
    assert (s.zones, s.families, s.preempt_hold_max) == (frozenset({0}), frozenset({4}), 0.0)
    assert cfg.warnings == ()


def test_sync_without_a_key_is_refused_naming_the_key() -> None:
    """Issue 8 item 1: the key used to be derived from the VRRP password, which VRRPv2 sends
    in clear in every advert: anyone on a client segment held the sync key."""
    text = MINIMAL + SYNC_NOKEY
    assert_error(text, "sync.key_file", "[sync]", ("is required", "invictusd keygen"))


def test_sync_event_buffer_and_its_growth_limit() -> None:
    assert (parse(MINIMAL + SYNC).sync.rcvbuf_mb, parse(MINIMAL + SYNC).sync.rcvbuf_max_mb) == (64, 256)
    big = parse(MINIMAL + SYNC + "rcvbuf_mb = 512\n").sync
    assert (big.rcvbuf_mb, big.rcvbuf_max_mb) == (512, 512)  # the limit follows a larger start
    assert parse(MINIMAL + SYNC + "rcvbuf_max_mb = 1024\n").sync.rcvbuf_max_mb == 1024
    assert_error(MINIMAL + SYNC + "rcvbuf_mb = 128\nrcvbuf_max_mb = 100\n", "sync.rcvbuf_max_mb",
                 "rcvbuf_max_mb", ("below rcvbuf_mb (128)",))
    assert_error(MINIMAL + SYNC + "rcvbuf_max_mb = 4096\n", "sync.rcvbuf_max_mb", "rcvbuf_max_mb")


def test_sync_zones_and_families() -> None:
    cfg = parse(MINIMAL + SYNC + "zones = [0, 7]\nfamilies = [\"ipv4\", \"ipv6\"]\n")
    assert cfg.sync.zones == frozenset({0, 7}) and cfg.sync.families == frozenset({4, 6})
    # IPv6 virtual addresses make IPv6 replicated by default.
    v6 = edit(MINIMAL, 'virtual_address = "10.0.0.1/24"', 'virtual_addresses = ["10.0.0.1/24", "fd00::1/64"]')
    assert parse(v6 + SYNC).sync.families == frozenset({4, 6})
    assert_error(MINIMAL + SYNC + "zones = [70000]\n", "sync.zones", "zones", ("0..65535",))
    assert_error(MINIMAL + SYNC + "zones = []\n", "sync.zones", "zones", ("non-empty",))
    assert_error(MINIMAL + SYNC + 'families = ["ipx"]\n', "sync.families", "families", ("ipv4",))


def test_sync_preempt_hold_max() -> None:
    assert parse(MINIMAL + SYNC + "preempt_hold_max = 120\n").sync.preempt_hold_max == 120.0
    assert_error(MINIMAL + SYNC + "preempt_hold_max = -1\n", "sync.preempt_hold_max",
                 "preempt_hold_max", ("out of range",))


def test_sync_interface_equal_to_a_vrrp_interface() -> None:
    text = MINIMAL + edit(SYNC, '"sync0"', '"lan0"')
    assert_error(text, "sync.interface", 'interface = "lan0"', ("[[vrrp]] interface",), 2)


@pytest.mark.parametrize("bit", ["-1", "32", "64"])
def test_sync_mark_bit_out_of_range(bit: str) -> None:
    text = MINIMAL + SYNC + f"mark_bit = {bit}\n"
    assert_error(text, "sync.mark_bit", "mark_bit", ("out of range 0..31",))


def test_sync_mark_bit_bounds() -> None:
    assert parse(MINIMAL + SYNC + "mark_bit = 0\n").sync.mark_mask == 1
    assert parse(MINIMAL + SYNC + "mark_bit = 31\n").sync.mark_mask == 1 << 31


def test_sync_unknown_key_when_enabled() -> None:
    assert_error(MINIMAL + SYNC + "peer = 1\n", "sync.peer", "peer = 1", ("unknown key",))


def test_sync_missing_peer_and_bad_peer() -> None:
    text = MINIMAL + edit(SYNC, 'peer_address = "172.31.0.2"\n', "")
    assert_error(text, "sync.peer_address", "[sync]", ("required",))
    text = MINIMAL + edit(SYNC, '"172.31.0.2"', '"172.31.0"')
    assert_error(text, "sync.peer_address", "peer_address", ("not an IPv4 address",))


def test_sync_key_file(tmp_path: Path) -> None:
    _write(tmp_path / "sync.key", b"k" * 32, 0o600)
    text = MINIMAL + SYNC_NOKEY + 'key_file = "sync.key"\n'
    cfg = parse(text, str(tmp_path / "c.toml"))
    assert cfg.sync.key == b"k" * 32
    assert cfg.sync.key_source == "key_file"
    assert cfg.warnings == ()


def test_sync_key_file_exactly_16_bytes(tmp_path: Path) -> None:
    _write(tmp_path / "sync.key", b"k" * 16 + b"\n", 0o600)
    cfg = parse(MINIMAL + SYNC_NOKEY + 'key_file = "sync.key"\n', str(tmp_path / "c.toml"))
    assert cfg.sync.key == b"k" * 16


def test_sync_key_too_short(tmp_path: Path) -> None:
    _write(tmp_path / "sync.key", b"k" * 15 + b"\n", 0o600)
    text = MINIMAL + SYNC_NOKEY + 'key_file = "sync.key"\n'
    with pytest.raises(ConfigError) as info:
        parse(text, str(tmp_path / "c.toml"))
    assert info.value.key == "sync.key_file"
    assert info.value.line == line_of(text, "key_file")
    assert "15 bytes" in info.value.message


def test_sync_key_file_unreadable(tmp_path: Path) -> None:
    text = MINIMAL + SYNC_NOKEY + 'key_file = "missing.key"\n'
    with pytest.raises(ConfigError) as info:
        parse(text, str(tmp_path / "c.toml"))
    assert (info.value.key, info.value.line) == ("sync.key_file", line_of(text, "key_file"))
    assert "cannot read" in info.value.message
    # A directory cannot be read as a key either.
    (tmp_path / "d.key").mkdir()
    text = MINIMAL + SYNC_NOKEY + 'key_file = "d.key"\n'
    with pytest.raises(ConfigError) as info:
        parse(text, str(tmp_path / "c.toml"))
    assert "cannot read" in info.value.message


def test_sync_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    """Issue 8 item 4: refused, not only warned about."""
    key = _write(tmp_path / "sync.key", b"k" * 32, 0o640)
    text = MINIMAL + SYNC_NOKEY + 'key_file = "sync.key"\n'
    with pytest.raises(ConfigError) as info:
        parse(text, str(tmp_path / "c.toml"))
    assert (info.value.key, info.value.line) == ("sync.key_file", line_of(text, "key_file"))
    assert str(key) in info.value.message and "mode 0640" in info.value.message
    assert "kkkk" not in str(info.value)


def test_sync_key_file_and_credential_both() -> None:
    text = MINIMAL + SYNC_NOKEY + 'key_file = "a"\nkey_credential = "b"\n'
    assert_error(text, "sync.key_file", "key_file", ("at most one",))


# ---- load() ------------------------------------------------------------------------------


def test_load_refuses_a_world_readable_file_holding_a_password(tmp_path: Path) -> None:
    path = _write(tmp_path / "invictusd.toml", MINIMAL.encode(), 0o600)
    cfg = load(path)
    assert cfg.path == str(path)
    assert cfg.warnings == ()
    path.chmod(0o644)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert (info.value.key, info.value.line) == ("vrrp[0].password", line_of(MINIMAL, "password"))
    assert "chmod 600" in info.value.message and "secret" not in str(info.value)
    # Without an inline password the file holds no secret: readable is fine.
    pw = _write(tmp_path / "vrrp.pw", b"s3cr3t", 0o600)
    text = edit(MINIMAL, 'password = "secret"', f'password_file = "{pw}"')
    path.write_text(text)
    assert load(path).vrrp[0].password == b"s3cr3t"


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path / "absent.toml")
    assert (info.value.key, info.value.path) == ("file", str(tmp_path / "absent.toml"))
    bad = _write(tmp_path / "latin1.toml", b"name = '\xe9'\n", 0o600)
    with pytest.raises(ConfigError) as info:
        load(bad)
    assert "UTF-8" in info.value.message
    text = edit(MINIMAL, "virtual_id = 51", "virtual_id = 300")
    path = _write(tmp_path / "c.toml", text.encode(), 0o600)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value).startswith(f"{path}:{line_of(text, 'virtual_id')}: vrrp[0].virtual_id: ")


# ---- check_system ------------------------------------------------------------------------

LINKS = {
    "lo": LinkInfo("lo", (IF("127.0.0.1/8"),)),
    "lan0": LinkInfo("lan0", (IF("10.0.0.2/24"),)),
    "wan0": LinkInfo("wan0", (IF("192.0.2.2/24"),)),
    "sync0": LinkInfo("sync0", (IF("172.31.0.1/30"),)),
}


def checked(text: str, links: dict[str, LinkInfo] = LINKS) -> Config:
    return check_system(parse(text, "/etc/invictusd.toml"), links)


def system_error(text: str, links: dict[str, LinkInfo] = LINKS) -> ConfigError:
    cfg = parse(text, "/etc/invictusd.toml")
    with pytest.raises(ConfigError) as info:
        check_system(cfg, links)
    return info.value


def test_check_system_ok() -> None:
    cfg = checked(MINIMAL + WAN + SYNC)
    assert cfg.vrrp[0].real_address == A("10.0.0.2")
    assert cfg.vrrp[1].virtual_addresses == (IF("192.0.2.1/24"), IF("192.0.2.10/24"))
    assert cfg.sync.peer_address == A("172.31.0.2")


def test_check_system_missing_interface() -> None:
    err = system_error(MINIMAL + WAN, {"lan0": LINKS["lan0"]})
    assert (err.key, err.line) == ("vrrp[1].interface", line_of(MINIMAL + WAN, '"wan0"'))
    assert "no interface 'wan0'" in err.message


def test_check_system_interface_without_address() -> None:
    err = system_error(MINIMAL, {"lan0": LinkInfo("lan0", ())})
    assert err.key == "vrrp[0].interface"
    assert "no IPv4 address" in err.message
    # The virtual address itself (still there after a crash) is not an address of its own.
    err = system_error(MINIMAL, {"lan0": LinkInfo("lan0", (IF("10.0.0.1/24"),))})
    assert err.key == "vrrp[0].interface"


def test_check_system_real_address_not_on_interface() -> None:
    text = edit(MINIMAL, '"10.0.0.2"', '"10.0.0.7"')
    err = system_error(text)
    assert (err.key, err.line) == ("vrrp[0].real_address", line_of(text, "real_address"))
    assert "10.0.0.7 is not on lan0" in err.message
    assert "10.0.0.2/24" in err.message


def test_check_system_real_address_picks_first_own_address() -> None:
    links = {"lan0": LinkInfo("lan0", (IF("10.0.0.1/24"), IF("10.0.0.9/24"), IF("10.0.0.4/24")))}
    cfg = checked(edit(MINIMAL, 'real_address = "10.0.0.2"\n', ""), links)
    assert cfg.vrrp[0].real_address == A("10.0.0.9")  # 10.0.0.1 is the VIP left behind


def test_check_system_vip_not_in_subnet() -> None:
    text = edit(MINIMAL, '"10.0.0.1/24"', '"10.0.1.1/24"')
    err = system_error(text)
    assert (err.key, err.line) == ("vrrp[0].virtual_address", line_of(text, "virtual_address"))
    assert "10.0.1.1 is not in the subnet of lan0 (10.0.0.0/24)" in err.message


def test_check_system_vip_in_list_not_in_subnet() -> None:
    text = MINIMAL + edit(WAN, '"192.0.2.10/24"', '"198.51.100.1/24"')
    err = system_error(text)
    assert (err.key, err.line) == ("vrrp[1].virtual_addresses", line_of(text, "virtual_addresses"))


def test_check_system_vip_prefix_mismatch() -> None:
    text = edit(MINIMAL, '"10.0.0.1/24"', '"10.0.0.1/16"')
    err = system_error(text)
    assert err.key == "vrrp[0].virtual_address"
    assert "does not match" in err.message


def test_check_system_fills_vip_prefix_from_interface() -> None:
    text = edit(MINIMAL, '"10.0.0.1/24"', '"10.0.0.1"')
    links = {"lan0": LinkInfo("lan0", (IF("10.0.0.2/25"),))}
    cfg = checked(text, links)
    assert cfg.vrrp[0].virtual_addresses == (IF("10.0.0.1/25"),)
    assert cfg.vrrp[0].prefix_given == (True,)
    assert cfg.lines == parse(text).lines


def test_check_system_sync_interface_missing_or_without_address() -> None:
    err = system_error(MINIMAL + SYNC, {"lan0": LINKS["lan0"]})
    assert (err.key, err.line) == ("sync.interface", line_of(MINIMAL + SYNC, '"sync0"'))
    err = system_error(MINIMAL + SYNC, {"lan0": LINKS["lan0"], "sync0": LinkInfo("sync0", ())})
    assert err.key == "sync.interface"


def test_check_system_sync_peer_not_in_subnet() -> None:
    text = MINIMAL + edit(SYNC, '"172.31.0.2"', '"172.31.0.6"')
    err = system_error(text)
    assert (err.key, err.line) == ("sync.peer_address", line_of(text, "peer_address"))
    assert "172.31.0.0/30" in err.message


def test_check_system_sync_peer_is_own_address() -> None:
    text = MINIMAL + edit(SYNC, '"172.31.0.2"', '"172.31.0.1"')
    err = system_error(text)
    assert err.key == "sync.peer_address"
    assert "own address" in err.message


def test_check_system_disabled_sync_ignores_missing_interface() -> None:
    text = MINIMAL + '\n[sync]\nenabled = false\ninterface = "nope0"\n'
    assert checked(text, {"lan0": LINKS["lan0"]}).sync.enabled is False


# ---- properties --------------------------------------------------------------------------

# Relative *_file names resolve against a directory that does not exist: the fuzzer never
# reads a real file.
_FUZZ_PATH = "/nonexistent-invictusd-fuzz/c.toml"


def _parse_or_config_error(text: str) -> None:
    try:
        cfg = parse(text, _FUZZ_PATH)
    except ConfigError as e:
        assert e.path == _FUZZ_PATH
        assert e.key
        if e.line is not None:
            assert 1 <= e.line <= max(1, len(text.splitlines()) + 1)
        return
    assert isinstance(cfg, Config)
    assert len(cfg.vrrp) >= 1


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_arbitrary_text_gives_config_or_config_error(text: str) -> None:
    _parse_or_config_error(text)


toml_values = st.one_of(
    st.booleans(),
    st.integers(-(2**70), 2**70).map(str),
    st.sampled_from(["0", "1", "51", "255", "256", "1.5", "nan", "-inf", "1e400", "[]", "{}"]),
    st.text(max_size=12).map(lambda s: '"' + s.encode("unicode_escape").decode().replace('"', r"\"") + '"'),
    st.sampled_from(['"10.0.0.1/24"', '"10.0.0.1"', '"lan0"', '["10.0.0.1/24"]', '"secret"',
                     '["/bin/true"]', '"fault"', '"127.0.0.1:9842"', '["/nonexistent"]']),
).map(lambda v: str(v).lower() if isinstance(v, bool) else v)
keys = st.sampled_from(
    [
        "interface", "real_address", "virtual_address", "virtual_addresses", "virtual_id",
        "password", "password_file", "start_as_master", "priority", "preempt", "advert_interval",
        "preempt_delay", "garp_repeat", "garp_refresh", "enabled", "peer_address", "mark_bit",
        "port", "key_file", "flush_ms", "name", "bogus", "command", "weight", "fall", "rise",
        "timeout", "on_master", "listen",
    ]
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(keys, toml_values), max_size=8),
    st.sampled_from(["[[vrrp]]", "[sync]", "[node]", "[[track]]", "[hooks]", "[metrics]"]),
    st.booleans(),
)
def test_structured_fuzz_gives_config_or_config_error(
    pairs: list[tuple[str, str]], table: str, base: bool
) -> None:
    body = "".join(f"{k} = {v}\n" for k, v in dict(pairs).items())
    prefix = MINIMAL + "\n" if base else ""
    if table == "[sync]" and base:
        prefix += "[sync]\nenabled = true\n"
        body = body.replace("enabled = ", "enabled_ = ")
    _parse_or_config_error(prefix + (f"{table}\n" if table != "[sync]" or not base else "") + body)


def test_module_has_no_system_imports() -> None:
    # Loading is pure: no sockets, no pyroute2.
    src = Path(config.__file__).read_text()
    assert "import socket" not in src and "pyroute2" not in src
