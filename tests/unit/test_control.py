"""The control socket (issue 8 item 10): every request gets a reply, none stalls the loop."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time
from pathlib import Path
from typing import Any

from invictusd import control


async def _ask(path: str, raw: bytes) -> dict[str, Any]:
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(raw)
    await writer.drain()
    data = await reader.read()
    writer.close()
    reply: dict[str, Any] = json.loads(data)
    return reply


def _serve_and(tmp_path: Path, handler: control.Handler, body: Any) -> Any:
    async def go() -> Any:
        path = str(tmp_path / "c.sock")
        server = await control.serve(path, handler)
        try:
            return await body(path)
        finally:
            server.close()

    return asyncio.run(go())


async def _echo(cmd: str, request: dict[str, Any]) -> dict[str, Any]:
    return {"ok": True, "cmd": cmd}


def test_malformed_requests_get_an_error_reply_not_a_traceback(tmp_path: Path) -> None:
    cases = {
        b"{not json\n": "not JSON",
        b"[" * 100_000 + b"\n": "longer than",
        b"[" * 2000 + b"]" * 2000 + b"\n": "nested too deeply",
        b"[" * 500 + b"]" * 500 + b"\n": "string field cmd",
        b'{"cmd": 5}\n': "string field cmd",
        b"\xff\xfe\n": "",
        b"x" * 10_000 + b"\n": "longer than",
        b'{"a":' * 600 + b"1" + b"}" * 600 + b"\n": "string field cmd",
    }

    async def body(path: str) -> dict[bytes, dict[str, Any]]:
        return {raw: await _ask(path, raw) for raw in cases}

    replies = _serve_and(tmp_path, _echo, body)
    for raw, reply in replies.items():
        if cases[raw]:
            assert reply["ok"] is False and cases[raw] in reply["error"], (raw[:20], reply)
    # a nesting deeper than the JSON parser's recursion limit
    too_deep = b'{"cmd": "x", "a": ' + b"[" * 100_000 + b"\n"
    assert _serve_and(tmp_path, _echo, lambda p: _ask(p, too_deep))["ok"] is False


def test_plain_words_and_json_requests(tmp_path: Path) -> None:
    async def body(path: str) -> list[dict[str, Any]]:
        return [await _ask(path, b"status\n"), await _ask(path, b'{"cmd": "reload"}\n')]

    assert _serve_and(tmp_path, _echo, body) == [{"ok": True, "cmd": "status"},
                                                   {"ok": True, "cmd": "reload"}]


def test_concurrent_requests_are_capped(tmp_path: Path) -> None:
    release = asyncio.Event()

    async def slow(cmd: str, request: dict[str, Any]) -> dict[str, Any]:
        await release.wait()
        return {"ok": True}

    async def body(path: str) -> list[dict[str, Any]]:
        held = [asyncio.ensure_future(_ask(path, b"status\n")) for _ in range(control.MAX_CLIENTS)]
        await asyncio.sleep(0.2)
        refused = await _ask(path, b"status\n")
        release.set()
        return [refused, *await asyncio.gather(*held)]

    refused, *served = _serve_and(tmp_path, slow, body)
    assert refused["ok"] is False and "busy" in refused["error"]
    assert all(r["ok"] for r in served)


def test_a_huge_reply_is_serialised_without_stalling_the_loop(tmp_path: Path) -> None:
    """`tables` of 250k+250k flows used to be turned into JSON on the loop (3.6 s)."""
    big = {"ok": True, "local": [{"orig": ["10.0.0.1", "10.0.0.2", i, 443]} for i in range(250_000)],
           "peer": [{"orig": ["10.0.0.1", "10.0.0.2", i, 443]} for i in range(250_000)]}

    async def huge(cmd: str, request: dict[str, Any]) -> dict[str, Any]:
        return big

    async def body(path: str) -> tuple[float, int]:
        worst = 0.0
        done = False

        async def probe() -> None:
            nonlocal worst
            while not done:
                t0 = time.perf_counter()
                await asyncio.sleep(0.001)
                worst = max(worst, time.perf_counter() - t0 - 0.001)

        p = asyncio.ensure_future(probe())
        # The client in another process: parsing 500k flows here would be the stall.
        code = ("import sys; from invictusd import control; "
                "print(len(control.request(sys.argv[1], 'tables', timeout=60)['local']))")
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code, path,
                                                    stdout=asyncio.subprocess.PIPE)
        out, _ = await proc.communicate()
        done = True
        await p
        return worst, int(out)

    worst, n = _serve_and(tmp_path, huge, body)
    assert n == 250_000
    # The GIL is handed back every 5 ms (sys.getswitchinterval); a serialisation on the
    # loop would block it for the whole dump (> 0.5 s here).
    assert worst < 0.1, f"the loop was blocked {worst * 1000:.0f} ms"


def test_blocking_client_helper(tmp_path: Path) -> None:
    async def go() -> None:
        path = str(tmp_path / "c.sock")
        server = await control.serve(path, _echo)
        loop = asyncio.get_running_loop()
        reply = await loop.run_in_executor(None, control.request, path, "status")
        assert reply == {"ok": True, "cmd": "status"}
        server.close()

    asyncio.run(go())
    s = socket.socket(socket.AF_UNIX)
    s.close()
