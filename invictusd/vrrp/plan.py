"""From a checked configuration to the group's VRRP instances (pure).

VRRPv2: one instance per ``[[vrrp]]`` table, IPv4; its IPv6 virtual addresses ride along
(moved with the group, announced by neighbour advertisements, not advertised).
VRRPv3: one instance per table *and* address family: the IPv4 addresses advertised from the
real address, the IPv6 ones from the interface's link-local address, each with its own
adverts, timers and receive checks, all in the one group.

The daemon opens one set of sockets per instance (a sender and the two receive lanes of
``invictusd.vrrp.filter``); the machine's instance ``i`` is ``instances(cfg)[i]``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from invictusd.config import Config, VrrpConfig
from invictusd.vrrp import packet, v3
from invictusd.vrrp.filter import LaneSpec
from invictusd.vrrp.machine import GroupParams, InstanceParams
from invictusd.vrrp.receive import Receiver

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class InstanceSpec:
    table: int  # index of the [[vrrp]] table
    interface: str
    family: int  # 4 or 6
    version: int  # 2 or 3
    vrid: int
    priority: int
    source: Address  # real address (IPv4) or link-local address (IPv6)
    addresses: tuple[Address, ...]  # carried in the adverts
    interval: float  # seconds
    peers: tuple[Address, ...]  # unicast peers of this family; empty: multicast
    garp: tuple[ipaddress.IPv4Address, ...]  # announced by gratuitous ARP
    neighbour: tuple[ipaddress.IPv6Address, ...]  # announced by unsolicited NA

    @property
    def destinations(self) -> tuple[Address, ...]:
        if self.peers:
            return self.peers
        return (v3.GROUP4,) if self.family == 4 else (v3.GROUP6,)

    @property
    def interval_cs(self) -> int:
        return round(self.interval * 100)


def _specs(i: int, v: VrrpConfig) -> list[InstanceSpec]:
    vips4 = tuple(a.ip for a in v.virtual_addresses)
    vips6 = tuple(a.ip for a in v.virtual_addresses6)
    out = []
    if vips4:
        if v.real_address is None:
            raise ValueError(f"vrrp[{i}] has no real_address: run check_system first")
        out.append(InstanceSpec(
            table=i, interface=v.interface, family=4, version=v.version, vrid=v.virtual_id,
            priority=v.priority, source=v.real_address, addresses=vips4,
            interval=v.advert_interval,
            peers=tuple(p for p in v.unicast_peers if p.version == 4),
            garp=vips4, neighbour=vips6 if v.version == 2 else (),
        ))
    if vips6 and v.version == 3:
        if v.link_local is None:
            raise ValueError(f"vrrp[{i}] has no link-local address: run check_system first")
        out.append(InstanceSpec(
            table=i, interface=v.interface, family=6, version=3, vrid=v.virtual_id,
            priority=v.priority, source=v.link_local, addresses=vips6,
            interval=v.advert_interval,
            peers=tuple(p for p in v.unicast_peers if p.version == 6),
            garp=(), neighbour=vips6,
        ))
    return out


def instances(cfg: Config) -> tuple[InstanceSpec, ...]:
    """Every instance of the group, table by table, IPv4 before IPv6."""
    return tuple(s for i, v in enumerate(cfg.vrrp) for s in _specs(i, v))


def group_params(cfg: Config) -> GroupParams:
    specs = instances(cfg)
    refreshes = [v.garp_refresh for v in cfg.vrrp if v.garp_refresh > 0]
    return GroupParams(
        instances=tuple(
            InstanceParams(s.interface, s.vrid, s.priority, s.source, s.interval, s.version,
                           s.family)
            for s in specs
        ),
        preempt=cfg.vrrp[0].preempt,
        preempt_delay=max(v.preempt_delay for v in cfg.vrrp),
        garp_refresh=min(refreshes) if refreshes else 0.0,
    )


def receiver(cfg: Config, spec: InstanceSpec) -> Receiver:
    """What ``spec`` accepts on receipt."""
    v = cfg.vrrp[spec.table]
    peers = frozenset(spec.peers)
    if spec.version == 2:
        expect2 = packet.Expect(
            vrid=spec.vrid,
            advert_interval=int(spec.interval),
            addresses=frozenset(a for a in spec.addresses if isinstance(a, ipaddress.IPv4Address)),
            auth_type=packet.AUTH_PASSWORD,
            password=v.password,
        )
        return Receiver(2, spec.source, peers, expect2=expect2)
    return Receiver(3, spec.source, peers, expect3=v3.ExpectV3(spec.vrid, frozenset(spec.addresses)))


def lane(cfg: Config, spec: InstanceSpec) -> LaneSpec:
    """What ``spec``'s fast lane takes: what ``receiver(cfg, spec)`` accepts, in the kernel
    (the address list aside)."""
    if spec.version == 2:
        return LaneSpec(spec.vrid, len(spec.addresses), packet.AUTH_PASSWORD,
                        cfg.vrrp[spec.table].password, int(spec.interval),
                        own=spec.source, peers=spec.peers)
    return LaneSpec(spec.vrid, len(spec.addresses), version=3, family=spec.family,
                    own=spec.source, peers=spec.peers)


def advert(cfg: Config, spec: InstanceSpec, priority: int) -> list[tuple[bytes, Address]]:
    """The advert(s) of ``spec`` at ``priority``: (VRRP message, destination) per destination.

    VRRPv2's checksum has no pseudo-header (one message for all); VRRPv3's covers the
    destination, so each unicast peer gets its own.
    """
    if spec.version == 2:
        v = cfg.vrrp[spec.table]
        message = packet.encode(packet.Advertisement(
            vrid=spec.vrid, priority=priority,
            addresses=tuple(a for a in spec.addresses if isinstance(a, ipaddress.IPv4Address)),
            advert_interval=int(spec.interval), auth_type=packet.AUTH_PASSWORD,
            auth_data=v.password,
        ))
        return [(message, d) for d in spec.destinations]
    adv = v3.AdvertisementV3(spec.vrid, priority, spec.addresses, spec.interval_cs)
    return [(v3.encode(adv, spec.source, d), d) for d in spec.destinations]
