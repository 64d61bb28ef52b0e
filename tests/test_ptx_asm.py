"""gemv16's inline PTX word sums (weight_only._H2_ASM for int4, _FP4_ASM / _FP4Q_ASM for NVFP4) run on the CPU by
a small emulator of the PTX they use (integer shifts and lop3, IEEE fp16 pair arithmetic rounded to nearest even),
against the exact sums of their decoded weights times x: the asm's arithmetic is checked here, the kernels around
it under the interpreter (their plain twins: tests/test_kernels.py) and on a GPU (tests/test_kernels_cuda.py)."""

import os
import re

import numpy as np
import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")  # importing the kernels defines them: under the interpreter

from runtime.kernels import weight_only as wo  # noqa: E402

M32 = np.uint64(0xFFFFFFFF)


def _f16(u):  # uint32 pairs -> fp16 [..., 2] (low half first)
    return np.ascontiguousarray(u.astype(np.uint32)).view(np.float16).reshape(*u.shape, 2)


def _u32(h):  # fp16 [..., 2] -> uint32 pairs
    return np.ascontiguousarray(h.astype(np.float16)).view(np.uint32).reshape(h.shape[:-1]).astype(np.uint64)


def emulate(asm: str, args: list) -> np.ndarray:
    """Runs the asm on vectors: args[i] is $(i + 1) (uint32 values as uint64 arrays); returns $0 (fp32)."""
    reg: dict = {}

    def val(s):
        s = s.strip()
        if s.startswith("$"):
            return args[int(s[1:]) - 1]
        if s in reg:
            return reg[s]
        return np.uint64(int(s, 0))

    out = None
    for line in asm.replace("{", "\n").replace("}", "\n").split(";"):
        line = line.strip()
        if not line or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        if op == "mov.b32" and rest.startswith("h0"):  # "{h0, h1}, p" with the braces dropped
            d0, d1, s = [t.strip() for t in rest.split(",")]
            reg[d0], reg[d1] = val(s) & np.uint64(0xFFFF), val(s) >> np.uint64(16)
            continue
        ops = [t.strip() for t in rest.split(",")]
        d, src = ops[0], ops[1:]
        if op == "mov.b32":
            r = val(src[0]) + np.zeros_like(args[0])
        elif op == "shl.b32":
            r = (val(src[0]) << np.uint64(int(src[1]))) & M32
        elif op == "shr.u32":
            r = val(src[0]) >> np.uint64(int(src[1]))
        elif op == "and.b32":
            r = val(src[0]) & val(src[1])
        elif op == "lop3.b32":  # bit i of the result: bit (a_i b_i c_i) of the table
            a, b, c = (val(s) + np.zeros_like(args[0]) for s in src[:3])
            lut, r = int(src[3], 0), np.zeros_like(args[0])
            for i in range(32):
                sh = np.uint64(i)
                idx = (((a >> sh) & 1) << np.uint64(2)) | (((b >> sh) & 1) << np.uint64(1)) | ((c >> sh) & 1)
                r |= ((np.uint64(lut) >> idx) & 1) << sh
        elif op in ("mul.f16x2", "sub.f16x2", "fma.rn.f16x2"):  # exact in float64, one rounding to fp16
            x = [_f16(val(s) + np.zeros_like(args[0])).astype(np.float64) for s in src]
            r = _u32(x[0] * x[1] if op[0] == "m" else x[0] - x[1] if op[0] == "s" else x[0] * x[1] + x[2])
        elif op == "add.f16":
            h = [(val(s) + np.zeros_like(args[0])).astype(np.uint16).view(np.float16).astype(np.float64) for s in src]
            r = (h[0] + h[1]).astype(np.float16).view(np.uint16).astype(np.uint64)
        elif op == "cvt.f32.f16":
            out = val(src[0]).astype(np.uint16).view(np.float16).astype(np.float32)
            continue
        else:
            raise AssertionError(f"not emulated: {op}")
        reg[d] = r
    return out


def _pairs(lo, hi):
    return _u32(np.stack([lo, hi], -1))


E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])


def _nvfp4_case(n, seed):
    """Two words of e2m1 codes (nibble k at bits 4k), their x (prescaled as the kernel does: |x| under 2^14 / 16
    here) and the e4m3-valued scales of slots 0..7; pair j of a word is nibbles (j, j + 4)."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 16, (2, n, 8))
    words = [np.bitwise_or.reduce(codes[w].astype(np.uint64) << (4 * np.arange(8, dtype=np.uint64)), -1) for w in range(2)]
    x = rng.uniform(-1, 1, (2, n, 8)).astype(np.float16) * np.float16(512)
    e4m3 = np.array([m * 2.0 ** e for e in range(-6, 9) for m in (1, 1.25, 1.5, 1.75)] + [448.0])
    s = rng.choice(e4m3[e4m3 <= 448], (n, 8)).astype(np.float16)
    args = [words[0], words[1]] + [_pairs(x[w, :, j], x[w, :, j + 4]) for w in range(2) for j in range(4)]
    args += [_pairs(s[:, j], s[:, j + 4]) for j in range(4)]
    exact = (E2M1[codes] * 2.0 ** -14 * x.astype(np.float64) * s.astype(np.float64)[None]).sum((0, 2))
    return args, exact


@pytest.mark.parametrize("asm", ["_FP4_ASM", "_FP4Q_ASM"])
def test_nvfp4_word_sum(asm):
    """Sixteen e2m1 weights (two words) times their x and block scales, summed in fp16 pairs: within fp16 rounding
    of the exact sum (a few ulps of the largest partial), and every decode exact (one weight at a time: exact)."""
    args, exact = _nvfp4_case(4096, 0)
    got = emulate(getattr(wo, asm).value, args).astype(np.float64)
    bound = np.abs(exact).max() * 2.0 ** -8 + 1e-6  # 16 products, fp16 sums
    assert np.abs(got - exact).max() < bound
    # one nonzero code at a time, x and scale powers of two: every product and sum exact
    for k in range(16):
        w, nib = divmod(k, 8)
        for code in range(16):
            word = np.uint64(code << (4 * nib))
            a = [word if w == 0 else np.uint64(0), word if w == 1 else np.uint64(0)]
            one = np.uint64(0x3C003C00)  # (1.0, 1.0)
            a = [np.array([v]) for v in a] + [np.array([one])] * 8 + [np.array([np.uint64(0x40004000)])] * 4  # scale 2
            got = emulate(getattr(wo, asm).value, a)[0]
            assert got == np.float32(E2M1[code] * 2.0 ** -14 * 2), (asm, k, code, got)


def test_fp4q_has_fewer_instructions():
    """The pair-summed NVFP4 asm: the two words' pair j summed before their common scale pair multiplies them
    (one fma per pair and one per scale pair: 12 fp16 pair operations for 16 weights, not 16)."""
    def count(a, pat):
        return len(re.findall(pat, a))
    old, new = wo._FP4_ASM.value, wo._FP4Q_ASM.value
    assert count(old, r"(mul|fma\.rn)\.f16x2") == 16 and count(new, r"(mul|fma\.rn)\.f16x2") == 12
    assert count(old, r"lop3|shl|shr|and\.b32") == count(new, r"lop3|shl|shr|and\.b32")


def test_int4_word_sum():
    """int4 (q - z) pairs, x pairs: the packed-fp16 sum of two words against the exact sum."""
    rng = np.random.default_rng(1)
    n = 4096
    codes = rng.integers(0, 16, (2, n, 8))
    z = rng.integers(0, 16, n)
    words = [np.bitwise_or.reduce(codes[w].astype(np.uint64) << (4 * np.arange(8, dtype=np.uint64)), -1) for w in range(2)]
    x = rng.uniform(-1, 1, (2, n, 8)).astype(np.float16) * np.float16(256)
    # the kernel's pair layout: nibble order in a word (lo half, hi half) x the four pairs of a word
    zlo = (0x6400 | z).astype(np.uint64)
    zhi = (0xD400 | (z << 4)).astype(np.uint64)
    # what the asm computes for a word: pair (lo, hi) halves hold nibbles (0, 4) masked 0x000F / (1, 5) masked 0x00F0,
    # then the same after >> 8: nibbles (2, 6), (3, 7); x pairs $3.. in that order
    order = [(0, 4), (1, 5), (2, 6), (3, 7)]
    args = [words[0], words[1]] + [_pairs(x[w, :, i], x[w, :, k]) for w in range(2) for i, k in order]
    args += [zlo | (zlo << np.uint64(16)), zhi | (zhi << np.uint64(16))]
    # nibble positions: word bits 0-3 -> lo half, code of "slot" 0; 4-7 -> slot 1 (0x00F0); 8-11, 12-15 after >> 8;
    # the high half-word's nibbles (16-31) are the pair's hi lane
    q = np.stack([(words[w][:, None] >> np.array([0, 4, 8, 12, 16, 20, 24, 28], dtype=np.uint64)) & 15
                  for w in range(2)]).astype(np.float64)  # [2, n, 8] nibble k at bits 4k
    # slot i of the x layout above: lo lanes are nibbles 0, 1, 2, 3; hi lanes 4, 5, 6, 7
    exact = ((q - z[None, :, None]) * x.astype(np.float64)).sum((0, 2))
    got = emulate(wo._H2_ASM.value, args).astype(np.float64)
    assert np.abs(got - exact).max() < np.abs(exact).max() * 2.0 ** -8 + 1e-3


def test_int4_subnormal_word_sum():
    """SUB (_H2S_ASM): the codes masked into fp16 halves are subnormals q * 2^-24 (the 0x00F0 nibbles 16 q * 2^-24,
    their x pairs packed / 16), times x pairs prescaled under 2^15: the two words' sum q x * 2^-24 within fp16
    rounding of the exact one, also for x spanning many orders of magnitude (subnormal products), and one
    instruction a code pair (no zero point in the asm: the kernel takes z times the sum of x off per block)."""
    rng = np.random.default_rng(2)
    n = 4096
    codes = rng.integers(0, 16, (2, n, 8))
    words = [np.bitwise_or.reduce(codes[w].astype(np.uint64) << (4 * np.arange(8, dtype=np.uint64)), -1) for w in range(2)]
    order = [(0, 4), (1, 5), (2, 6), (3, 7)]
    for spread in (1.0, 1e-4):
        mag = np.exp(rng.uniform(np.log(spread), 0, (2, n, 8)))
        x = (rng.choice([-1.0, 1.0], (2, n, 8)) * mag * 2.0 ** 15 * 0.999).astype(np.float16)
        xp = x.astype(np.float64).copy()
        xp[:, :, [1, 5, 3, 7]] /= 16  # the odd pairs' x as packed (exact: powers of two)
        args = [words[0], words[1]] + [_pairs(xp[w, :, i], xp[w, :, k]) for w in range(2) for i, k in order]
        q = codes.astype(np.float64)
        exact = (q * x.astype(np.float64)).sum((0, 2)) * 2.0 ** -24
        got = emulate(wo._H2S_ASM.value, args).astype(np.float64)
        # fp16 sums of up to 16 products under 15 * 2^-9 each: a few units of 2^-11 of the largest partial sum
        bound = (q * np.abs(x.astype(np.float64))).sum((0, 2)) * 2.0 ** -24
        assert np.all(np.abs(got - exact) <= bound * 2.0 ** -8 + 2.0 ** -20), spread
    a = wo._H2S_ASM.value
    assert len(re.findall(r"and\.b32", a)) == 8 and len(re.findall(r"(mul|fma\.rn)\.f16x2", a)) == 8
    assert "lop3" not in a and "sub.f16x2" not in a
