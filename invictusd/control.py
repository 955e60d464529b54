"""Unix control socket: one JSON request line in, one JSON reply line out.

Requests: {"cmd": "status"}, {"cmd": "step-down"}, {"cmd": "resume"}, {"cmd": "reload"}.
A plain word ("status\\n") is accepted too, for humans with socat.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

Handler = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]
MAX_REQUEST = 4096


async def serve(path: str, handler: Handler) -> asyncio.AbstractServer:
    os.makedirs(os.path.dirname(path) or ".", mode=0o750, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), timeout=5)
            reply = await _dispatch(line[:MAX_REQUEST], handler)
        except (TimeoutError, ConnectionError):
            reply = {"ok": False, "error": "no request received"}
        try:
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_unix_server(on_client, path=path)
    os.chmod(path, 0o660)
    return server


async def _dispatch(line: bytes, handler: Handler) -> dict[str, Any]:
    text = line.decode("utf-8", "replace").strip()
    try:
        request = json.loads(text) if text.startswith("{") else {"cmd": text}
    except json.JSONDecodeError as e:
        return {"ok": False, "error": f"request is not JSON: {e}"}
    if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
        return {"ok": False, "error": "request needs a string field cmd"}
    return await handler(request["cmd"], request)


def request(path: str, cmd: str, timeout: float = 5.0) -> dict[str, Any]:
    """Blocking client used by ``invictusd status`` and tests."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(json.dumps({"cmd": cmd}).encode() + b"\n")
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    reply: dict[str, Any] = json.loads(b"".join(chunks))
    return reply
