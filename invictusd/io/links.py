"""Interfaces and addresses through pyroute2, from one dedicated thread.

pyroute2's synchronous IPRoute is used from a single-thread executor: its asyncio sockets do
not work under uvloop, and one long-lived handle avoids re-opening a netlink socket per call.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from invictusd.config import LinkInfo

IPv4If = ipaddress.IPv4Interface
IPv6If = ipaddress.IPv6Interface
Address = IPv4If | IPv6If
IFA_F_NODAD = 0x02
IFF_UP = 0x1
IFF_LOWER_UP = 0x10000


class Links:
    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pyroute2")
        self._ipr: Any = None

    async def _call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _open(self) -> Any:
        if self._ipr is None:
            from pyroute2 import IPRoute  # imported lazily: 0.2 s, and only this thread uses it

            self._ipr = IPRoute()
        return self._ipr

    def _snapshot(self) -> tuple[dict[str, LinkInfo], dict[str, int], dict[str, bool]]:
        ipr = self._open()
        names: dict[int, str] = {}
        up: dict[str, bool] = {}
        for link in ipr.get_links():
            name = link.get("IFLA_IFNAME")
            names[link["index"]] = name
            flags = link["flags"]
            up[name] = bool(flags & IFF_UP) and bool(flags & IFF_LOWER_UP)
        addrs: dict[str, list[IPv4If]] = {n: [] for n in names.values()}
        addrs6: dict[str, list[IPv6If]] = {n: [] for n in names.values()}
        for a in ipr.get_addr():
            name = names.get(a["index"])
            local = a.get("IFA_LOCAL") or a.get("IFA_ADDRESS")
            if name is None or not local:
                continue
            if a["family"] == 2:
                addrs[name].append(IPv4If(f"{local}/{a['prefixlen']}"))
            elif a["family"] == 10:
                addrs6[name].append(IPv6If(f"{local}/{a['prefixlen']}"))
        infos = {n: LinkInfo(n, tuple(addrs[n]), tuple(addrs6[n])) for n in names.values()}
        return infos, {n: i for i, n in names.items()}, up

    async def snapshot(self) -> tuple[dict[str, LinkInfo], dict[str, int], dict[str, bool]]:
        """(interface -> LinkInfo, interface -> ifindex, interface -> link up)."""
        result: tuple[dict[str, LinkInfo], dict[str, int], dict[str, bool]] = await self._call(self._snapshot)
        return result

    def _change(self, op: str, ifindex: int, addrs: list[Address]) -> list[str]:
        ipr = self._open()
        done = []
        for a in addrs:
            # An IPv6 address moving between routers must work at once: no duplicate
            # address detection (the peer has just given it up).
            extra = {"flags": IFA_F_NODAD} if op == "add" and a.version == 6 else {}
            try:
                ipr.addr(op, index=ifindex, address=str(a.ip), prefixlen=a.network.prefixlen,
                         **extra)
                done.append(str(a))
            except Exception as e:  # pyroute2 raises NetlinkError(code)
                code = getattr(e, "code", None)
                if (op == "add" and code == errno.EEXIST) or (
                    op == "del" and code in (errno.EADDRNOTAVAIL, errno.ENODEV)
                ):
                    continue
                raise
        return done

    async def add(self, ifindex: int, addrs: list[Address]) -> list[str]:
        """Add addresses; returns those that were not there already."""
        done: list[str] = await self._call(self._change, "add", ifindex, addrs)
        return done

    async def remove(self, ifindex: int, addrs: list[Address]) -> list[str]:
        """Remove addresses; returns those that were present."""
        done: list[str] = await self._call(self._change, "del", ifindex, addrs)
        return done

    def remove_blocking(self, ifindex: int, addrs: list[Address]) -> list[str]:
        return self._pool.submit(self._change, "del", ifindex, addrs).result()

    def close(self) -> None:
        def _close() -> None:
            if self._ipr is not None:
                self._ipr.close()

        self._pool.submit(_close).result()
        self._pool.shutdown(wait=True)
