"""Unix control socket: one JSON request line in, one JSON reply line out.

Requests: {"cmd": "status"}, {"cmd": "step-down"}, {"cmd": "resume"}, {"cmd": "reload"},
{"cmd": "tables"}, {"cmd": "memory"} (``invictusd.memtrace``). A plain word ("status\\n") is
accepted too, for humans with socat.

Whatever arrives gets a reply, never a traceback: a line over ``MAX_REQUEST`` bytes, bytes
that are not JSON, JSON nested deeper than the parser will go, a request without a string
``cmd``. At most ``MAX_CLIENTS`` requests are served at once; more are refused with a reply.
Large replies are encoded in pieces, giving the loop back between them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

Handler = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]
MAX_REQUEST = 4096
MAX_CLIENTS = 8
REQUEST_TIMEOUT = 5.0
# Long lists in a reply (tables of 100k flows) are encoded this many items at a time.
_CHUNK = 1000


async def serve(path: str, handler: Handler) -> asyncio.AbstractServer:
    os.makedirs(os.path.dirname(path) or ".", mode=0o750, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    busy = 0

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal busy
        refuse = busy >= MAX_CLIENTS
        busy += 1
        try:
            reply: dict[str, Any]
            try:
                line = await asyncio.wait_for(reader.readline(), timeout=REQUEST_TIMEOUT)
            except (TimeoutError, ConnectionError):
                reply = {"ok": False, "error": "no request received"}
            except (asyncio.LimitOverrunError, ValueError):
                reply = {"ok": False, "error": f"request longer than {MAX_REQUEST} bytes"}
            else:
                if refuse:
                    reply = {"ok": False, "error": f"busy: {MAX_CLIENTS} requests under way"}
                else:
                    reply = await dispatch(line, handler)
            await _send(writer, reply)
        finally:
            busy -= 1

    server = await asyncio.start_unix_server(on_client, path=path, limit=MAX_REQUEST)
    os.chmod(path, 0o660)
    return server


async def _send(writer: asyncio.StreamWriter, reply: dict[str, Any]) -> None:
    try:
        async for chunk in _encode(reply):
            writer.write(chunk)
            await writer.drain()
        writer.write(b"\n")
        await writer.drain()
    except (ConnectionError, RuntimeError):
        pass
    finally:
        writer.close()


async def _encode(reply: dict[str, Any]) -> AsyncIterator[bytes]:
    """JSON of ``reply`` in pieces, giving the loop back between them: json's C encoder holds
    the GIL until it is done, so a thread would not help with a reply of 500k flows."""
    yield b"{"
    for i, (key, value) in enumerate(reply.items()):
        yield (", " if i else "").encode() + json.dumps(key).encode() + b": "
        if isinstance(value, list) and len(value) > _CHUNK:
            yield b"["
            for start in range(0, len(value), _CHUNK):
                part = json.dumps(value[start : start + _CHUNK])[1:-1]
                yield ((", " if start else "") + part).encode()
                await asyncio.sleep(0)
            yield b"]"
        else:
            yield json.dumps(value).encode()
    yield b"}"


async def dispatch(line: bytes, handler: Handler) -> dict[str, Any]:
    if len(line) > MAX_REQUEST:
        return {"ok": False, "error": f"request longer than {MAX_REQUEST} bytes"}
    text = line.decode("utf-8", "replace").strip()
    try:
        request = json.loads(text) if text.startswith(("{", "[")) else {"cmd": text}
    except json.JSONDecodeError as e:
        return {"ok": False, "error": f"request is not JSON: {e}"}
    except RecursionError:
        return {"ok": False, "error": "request is nested too deeply"}
    if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
        return {"ok": False, "error": "request needs a string field cmd"}
    return await handler(request["cmd"], request)


def request(path: str, cmd: str, timeout: float = 5.0, **fields: Any) -> dict[str, Any]:
    """Blocking client used by ``invictusd status`` and tests."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(json.dumps({"cmd": cmd, **fields}).encode() + b"\n")
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    reply: dict[str, Any] = json.loads(b"".join(chunks))
    return reply
