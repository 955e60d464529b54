"""Configuration of VRRPv3 and unicast peers: `version`, centisecond intervals, the password
warning, IPv6 instances and `unicast_peers`; every error names the file, the line and the key.
And the plan the daemon derives from a checked configuration (instances, receivers, adverts)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Interface
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from invictusd.cli import main
from invictusd.config import Config, ConfigError, LinkInfo, check_system, parse
from invictusd.vrrp import packet, plan, v3
from invictusd.vrrp.machine import GroupMachine
from tests.unit.test_config import LINKS, MINIMAL, WAN, assert_error, edit, error, line_of

A4, A6 = IPv4Address, IPv6Address
PATH = "/etc/invictusd.toml"

V3 = """\
[[vrrp]]
interface = "lan0"
real_address = "10.0.0.2"
virtual_addresses = ["10.0.0.1/24", "fd00::1/64"]
virtual_id = 51
version = 3
advert_interval = 0.1
"""

V3_WAN = """
[[vrrp]]
interface = "wan0"
virtual_address = "192.0.2.1/24"
virtual_id = 52
version = 3
advert_interval = 0.1
"""

LINKS6 = {
    **LINKS,
    "lan0": LinkInfo("lan0", (IPv4Interface("10.0.0.2/24"),),
                     (IPv6Interface("fd00::2/64"), IPv6Interface("fe80::2/64"))),
}


def ok(text: str) -> Config:
    return parse(text, PATH)


# ---- version ------------------------------------------------------------------------------


def test_version_defaults_to_2_and_3_is_accepted() -> None:
    assert ok(MINIMAL).vrrp[0].version == 2
    cfg = ok(V3 + V3_WAN)
    assert [v.version for v in cfg.vrrp] == [3, 3]
    assert cfg.warnings == ()  # no password, nothing to warn about


@pytest.mark.parametrize(("value", "words"), [("4", ("4", "2 or 3")), ("1", ("1",)),
                                               ('"3"', ("must be int",)), ("3.0", ("must be int",))])
def test_version_errors(value: str, words: tuple[str, ...]) -> None:
    assert_error(edit(V3, "version = 3", f"version = {value}"), "vrrp[0].version", "version", words)


def test_version_must_be_equal_in_every_table() -> None:
    v2_wan = V3_WAN.replace("version = 3\n", 'version = 2\npassword = "pw"\n')
    text = V3 + v2_wan.replace("advert_interval = 0.1\n", "")
    assert_error(text, "vrrp[1].version", "version", ("differs from vrrp[0]", "one VRRP version"),
                 occurrence=2)
    # Omitted in the second table (the default 2): the error names the table's line.
    text = V3 + V3_WAN.replace("version = 3\n", 'password = "pw"\n').replace(
        "advert_interval = 0.1\n", "")
    err = error(text)
    assert err.key == "vrrp[1].version" and err.line == line_of(text, "[[vrrp]]", 2)


# ---- advert_interval ------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [("0.1", 0.1), ("0.05", 0.05), ("0.01", 0.01),
                                                   ("40.95", 40.95), ("1", 1.0), ("2.5", 2.5),
                                                   ("0.07", 0.07), ("0.29", 0.29)])
def test_v3_interval_in_centiseconds(value: str, expected: float) -> None:
    cfg = ok(edit(V3, "advert_interval = 0.1", f"advert_interval = {value}"))
    assert cfg.vrrp[0].advert_interval == expected
    assert round(cfg.vrrp[0].advert_interval * 100) * 100 == round(expected * 10000)


def test_v3_interval_default_is_one_second() -> None:
    assert ok(edit(V3, "advert_interval = 0.1\n", "")).vrrp[0].advert_interval == 1.0


@pytest.mark.parametrize(("value", "words"), [
    ("0", ("out of range 0.01..40.95",)),
    ("0.001", ("out of range",)),
    ("41", ("out of range",)),
    ("0.015", ("0.015", "whole number of centiseconds")),
    ("0.123", ("centiseconds",)),
    ("nan", ("out of range",)),
    ('"0.1"', ("must be int or float",)),
])
def test_v3_interval_errors_name_key_and_line(value: str, words: tuple[str, ...]) -> None:
    text = edit(V3, "advert_interval = 0.1", f"advert_interval = {value}")
    assert_error(text, "vrrp[0].advert_interval", "advert_interval", words)


def test_v2_refuses_fractions_and_points_at_version_3() -> None:
    text = MINIMAL + "advert_interval = 0.5\n"
    assert_error(text, "vrrp[0].advert_interval", "advert_interval",
                 ("whole number of seconds", "version = 3"))
    # Whole seconds as before, an int in the config.
    cfg = ok(MINIMAL + "advert_interval = 3\n")
    assert cfg.vrrp[0].advert_interval == 3 and isinstance(cfg.vrrp[0].advert_interval, int)


def test_v3_interval_must_be_equal_across_tables() -> None:
    text = V3 + edit(V3_WAN, "advert_interval = 0.1", "advert_interval = 0.05")
    assert_error(text, "vrrp[1].advert_interval", "advert_interval", ("differs",), occurrence=2)


@settings(max_examples=200, deadline=None)
@given(st.floats(allow_nan=True, allow_infinity=True, width=64))
def test_any_v3_interval_is_whole_centiseconds_or_an_error(value: float) -> None:
    text = edit(V3, "advert_interval = 0.1", f"advert_interval = {value!r}")  # inf, nan: TOML too
    try:
        cfg = ok(text)
    except ConfigError as e:
        assert e.key in ("vrrp[0].advert_interval", "toml")
        return
    cs = cfg.vrrp[0].advert_interval * 100
    assert 1 <= round(cs) <= 4095 and abs(cs - round(cs)) < 1e-6


# ---- password under version 3 -----------------------------------------------------------------


def test_v3_password_is_accepted_with_a_warning_naming_key_and_line() -> None:
    text = V3 + 'password = "secret"\n'
    cfg = ok(text)
    assert cfg.vrrp[0].password == b"secret"
    (w,) = cfg.warnings
    assert w.startswith(f"{PATH}:{line_of(text, 'password')}: vrrp[0].password: ")
    assert "not sent" in w and "authenticates nothing" in w and "unicast_peers" in w


def test_v3_password_still_obeys_the_rules() -> None:
    assert_error(V3 + 'password = "123456789"\n', "vrrp[0].password", "password", ("at most 8",))


def test_v3_sync_needs_a_key_file_as_v2_does() -> None:
    text = V3 + '\n[sync]\nenabled = true\ninterface = "sync0"\npeer_address = "172.31.0.2"\n'
    err = error(text)
    assert err.key == "sync.key_file" and "VRRPv3 has none" in err.message
    assert "invictusd keygen" in err.message


def test_v2_still_requires_a_password() -> None:
    assert_error(edit(MINIMAL, 'password = "secret"\n', ""), "vrrp[0].password", "[[vrrp]]")


# ---- IPv6 --------------------------------------------------------------------------------------


def test_v3_accepts_ipv6_only_tables_v2_does_not() -> None:
    only6 = edit(edit(V3, '["10.0.0.1/24", "fd00::1/64"]', '["fd00::1/64"]'),
                 'real_address = "10.0.0.2"\n', "")
    cfg = ok(only6)
    assert cfg.vrrp[0].virtual_addresses == () and cfg.vrrp[0].real_address is None
    v2 = edit(only6, "version = 3\nadvert_interval = 0.1\n", 'password = "pw"\n')
    assert_error(v2, "vrrp[0].virtual_addresses", "virtual_addresses", ("IPv4", "version = 3"))
    # A real_address without IPv4 virtual addresses has nothing to be the source of.
    with_real = edit(V3, '["10.0.0.1/24", "fd00::1/64"]', '["fd00::1/64"]')
    assert_error(with_real, "vrrp[0].real_address", "real_address", ("no IPv4 virtual",))


def test_check_system_finds_the_link_local_source() -> None:
    cfg = check_system(ok(V3), LINKS6)
    assert cfg.vrrp[0].link_local == A6("fe80::2")
    assert cfg.vrrp[0].real_address == A4("10.0.0.2")


def test_check_system_without_link_local_names_the_interface() -> None:
    links = {**LINKS, "lan0": LinkInfo("lan0", LINKS6["lan0"].addresses,
                                       (IPv6Interface("fd00::2/64"),))}
    with pytest.raises(ConfigError) as info:
        check_system(ok(V3), links)
    assert info.value.key == "vrrp[0].interface" and "link-local" in info.value.message
    assert info.value.line == line_of(V3, "interface")


def test_check_system_ipv6_only_table_needs_no_ipv4() -> None:
    only6 = edit(edit(V3, '["10.0.0.1/24", "fd00::1/64"]', '["fd00::1/64"]'),
                 'real_address = "10.0.0.2"\n', "")
    links = {"lan0": LinkInfo("lan0", (), LINKS6["lan0"].addresses6)}
    cfg = check_system(ok(only6), links)
    assert cfg.vrrp[0].link_local == A6("fe80::2")
    # ...but the IPv6 address must still be in one of the interface's IPv6 subnets.
    with pytest.raises(ConfigError) as info:
        check_system(ok(only6.replace("fd00::1/64", "fd99::1/64")), links)
    assert "fd99::1/64 is not in an IPv6 subnet" in info.value.message


# ---- unicast_peers ----------------------------------------------------------------------------


def test_unicast_peers_v2_and_v3() -> None:
    cfg = ok(MINIMAL + 'unicast_peers = ["10.0.0.3"]\n')
    assert cfg.vrrp[0].unicast_peers == (A4("10.0.0.3"),)
    cfg = ok(V3 + 'unicast_peers = ["10.0.0.3", "fe80::3"]\n')
    assert cfg.vrrp[0].unicast_peers == (A4("10.0.0.3"), A6("fe80::3"))
    assert ok(V3).vrrp[0].unicast_peers == ()


@pytest.mark.parametrize(("base", "value", "words"), [
    ("v2", '["fe80::3"]', ("VRRPv2 runs over IPv4 only",)),
    ("v3", '["10.0.0.3", "fd00::3"]', ("link-local", "fe80::")),
    ("v3", '["10.0.0.3", "fe80::3%lan0"]', ("without a scope",)),
    ("v2", "[]", ("no peer",)),
    ("v2", '["10.0.0.3", "10.0.0.3"]', ("twice",)),
    ("v2", "[3]", ("address strings",)),
    ("v2", '["10.0.0"]', ("not an IP address",)),
    ("v2", '["224.0.0.18"]', ("not a unicast",)),
    ("v2", '"10.0.0.3"', ("must be list",)),
    ("v3", '["fe80::3"]', ("no IPv4 peer",)),
    ("v3", '["10.0.0.3"]', ("no IPv6", "link-local")),
])
def test_unicast_peers_errors_name_key_and_line(base: str, value: str, words: tuple[str, ...]) -> None:
    text = (MINIMAL if base == "v2" else V3) + f"unicast_peers = {value}\n"
    assert_error(text, "vrrp[0].unicast_peers", "unicast_peers", words)


def test_address_and_peer_counts_are_bounded_by_what_the_receive_filter_checks() -> None:
    """One advert carries every address of a table, and the kernel's fast lane checks its
    checksum unrolled (and the source against each peer): the counts are bounded."""
    def vips(n4: int, n6: int) -> str:
        addrs = [f"10.1.{i // 250}.{i % 250 + 1}/16" for i in range(n4)]
        addrs += [f"fd00::{i + 1:x}/64" for i in range(n6)]
        return "virtual_addresses = [" + ", ".join(f'"{a}"' for a in addrs) + "]"

    v2 = edit(MINIMAL, 'virtual_address = "10.0.0.1/24"', "VIPS")
    v3_ = edit(V3, 'virtual_addresses = ["10.0.0.1/24", "fd00::1/64"]', "VIPS")
    assert len(ok(v2.replace("VIPS", vips(255, 0))).vrrp[0].virtual_addresses) == 255
    assert_error(v2.replace("VIPS", vips(256, 0)), "vrrp[0].virtual_addresses", "virtual_addresses",
                 ("256 IPv4", "at most 255"))
    assert len(ok(v3_.replace("VIPS", vips(1, 90))).vrrp[0].virtual_addresses6) == 90
    assert_error(v3_.replace("VIPS", vips(1, 91)), "vrrp[0].virtual_addresses", "virtual_addresses",
                 ("91 IPv6", "at most 90", "1500-byte"))
    # Under v2 IPv6 addresses ride along unadvertised: no bound of the advert's.
    assert len(ok(v2.replace("VIPS", vips(1, 91))).vrrp[0].virtual_addresses6) == 91
    peers = ", ".join(f'"10.0.0.{i}"' for i in range(3, 20))
    assert_error(MINIMAL + f"unicast_peers = [{peers}]\n", "vrrp[0].unicast_peers", "unicast_peers",
                 ("more than 16 IPv4 peers",))


def test_unicast_ipv6_peer_without_ipv6_addresses() -> None:
    text = edit(V3, '["10.0.0.1/24", "fd00::1/64"]', '["10.0.0.1/24"]')
    text += 'unicast_peers = ["10.0.0.3", "fe80::3"]\n'
    assert_error(text, "vrrp[0].unicast_peers", "unicast_peers", ("no IPv6 virtual",))


def test_v2_ipv6_passengers_need_no_ipv6_peer() -> None:
    text = edit(MINIMAL, 'virtual_address = "10.0.0.1/24"',
                'virtual_addresses = ["10.0.0.1/24", "fd00::1/64"]') + 'unicast_peers = ["10.0.0.3"]\n'
    assert ok(text).vrrp[0].unicast_peers == (A4("10.0.0.3"),)


@pytest.mark.parametrize(("peer", "words"), [("10.0.1.3", ("not on lan0's subnets", "TTL 255")),
                                             ("10.0.0.2", ("address of this node",))])
def test_check_system_unicast_peers_on_the_link(peer: str, words: tuple[str, ...]) -> None:
    text = MINIMAL + f'unicast_peers = ["{peer}"]\n'
    with pytest.raises(ConfigError) as info:
        check_system(ok(text), LINKS)
    assert info.value.key == "vrrp[0].unicast_peers"
    assert info.value.line == line_of(text, "unicast_peers")
    for w in words:
        assert w in info.value.message


def test_check_system_own_link_local_is_not_a_peer() -> None:
    text = V3 + 'unicast_peers = ["10.0.0.3", "fe80::2"]\n'
    with pytest.raises(ConfigError) as info:
        check_system(ok(text), LINKS6)
    assert info.value.key == "vrrp[0].unicast_peers"


# ---- the plan: instances, machine parameters, receivers, adverts --------------------------------


def test_plan_v2_is_one_instance_per_table_with_ipv6_passengers() -> None:
    text = edit(MINIMAL, 'virtual_address = "10.0.0.1/24"',
                'virtual_addresses = ["10.0.0.1/24", "fd00::1/64"]') + WAN
    cfg = check_system(ok(text), {**LINKS6, "wan0": LINKS["wan0"]})
    specs = plan.instances(cfg)
    assert [(s.interface, s.family, s.version) for s in specs] == [("lan0", 4, 2), ("wan0", 4, 2)]
    assert specs[0].neighbour == (A6("fd00::1"),) and specs[0].addresses == (A4("10.0.0.1"),)
    assert specs[0].destinations == (v3.GROUP4,)
    params = plan.group_params(cfg)
    assert [p.advert_interval for p in params.instances] == [1, 1]
    GroupMachine(params)


def test_plan_v3_has_one_instance_per_family_and_a_deterministic_lead() -> None:
    text = V3 + V3_WAN
    cfg = check_system(ok(text), {**LINKS6, "wan0": LINKS["wan0"]})
    specs = plan.instances(cfg)
    assert [(s.interface, s.vrid, s.family) for s in specs] == [
        ("lan0", 51, 4), ("lan0", 51, 6), ("wan0", 52, 4)]
    assert specs[1].source == A6("fe80::2") and specs[1].addresses == (A6("fd00::1"),)
    assert specs[1].destinations == (v3.GROUP6,) and specs[1].neighbour == (A6("fd00::1"),)
    assert specs[0].neighbour == () and specs[0].garp == (A4("10.0.0.1"),)
    params = plan.group_params(cfg)
    assert params.lead == 0 and all(p.version == 3 for p in params.instances)
    assert [p.advert_interval for p in params.instances] == [0.1] * 3
    GroupMachine(params)


def test_plan_receivers_and_adverts_per_destination() -> None:
    text = V3 + 'unicast_peers = ["10.0.0.3", "fe80::3"]\npassword = "pw"\n'
    cfg = check_system(ok(text), LINKS6)
    s4, s6 = plan.instances(cfg)
    r4 = plan.receiver(cfg, s4)
    assert (r4.version, r4.own, r4.peers) == (3, A4("10.0.0.2"), frozenset({A4("10.0.0.3")}))
    assert plan.receiver(cfg, s6).peers == frozenset({A6("fe80::3")})
    (msg, dst), = plan.advert(cfg, s4, 100)
    assert dst == A4("10.0.0.3")
    assert v3.decode(msg, A4("10.0.0.2"), dst) == v3.AdvertisementV3(51, 100, (A4("10.0.0.1"),), 10)
    (msg6, dst6), = plan.advert(cfg, s6, 0)
    assert v3.decode(msg6, A6("fe80::2"), dst6).priority == 0
    assert b"pw" not in msg and b"pw" not in msg6  # the password is never sent under v3


def test_plan_v2_advert_carries_the_password_and_goes_to_each_peer() -> None:
    text = MINIMAL + 'unicast_peers = ["10.0.0.3", "10.0.0.4"]\n'
    cfg = check_system(ok(text), LINKS)
    (spec,) = plan.instances(cfg)
    adverts = plan.advert(cfg, spec, 100)
    assert [d for _, d in adverts] == [A4("10.0.0.3"), A4("10.0.0.4")]
    assert adverts[0][0] == adverts[1][0]  # no pseudo-header in v2: one message for all
    assert packet.decode(adverts[0][0]).auth_data == b"secret"


# ---- `invictusd check` ------------------------------------------------------------------------


def test_check_warns_that_a_v3_password_authenticates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = V3 + 'password = "secret"\n'
    path = tmp_path / "invictusd.toml"
    path.write_text(text)
    path.chmod(0o600)
    assert main(["check", "--config", str(path)]) == 0  # accepted: a warning, not an error
    out = capsys.readouterr()
    assert "OK: group of 1" in out.out
    warning = next(line for line in out.err.splitlines() if "password" in line)
    assert warning.startswith(f"invictusd: warning: {path}:{line_of(text, 'password')}: "
                              "vrrp[0].password: VRRPv3 has no authentication")
    assert "not sent" in warning and "unicast_peers" in warning and "secret" not in warning
