"""Secrets in the configuration: where they may come from, what is refused, what is warned.

The namespace side (secrets never in logs, status, tables or the SIGUSR2 dump of a running
daemon) is in tests/netns/test_hostile.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from invictusd.config import MAX_SECRET_FILE, ConfigError, load, parse
from tests.timeouts import no_hang

PASSWORD = "pw-8chr!"
KEY = b"k" * 16 + b"-sync-key-material"

BASE = f"""\
[node]
name = "fw1"
control_socket = "/run/x.sock"

[[vrrp]]
interface = "lan0"
virtual_address = "10.0.0.1/24"
virtual_id = 51
password = "{PASSWORD}"

[sync]
enabled = true
interface = "sync0"
peer_address = "10.9.0.2"
"""


def _with_key(path: str) -> str:
    return BASE + f'key_file = "{path}"\n'


def test_key_file_readable_by_group_is_refused_and_private_one_is_read(tmp_path: Path) -> None:
    key = tmp_path / "sync.key"
    key.write_bytes(KEY + b"\n")
    key.chmod(0o640)
    with pytest.raises(ConfigError) as info:
        parse(_with_key(str(key)), str(tmp_path / "c.toml"))
    assert info.value.key == "sync.key_file" and str(key) in info.value.message
    key.chmod(0o600)
    cfg = parse(_with_key(str(key)), str(tmp_path / "c.toml"))
    assert cfg.sync.key == KEY and cfg.sync.key_source == "key_file"


def test_config_file_with_a_password_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "invictusd.toml"
    path.write_text(_with_key("/nonexistent/key"))
    path.chmod(0o644)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.key == "vrrp[0].password" and "readable" in info.value.message
    assert PASSWORD not in str(info.value)


@pytest.mark.parametrize("value", ["87654321", "true", "[1, 2]", "{ a = 1 }", "1.5"])
def test_a_password_of_the_wrong_type_is_not_echoed(value: str) -> None:
    """Issue 8 item 4: `password: must be str, got int 87654321` printed the secret."""
    with pytest.raises(ConfigError) as info:
        parse(BASE.replace(f'"{PASSWORD}"', value))
    assert info.value.key == "vrrp[0].password" and "must be str" in info.value.message
    assert value not in str(info.value) and "87654321" not in str(info.value)


def test_key_credential_is_read_from_the_credentials_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "sync-key").write_bytes(KEY)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    cfg = parse(BASE + 'key_credential = "sync-key"\n')
    assert cfg.sync.key == KEY and cfg.sync.key_source == "key_credential"


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom"])
def test_a_device_as_key_file_is_refused_not_read_forever(device: str) -> None:
    """/dev/zero used to be read to the end: memory without bound, a daemon that never starts."""
    with no_hang(10, "config loading"), pytest.raises(ConfigError) as info:
        parse(_with_key(device))
    assert info.value.key == "sync.key_file"
    assert "regular file" in info.value.message


def test_a_fifo_as_password_file_is_refused_not_waited_on(tmp_path: Path) -> None:
    fifo = tmp_path / "pw"
    os.mkfifo(fifo)
    text = BASE.replace(f'password = "{PASSWORD}"', f'password_file = "{fifo}"')
    with no_hang(10, "config loading"), pytest.raises(ConfigError) as info:
        parse(text)
    assert info.value.key == "vrrp[0].password_file"


def test_an_oversized_key_file_is_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.key"
    big.write_bytes(b"x" * (MAX_SECRET_FILE + 1))
    big.chmod(0o600)
    with pytest.raises(ConfigError, match="over"):
        parse(_with_key(str(big)))
    big.write_bytes(b"x" * MAX_SECRET_FILE)
    assert len(parse(_with_key(str(big))).sync.key) == MAX_SECRET_FILE


def test_secrets_are_not_in_the_repr_of_the_config(tmp_path: Path) -> None:
    key = tmp_path / "k"
    key.write_bytes(KEY)
    key.chmod(0o600)
    cfg = parse(_with_key(str(key)))
    text = repr(cfg) + repr(cfg.vrrp) + repr(cfg.sync) + str(cfg.vrrp[0]) + str(cfg.sync)
    for secret in (PASSWORD, PASSWORD.encode().hex(), KEY.decode(), KEY.hex()):
        assert secret not in text


def test_errors_about_a_secret_do_not_quote_it() -> None:
    long_pw = "toolong-password-1234"
    with pytest.raises(ConfigError) as info:
        parse(BASE.replace(PASSWORD, long_pw))
    assert long_pw not in str(info.value)
    with pytest.raises(ConfigError) as info:
        parse(BASE.replace(f'password = "{PASSWORD}"', f'password = "{PASSWORD}\\u0000"'))
    assert PASSWORD not in str(info.value)
