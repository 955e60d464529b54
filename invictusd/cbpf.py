"""Classic BPF (the socket filter language of SO_ATTACH_FILTER), assembled by hand. Pure.

A program is a tuple of ``Insn`` (code, jt, jf, k). ``Program`` assembles it from a small
list of named steps so that jumps name their targets instead of counting instructions by
hand, and ``encode`` gives the bytes the kernel's ``struct sock_filter`` array expects.

Used for kernel-side filters where a Python reader must never see a flood: the VRRP receive
lanes (``invictusd.vrrp.filter``) and the conntrack event socket. The kernel copies and
checks the program at attach time; ``Program`` checks what it can before that (jump
targets, length).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

# Instruction classes, sizes, modes and operations (linux/filter.h, linux/bpf_common.h).
LD, LDX, ST, STX, ALU, JMP, RET, MISC = 0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07
W, H, B = 0x00, 0x08, 0x10
IMM, ABS, IND, MEM, LEN, MSH = 0x00, 0x20, 0x40, 0x60, 0x80, 0xA0
ADD, SUB, MUL, DIV, OR, AND, LSH, RSH = 0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70
JA, JEQ, JGT, JGE, JSET = 0x00, 0x10, 0x20, 0x30, 0x40
K, X = 0x00, 0x08
TAX, TXA = 0x00, 0x80

# Ancillary loads: ld [SKF_AD_OFF + n].
SKF_AD_OFF = -0x1000
SKF_AD_NLATTR = 12  # A = offset of attribute X in the netlink message, searching from A
SKF_AD_NLATTR_NEST = 16

MAX_INSNS = 4096  # BPF_MAXINSNS
_INSN = struct.Struct("=HBBI")


class Insn(NamedTuple):
    code: int
    jt: int
    jf: int
    k: int


class ProgramError(ValueError):
    """A program that cannot be assembled (a bug of ours, not input from the network)."""


@dataclass(frozen=True, slots=True)
class Label:
    name: str


@dataclass(frozen=True, slots=True)
class Op:
    """One instruction; for a conditional jump ``jt``/``jf`` name labels (None: next)."""

    code: int
    k: int = 0
    jt: str | None = None
    jf: str | None = None


Step = Op | Label


def assemble(steps: Sequence[Step]) -> tuple[Insn, ...]:
    """Resolve labels into the relative offsets of classic BPF (forward jumps only)."""
    where: dict[str, int] = {}
    ops: list[Op] = []
    for step in steps:
        if isinstance(step, Label):
            if step.name in where:
                raise ProgramError(f"label {step.name!r} defined twice")
            where[step.name] = len(ops)
        else:
            ops.append(step)
    if not ops or len(ops) > MAX_INSNS:
        raise ProgramError(f"{len(ops)} instructions (1..{MAX_INSNS})")
    out: list[Insn] = []
    for i, op in enumerate(ops):
        def offset(label: str | None, i: int = i) -> int:
            if label is None:
                return 0
            if label not in where:
                raise ProgramError(f"jump to undefined label {label!r}")
            d = where[label] - i - 1
            if not 0 <= d <= 255:
                raise ProgramError(f"jump to {label!r} spans {d} (0..255, forward only)")
            return d

        if op.code & 0x07 == JMP and op.code & 0xF0 != JA:
            out.append(Insn(op.code, offset(op.jt), offset(op.jf), op.k & 0xFFFFFFFF))
        elif op.code & 0x07 == JMP:  # ja: k is the label's offset
            out.append(Insn(op.code, 0, 0, offset(op.jt)))
        else:
            out.append(Insn(op.code, 0, 0, op.k & 0xFFFFFFFF))
    last = out[-1]
    if last.code & 0x07 != RET:
        raise ProgramError("a program must end with a ret")
    return tuple(out)


def encode(program: Sequence[Insn]) -> bytes:
    """The ``struct sock_filter`` array (host byte order, 8 bytes per instruction)."""
    return b"".join(_INSN.pack(*insn) for insn in program)


# Shorthands for the steps programs are written in.
def ld_b_abs(off: int) -> Op:
    return Op(LD | B | ABS, off)


def ld_h_abs(off: int) -> Op:
    return Op(LD | H | ABS, off)


def ld_mem(i: int) -> Op:
    return Op(LD | MEM, i)


def st(i: int) -> Op:
    """M[i] = A."""
    return Op(ST, i)


def txa() -> Op:
    return Op(MISC | TXA)


def add_x() -> Op:
    return Op(ALU | ADD | X)


def rsh_k(k: int) -> Op:
    return Op(ALU | RSH | K, k)


def ld_w_abs(off: int) -> Op:
    return Op(LD | W | ABS, off)


def ld_b_ind(off: int) -> Op:
    return Op(LD | B | IND, off)


def ld_w_ind(off: int) -> Op:
    return Op(LD | W | IND, off)


def ldx_msh(off: int) -> Op:
    """X = 4 * (byte at ``off`` & 0xf): the IPv4 header length."""
    return Op(LDX | B | MSH, off)


def ld_len() -> Op:
    """A = length of the packet."""
    return Op(LD | W | LEN)


def sub_x() -> Op:
    return Op(ALU | SUB | X)


def jge(k: int, jt: str | None = None, jf: str | None = None) -> Op:
    return Op(JMP | JGE | K, k, jt, jf)


def jge_x(jt: str | None = None, jf: str | None = None) -> Op:
    """Jump if A >= X."""
    return Op(JMP | JGE | X, 0, jt, jf)


def ld_imm(k: int) -> Op:
    return Op(LD | IMM, k)


def ldx_imm(k: int) -> Op:
    return Op(LDX | IMM, k)


def ld_ancillary(n: int) -> Op:
    return Op(LD | W | ABS, SKF_AD_OFF + n)


def tax() -> Op:
    return Op(MISC | TAX)


def and_k(k: int) -> Op:
    return Op(ALU | AND | K, k)


def jeq(k: int, jt: str | None = None, jf: str | None = None) -> Op:
    return Op(JMP | JEQ | K, k, jt, jf)


def jset(k: int, jt: str | None = None, jf: str | None = None) -> Op:
    return Op(JMP | JSET | K, k, jt, jf)


def ret(k: int) -> Op:
    return Op(RET | K, k)


ACCEPT = 0x7FFFFFFF  # keep the whole packet
DROP = 0
