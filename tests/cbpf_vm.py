"""A classic BPF interpreter for tests: runs our socket filters on sample packets.

Follows the kernel's semantics for what our programs use (linux/net/core/filter.c): loads
past the end of the packet end the program with 0 (drop), word and half-word loads are big
endian, jumps are relative and forward. ``SKF_AD_NLATTR`` is implemented for netlink
messages (host-order attribute headers) like the kernel's ``nla_find``.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from invictusd import cbpf as b


class Abort(Exception):
    pass


def _nlattr_find(data: bytes, start: int, attr: int) -> int:
    """Offset of the first attribute of type ``attr`` in the attribute stream at ``start``."""
    off = start
    while off + 4 <= len(data):
        alen, atype = struct.unpack_from("=HH", data, off)
        if alen < 4 or off + alen > len(data):
            return 0
        if atype & 0x3FFF == attr:
            return off
        off += (alen + 3) & ~3
    return 0


def _alu(op: int, a: int, src: int) -> int:
    if op == b.ADD:
        v = a + src
    elif op == b.SUB:
        v = a - src
    elif op == b.MUL:
        v = a * src
    elif op == b.DIV:
        v = a // src if src else 0
    elif op == b.OR:
        v = a | src
    elif op == b.AND:
        v = a & src
    elif op == b.LSH:
        v = a << src
    elif op == b.RSH:
        v = a >> src
    else:
        raise NotImplementedError(hex(op))
    return v & 0xFFFFFFFF


def run(program: Sequence[b.Insn], data: bytes) -> int:
    """The program's return value for ``data`` (0 = drop)."""
    a = x = 0
    mem = [0] * 16
    pc = 0
    n = len(data)

    def load(off: int, size: int) -> int:
        if off < 0 or off + size > n:
            raise Abort
        return int.from_bytes(data[off : off + size], "big")

    try:
        while True:
            code, jt, jf, k = program[pc]
            pc += 1
            cls = code & 0x07
            if cls in (b.LD, b.LDX):
                mode, size = code & 0xE0, code & 0x18
                width = {b.W: 4, b.H: 2, b.B: 1}[size]
                if mode == b.IMM:
                    v = k
                elif mode == b.LEN:
                    v = n
                elif mode == b.MEM:
                    v = mem[k]
                elif mode == b.MSH:
                    v = 4 * (load(k, 1) & 0xF)
                elif mode == b.ABS:
                    kk = k - (1 << 32) if k & 0x80000000 else k
                    if kk >= b.SKF_AD_OFF + 0 and kk < 0:
                        anc = kk - b.SKF_AD_OFF
                        if anc == b.SKF_AD_NLATTR:
                            v = _nlattr_find(data, a, x)
                        else:
                            raise NotImplementedError(f"ancillary {anc}")
                    else:
                        v = load(kk, width)
                elif mode == b.IND:
                    v = load(x + k, width)
                else:
                    raise NotImplementedError(hex(code))
                if cls == b.LD:
                    a = v
                else:
                    x = v
            elif cls == b.ST:
                mem[k] = a
            elif cls == b.STX:
                mem[k] = x
            elif cls == b.ALU:
                a = _alu(code & 0xF0, a, x if code & b.X else k)
            elif cls == b.JMP:
                op, src = code & 0xF0, (x if code & b.X else k)
                if op == b.JA:
                    pc += k
                    continue
                hit = {b.JEQ: a == src, b.JGT: a > src, b.JGE: a >= src, b.JSET: bool(a & src)}[op]
                pc += jt if hit else jf
            elif cls == b.RET:
                return a if code & 0x18 == 0x10 else k  # BPF_A or BPF_K
            elif cls == b.MISC:
                if code & 0xF8 == b.TAX:
                    x = a
                else:
                    a = x
    except Abort:
        return 0
