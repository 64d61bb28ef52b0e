"""Bit packing, in exactly one place.

Every on-disk integer layout qtool knows is a little-endian bit stream of `bits`-wide codes laid into
int32 words along one dimension (GPTQ qweight along K, GPTQ qzeros along N, compressed-tensors
along K, ...), optionally after a permutation of the codes inside each word (AWQ's [0,2,4,6,1,3,5,7]
nibble order). For 2, 4 and 8 bits that is the familiar "32/bits codes per int32, lowest bits first";
for 3 bits it is GPTQ's layout of 32 codes in three words, which is the same stream.
"""

from __future__ import annotations

import sys

import torch

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]


def _to_dim0(t: torch.Tensor, dim: int) -> torch.Tensor:
    return t.movedim(dim, 0)


def pack_int32(codes: torch.Tensor, bits: int, dim: int = 0, order: list[int] | None = None) -> torch.Tensor:
    """Pack unsigned codes (0 <= c < 2**bits) along `dim` into int32 words.

    The size along `dim` must be a multiple of 32 / gcd(32, bits) codes (32 for 3 bits).
    `order` permutes the codes inside each word (code order[i] goes to slot i).
    """
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"unsupported bit width {bits}")
    x = _to_dim0(codes, dim)
    if x.numel():
        lo, hi = torch.aminmax(x)
        if int(lo) < 0 or int(hi) >= (1 << bits):
            raise ValueError(f"codes out of range for {bits}-bit packing")
    n = x.shape[0]
    chunk = 32 if bits == 3 else 32 // bits  # codes per chunk
    words = chunk * bits // 32  # int32 words per chunk
    if n % chunk:
        raise ValueError(f"size {n} along the packed dimension is not a multiple of {chunk}")
    x = x.reshape(n // chunk, chunk, *x.shape[1:])
    if order is not None:
        x = x[:, order]
    # int32 arithmetic: the fields are disjoint, so shifts that reach the sign bit wrap as intended
    out = torch.zeros((n // chunk, words, *x.shape[2:]), dtype=torch.int32, device=x.device)
    for i in range(chunk):
        off = i * bits
        w, s = divmod(off, 32)
        xi = x[:, i].to(torch.int32)
        out[:, w].bitwise_or_(xi << s)
        if s + bits > 32:
            out[:, w + 1].bitwise_or_(xi >> (32 - s))
    out = out.reshape(n // chunk * words, *x.shape[2:])
    return out.movedim(0, dim).contiguous()


def unpack_int32(packed: torch.Tensor, bits: int, dim: int = 0, order: list[int] | None = None) -> torch.Tensor:
    """Inverse of pack_int32: returns uint8 codes (int16 never needed for bits <= 8)."""
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"unsupported bit width {bits}")
    if bits != 3 and order is None and packed.dtype == torch.int32 and sys.byteorder == "little":
        return _unpack_bytes(packed, bits, dim)
    p = _to_dim0(packed, dim).to(torch.int64) & 0xFFFFFFFF
    chunk = 32 if bits == 3 else 32 // bits
    words = chunk * bits // 32
    if p.shape[0] % words:
        raise ValueError(f"packed size {p.shape[0]} is not a multiple of {words} words")
    p = p.reshape(p.shape[0] // words, words, *p.shape[1:])
    mask = (1 << bits) - 1
    vals = []
    for i in range(chunk):
        off = i * bits
        w, s = divmod(off, 32)
        v = p[:, w] >> s
        if s + bits > 32:
            v = v | (p[:, w + 1] << (32 - s))
        vals.append(v & mask)
    x = torch.stack(vals, dim=1)
    if order is not None:
        inv = [0] * len(order)
        for slot, src in enumerate(order):
            inv[src] = slot
        x = x[:, inv]
    x = x.reshape(-1, *x.shape[2:]).to(torch.uint8)
    return x.movedim(0, dim).contiguous()


def _unpack_bytes(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """unpack_int32 for 2/4/8 bits in plain order: the int32 words read as little-endian bytes, so codes
    never straddle a byte and unpacking is a few byte-wide ops (the runtime does this on every call)."""
    p = packed.movedim(dim, -1).contiguous()
    by = p.view(torch.uint8)  # [..., words * 4], byte j holds codes j*(8/bits) ... lowest bits first
    if bits == 8:
        x = by.clone()  # never a view of the caller's words
    else:
        mask = (1 << bits) - 1
        x = torch.stack([(by >> s) & mask if s else by & mask for s in range(0, 8, bits)], dim=-1)
        x = x.reshape(*by.shape[:-1], by.shape[-1] * (8 // bits))
    return x.movedim(-1, dim).contiguous()


def pack_nibbles_uint8(codes: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Two 4-bit codes per byte along `dim`, the even element in the low nibble (E2M1, ModelOpt int4)."""
    x = codes.movedim(dim, -1).to(torch.uint8)
    if x.shape[-1] % 2:
        raise ValueError("odd size along the nibble-packed dimension")
    out = (x[..., 0::2] & 0xF) | ((x[..., 1::2] & 0xF) << 4)
    return out.movedim(-1, dim).contiguous()


def unpack_nibbles_uint8(packed: torch.Tensor, dim: int = -1) -> torch.Tensor:
    x = packed.movedim(dim, -1).to(torch.uint8)
    out = torch.stack([x & 0xF, x >> 4], dim=-1).reshape(*x.shape[:-1], x.shape[-1] * 2)
    return out.movedim(-1, dim).contiguous()


def signed_to_offset(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes in [-2^(b-1), 2^(b-1)) -> unsigned codes offset by 2^(b-1)."""
    return (codes.to(torch.int16) + (1 << (bits - 1))).to(torch.uint8)


def offset_to_signed(codes: torch.Tensor, bits: int) -> torch.Tensor:
    return (codes.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)


def signed_to_twos(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes -> their `bits`-wide two's-complement pattern as uint8 (int4 -8 -> 0x8, -1 -> 0xF)."""
    return (codes.to(torch.int16) & ((1 << bits) - 1)).to(torch.uint8)


def twos_to_signed(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of signed_to_twos: `bits`-wide two's-complement patterns (uint8) -> signed int8 codes."""
    c = codes.to(torch.int16) & ((1 << bits) - 1)
    return torch.where(c >= (1 << (bits - 1)), c - (1 << bits), c).to(torch.int8)


# ---- GGUF blocks (llama.cpp ggml-common.h): 32 codes per block, fp16 scale first ------------------

def pack_gguf_q8_0(codes: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Q8_0: per block {fp16 d, int8 qs[32]}; codes int8 [N, K], d fp16 [N, K/32] -> uint8 [N, K/32*34]."""
    n, k = codes.shape
    nb = k // 32
    parts = [d.to(torch.float16).contiguous().view(torch.uint8).reshape(n, nb, 2), codes.to(torch.int8).contiguous().view(torch.uint8).reshape(n, nb, 32)]
    return torch.cat(parts, -1).reshape(n, nb * 34)


def unpack_gguf_q8_0(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = raw.shape[0]
    b = raw.reshape(n, -1, 34)
    return b[..., 2:].contiguous().view(torch.int8).reshape(n, -1), b[..., :2].contiguous().view(torch.float16).reshape(n, -1)


def pack_gguf_q4_0(codes: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Q4_0: per block {fp16 d, uint8 qs[16]}, qs[j] = q[j] | q[j+16] << 4 with unsigned q in [0, 15]
    (real = d * (q - 8)); codes uint8 [N, K], d fp16 [N, K/32] -> uint8 [N, K/32*18]."""
    n, k = codes.shape
    nb = k // 32
    q = codes.to(torch.uint8).reshape(n, nb, 32)
    qs = (q[..., :16] & 0xF) | ((q[..., 16:] & 0xF) << 4)
    return torch.cat([d.to(torch.float16).contiguous().view(torch.uint8).reshape(n, nb, 2), qs], -1).reshape(n, nb * 18)


def unpack_gguf_q4_0(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = raw.shape[0]
    b = raw.reshape(n, -1, 18)
    qs = b[..., 2:]
    q = torch.cat([qs & 0xF, qs >> 4], -1).reshape(n, -1)
    return q, b[..., :2].contiguous().view(torch.float16).reshape(n, -1)
