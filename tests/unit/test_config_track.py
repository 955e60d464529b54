"""Configuration of issue 11: every error of a file in one run (with the closest known key for
a misspelt one), and the [[track]], [hooks] and [metrics] tables with their bad inputs."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from invictusd.config import (
    ConfigError,
    HooksConfig,
    LinkInfo,
    MetricsConfig,
    TrackConfig,
    check_system,
    load,
    parse,
)
from tests.unit.test_config import IF, LINKS, MINIMAL, WAN, edit, line_of

PATH = "/etc/invictusd.toml"
TRUE = "/bin/true"


def errors(text: str) -> list[tuple[str, int | None, str]]:
    with pytest.raises(ConfigError) as info:
        parse(text, PATH)
    return [(e.key, e.line, e.message) for e in info.value.errors]


def one_error(text: str, key: str, needle: str, *words: str) -> str:
    found = errors(text)
    assert [(k, line) for k, line, _ in found] == [(key, line_of(text, needle))], found
    for w in words:
        assert w in found[0][2], found[0][2]
    return found[0][2]


# ---- every error in one run --------------------------------------------------------------


def test_the_issues_example_reports_both_errors_with_lines_and_a_suggestion() -> None:
    text = edit(edit(MINIMAL, "virtual_id = 51", "virtual_id = 300"),
                "start_as_master = false", "start_as_mastr = false")
    found = errors(text)
    assert found == [
        ("vrrp[0].virtual_id", line_of(text, "virtual_id"), "300 is out of range 1..255"),
        ("vrrp[0].start_as_mastr", line_of(text, "start_as_mastr"),
         'unknown key; did you mean "start_as_master"?'),
    ]
    with pytest.raises(ConfigError) as info:
        parse(text, PATH)
    # The exception names the first error in its own fields and lists all in its text.
    assert info.value.key == "vrrp[0].virtual_id"
    assert str(info.value).splitlines() == [
        f"{PATH}:{line_of(text, 'virtual_id')}: vrrp[0].virtual_id: 300 is out of range 1..255",
        f"{PATH}:{line_of(text, 'start_as_mastr')}: vrrp[0].start_as_mastr: unknown key; "
        'did you mean "start_as_master"?',
    ]


def test_errors_across_tables_come_in_file_order() -> None:
    text = (
        '[node]\nname = 7\n\n'
        + MINIMAL.split("\n\n", 1)[1]
        + edit(edit(WAN, "virtual_id = 52", "virtual_id = 51"), '"secret"', '"far too long"')
        + "\n[sync]\nenabled = true\ninterface = \"lan0\"\npeer_addres = \"10.9.0.2\"\n"
        + "\n[metrics]\nlisten = \"localhost\"\n"
    )
    found = errors(text)
    assert [k for k, _, _ in found] == [
        "node.name", "vrrp[1].password", "sync.peer_address", "sync.key_file",
        "sync.interface", "sync.peer_addres", "metrics.listen",
    ]
    # A missing key has the line of its table.
    assert [line for _, line, _ in found] == [
        2, line_of(text, "far too long"), line_of(text, "[sync]"), line_of(text, "[sync]"),
        line_of(text, 'interface = "lan0"', 2), line_of(text, "peer_addres"),
        line_of(text, "localhost")]
    # vrrp[1]'s duplicate VRID is found once its own error is fixed.
    fixed = text.replace("far too long", "secret")
    assert "vrrp[1].virtual_id" in [k for k, _, _ in errors(fixed)]


def test_misspelt_table_and_keys_get_the_closest_suggestion() -> None:
    msgs = {k: m for k, _, m in errors(MINIMAL + "\n[snyc]\nenabled = false\n[hook]\n"
                                       "on_master = []\n")}
    assert msgs["snyc"] == 'unknown key; did you mean "sync"?'
    assert msgs["hook"] == 'unknown key; did you mean "hooks"?'
    far = errors(MINIMAL + "zebra = 1\n")
    assert far[0][2] == "unknown key (see README)"


def test_one_error_per_key_no_follow_on_noise() -> None:
    # A missing required key is one error, not also "not a valid interface name".
    text = edit(MINIMAL, 'interface = "lan0"\n', "")
    assert [k for k, _, _ in errors(text)] == ["vrrp[0].interface"]
    text = edit(MINIMAL, "virtual_id = 51", 'virtual_id = "51"')
    assert errors(text) == [("vrrp[0].virtual_id", line_of(text, "virtual_id"),
                             "must be int, got str '51'")]


def test_a_bad_table_is_not_compared_with_the_others() -> None:
    # vrrp[1] has an error of its own; it is not also reported as disagreeing with vrrp[0].
    text = MINIMAL + edit(WAN, "virtual_id = 52", "virtual_id = 0")
    assert [k for k, _, _ in errors(text)] == ["vrrp[1].virtual_id"]


def test_load_raises_one_exception_carrying_the_list(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text(edit(edit(MINIMAL, "virtual_id = 51", "virtual_id = 0"), "lan0", "lan 0"))
    p.chmod(0o600)
    with pytest.raises(ConfigError) as info:
        load(p)
    assert [e.key for e in info.value.errors] == ["vrrp[0].interface", "vrrp[0].virtual_id"]
    assert all(e.path == str(p) for e in info.value.errors)


def test_check_system_reports_every_interface_problem(tmp_path: Path) -> None:
    key = tmp_path / "sync.key"
    key.write_text("k" * 32)
    key.chmod(0o600)
    text = MINIMAL + WAN + ('\n[sync]\nenabled = true\ninterface = "sync9"\n'
                            f'peer_address = "10.9.0.2"\nkey_file = "{key}"\n')
    cfg = parse(text, PATH)
    with pytest.raises(ConfigError) as info:
        check_system(cfg, {"lo": LINKS["lo"]})
    assert [e.key for e in info.value.errors] == [
        "vrrp[0].interface", "vrrp[1].interface", "sync.interface"]


# ---- [[track]] ---------------------------------------------------------------------------

ISSUE_TRACK = f"""
[[track]]
command = ["{TRUE}", "wan0"]
interval = 2
timeout = 1
fall = 2
rise = 2
weight = "fault"
[[track]]
interface = "wan1"
weight = -60
"""


def test_the_issues_track_shape() -> None:
    cfg = parse(MINIMAL + ISSUE_TRACK, PATH)
    assert cfg.track == (
        TrackConfig(name="true", command=(TRUE, "wan0"), interval=2.0, timeout=1.0, fall=2,
                    rise=2, weight=None),
        TrackConfig(name="wan1", interface="wan1", weight=-60),
    )


def test_track_defaults_and_path_lookup() -> None:
    cfg = parse(MINIMAL + '[[track]]\ncommand = ["true"]\nname = "always"\n', PATH)
    t = cfg.track[0]
    assert os.path.isabs(t.command[0]) and t.command[0].endswith("/true")
    assert (t.name, t.interval, t.timeout, t.fall, t.rise, t.weight) == (
        "always", 2.0, 2.0, 2, 2, None)


@pytest.mark.parametrize("weight", ["-254", "254", "0", "-60", '"fault"'])
def test_track_weight_bounds_accepted(weight: str) -> None:
    cfg = parse(MINIMAL + f'[[track]]\ninterface = "wan1"\nweight = {weight}\n', PATH)
    assert cfg.track[0].weight == (None if weight == '"fault"' else int(weight))


@pytest.mark.parametrize(("weight", "words"), [
    ("255", ("255 is out of range -254..254",)),
    ("-255", ("out of range",)),
    ('"faulty"', ('must be "fault" or an integer',)),
    ("true", ('must be "fault" or an integer',)),
    ("1.5", ('must be "fault" or an integer',)),
])
def test_track_weight_out_of_range_is_an_error(weight: str, words: tuple[str, ...]) -> None:
    text = MINIMAL + f'[[track]]\ninterface = "wan1"\nweight = {weight}\n'
    one_error(text, "track[0].weight", "weight", *words)


def test_track_unknown_command_is_an_error() -> None:
    text = MINIMAL + '[[track]]\ncommand = ["/usr/local/sbin/no-such-check-xyz"]\n'
    one_error(text, "track[0].command", "command", "no-such-check-xyz", "no such file")
    text = MINIMAL + '[[track]]\ncommand = ["no-such-check-xyz"]\n'
    one_error(text, "track[0].command", "command", "not found in PATH")
    text = MINIMAL + '[[track]]\ncommand = ["bin/true"]\n'
    one_error(text, "track[0].command", "command", "absolute path")


def test_track_non_executable_command_is_an_error(tmp_path: Path) -> None:
    script = tmp_path / "check.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o644)
    text = MINIMAL + f'[[track]]\ncommand = ["{script}"]\n'
    one_error(text, "track[0].command", "command", "not an executable file")
    script.chmod(0o755)
    assert parse(text, PATH).track[0].command == (str(script),)
    text = MINIMAL + f'[[track]]\ncommand = ["{tmp_path}"]\n'  # a directory
    one_error(text, "track[0].command", "command", "not an executable file")


@pytest.mark.parametrize(("body", "key", "needle", "words"), [
    ("command = []", "command", "command", ("non-empty list",)),
    ('command = "/bin/true"', "command", "command", ("must be list",)),
    ("command = [1]", "command", "command", ("non-empty list of strings",)),
    ('name = "x"', "command", "[[track]]", ("exactly one of command or interface",)),
    (f'command = ["{TRUE}"]\ninterface = "wan1"', "command", "command =", ("exactly one",)),
    ('interface = "wan1"\ninterval = 2', "interval", "interval", ("only for command checks",)),
    ('interface = "wan1"\nfall = 2', "fall", "fall", ("only for command checks",)),
    ('interface = "not a name"', "interface", "not a name", ("not a valid interface name",)),
    (f'command = ["{TRUE}"]\ninterval = 0', "interval", "interval", ("out of range",)),
    (f'command = ["{TRUE}"]\ninterval = 1\ntimeout = 2', "timeout", "timeout", ("exceeds",)),
    (f'command = ["{TRUE}"]\nfall = 0', "fall", "fall", ("out of range 1..100",)),
    (f'command = ["{TRUE}"]\nrise = "2"', "rise", "rise", ("must be int",)),
    (f'command = ["{TRUE}"]\nwieght = 5', "wieght", "wieght", ('did you mean "weight"?',)),
    (f'command = ["{TRUE}"]\nname = ""', "name", 'name = ""', ("1..64",)),
])
def test_track_errors_name_the_key(body: str, key: str, needle: str, words: tuple[str, ...]) -> None:
    text = MINIMAL + "\n[[track]]\n" + body + "\n"
    one_error(text, f"track[0].{key}", needle, *words)


def test_track_names_must_be_unique() -> None:
    text = MINIMAL + ISSUE_TRACK + f'[[track]]\ncommand = ["{TRUE}", "wan1"]\n'
    found = errors(text)
    assert [(k, m.split(";")[0]) for k, _, m in found] == [
        ("track[2].name", "'true' is also the name of track[0]")]
    assert found[0][1] == line_of(text, "[[track]]", 3)


def test_track_must_be_tables() -> None:
    text = "track = [1]\n" + MINIMAL
    one_error(text, "track", "track =", "[[track]]")


def test_check_system_warns_about_a_missing_tracked_interface() -> None:
    text = MINIMAL + ISSUE_TRACK
    cfg = check_system(parse(text, PATH), {**LINKS, "lan0": LinkInfo("lan0", (IF("10.0.0.2/24"),))})
    (warning,) = cfg.warnings
    line = line_of(text, 'interface = "wan1"')
    assert f"{PATH}:{line}: track[1].interface" in warning
    assert cfg.track == parse(text, PATH).track  # check_system keeps the new tables


# ---- [hooks] -----------------------------------------------------------------------------


def test_hooks_table() -> None:
    text = MINIMAL + f"""
[hooks]
on_master = ["{TRUE}", "up"]
on_backup = ["true"]
on_fault  = ["{TRUE}", "fault"]
on_stop   = ["{TRUE}"]
timeout = 5
"""
    h = parse(text, PATH).hooks
    assert h.on_master == (TRUE, "up") and h.on_fault == (TRUE, "fault")
    assert os.path.isabs(h.on_backup[0]) and h.timeout == 5.0
    assert parse(MINIMAL, PATH).hooks == HooksConfig()


@pytest.mark.parametrize(("body", "key", "words"), [
    ('on_master = ["/usr/local/sbin/vip-up-missing"]', "on_master", ("no such file",)),
    ("on_backup = []", "on_backup", ("non-empty list",)),
    ('on_fault = "/bin/true"', "on_fault", ("must be list",)),
    ("timeout = 0", "timeout", ("out of range",)),
    (f'on_mastr = ["{TRUE}"]', "on_mastr", ('did you mean "on_master"?',)),
])
def test_hook_errors_name_the_key(body: str, key: str, words: tuple[str, ...]) -> None:
    text = MINIMAL + "\n[hooks]\n" + body + "\n"
    one_error(text, f"hooks.{key}", body.split(" ")[0], *words)


def test_hook_path_missing_and_track_error_in_one_run() -> None:
    text = MINIMAL + ISSUE_TRACK.replace("-60", "-300") + (
        '\n[hooks]\non_master = ["/nonexistent/vip-up"]\non_stop = ["/nonexistent/vip-down"]\n')
    assert [k for k, _, _ in errors(text)] == [
        "track[1].weight", "hooks.on_master", "hooks.on_stop"]


# ---- [metrics] ---------------------------------------------------------------------------


@pytest.mark.parametrize(("listen", "host", "port"), [
    ("127.0.0.1:9842", "127.0.0.1", 9842), ("[::1]:9842", "::1", 9842),
    ("0.0.0.0:1", "0.0.0.0", 1), ("[::]:65535", "::", 65535),
])
def test_metrics_listen(listen: str, host: str, port: int) -> None:
    m = parse(MINIMAL + f'[metrics]\nlisten = "{listen}"\n', PATH).metrics
    assert m == MetricsConfig(listen, host, port)


def test_metrics_absent_means_no_listener() -> None:
    assert parse(MINIMAL, PATH).metrics == MetricsConfig()


@pytest.mark.parametrize("listen", [
    "localhost:9842", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:65536", "::1:9842", "[::1]",
    "127.0.0.1:http", "300.0.0.1:80",
])
def test_metrics_bad_listen(listen: str) -> None:
    text = MINIMAL + f'[metrics]\nlisten = "{listen}"\n'
    one_error(text, "metrics.listen", "listen", "give an address and a port")


def test_mode_bits_of_a_hook_checked_not_assumed(tmp_path: Path) -> None:
    hook = tmp_path / "vip-up"
    hook.write_text("#!/bin/sh\n")
    hook.chmod(stat.S_IRUSR)
    text = MINIMAL + f'[hooks]\non_master = ["{hook}"]\n'
    one_error(text, "hooks.on_master", "on_master", "not an executable file")
