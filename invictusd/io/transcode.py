"""ctnetlink messages <-> wire records (generic path; the fast path is being built).

Temporary minimal implementation of the API the engine uses; replaced by the transcoder
with precompiled shapes.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from invictusd import cbpf
from invictusd.flows import EventKind, FlowEvent
from invictusd.io import ctnetlink as ct
from invictusd.sync import wire


class Batch(NamedTuple):
    records: list[bytes]
    keys: list[bytes]
    deleted: int
    done: bool
    skipped: int


class EventTranscoder:
    def __init__(self, mark_bit: int, replica_mask: int) -> None:
        self.mark_mask = 1 << mark_bit
        self.replica_mask = replica_mask

    def transcode(self, buf: bytes | bytearray | memoryview, nbytes: int, *, dump: bool = False) -> Batch:
        data = bytes(memoryview(buf)[:nbytes])
        out: list[FlowEvent] = []
        done = ct._walk(data, nbytes, 0, out)
        records: list[bytes] = []
        keys: list[bytes] = []
        deleted = skipped = 0
        for kind, flow in out:
            if not flow.mark & self.mark_mask or flow.mark & self.replica_mask:
                skipped += 1
                continue
            o = flow.orig
            key = wire.key_bytes(o.family, o.proto, o.src, o.dst, o.sport, o.dport, o.zone)
            flow = flow._replace(mark=flow.mark & ~self.replica_mask)
            if kind is EventKind.DESTROY:
                records.append(wire.encode_delete(wire.delete_from_key(o)))
                deleted += 1
            else:
                new = kind is EventKind.NEW and not dump
                records.append(wire.encode_entry(wire.entry_from_flow(flow, new)))
            keys.append(key)
        return Batch(records, keys, deleted, done, skipped)


def build_entry(e: wire.Entry, seq: int, *, create: bool, mark: int, timeout: int,
                with_status: bool = True, be_liberal: bool = True, ack: bool = False) -> bytes:
    flow = wire.flow_from_entry(e)._replace(mark=mark, timeout=timeout)
    return ct.build_create(flow, seq, be_liberal=be_liberal, create=create, with_status=with_status,
                           ack=ack)


def build_entry_delete(d: wire.Delete, seq: int, *, ack: bool = False) -> bytes:
    from invictusd.flows import FlowKey

    return ct.build_delete(FlowKey(*d), seq, ack=ack)


def _bswap32(v: int) -> int:
    return int.from_bytes(struct.pack("=I", v), "big")


def event_filter(mark_bit: int, replica_mask: int, own_port_id: int) -> tuple[cbpf.Insn, ...]:
    mark = 1 << mark_bit
    b = cbpf
    return b.assemble([
        b.ld_imm(20),
        b.ldx_imm(ct.CTA_MARK),
        b.ld_ancillary(b.SKF_AD_NLATTR),
        b.jeq(0, "drop", None),
        b.tax(),
        b.ld_w_ind(4),
        b.and_k(mark | replica_mask),
        b.jeq(mark, None, "drop"),
        b.ld_w_abs(12),
        b.jeq(_bswap32(own_port_id), "drop", None),
        b.ret(b.ACCEPT),
        b.Label("drop"),
        b.ret(b.DROP),
    ])
