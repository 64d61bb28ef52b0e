import pytest
import torch

from qtensor import packing as pk


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dim", [0, 1])
def test_pack_roundtrip(bits, dim):
    g = torch.Generator().manual_seed(bits)
    shape = (64, 96) if dim == 0 else (96, 64)
    codes = torch.randint(0, 1 << bits, shape, generator=g).to(torch.uint8)
    packed = pk.pack_int32(codes, bits, dim=dim)
    assert packed.dtype == torch.int32
    assert packed.shape[dim] == codes.shape[dim] * bits // 32
    assert torch.equal(pk.unpack_int32(packed, bits, dim=dim), codes)


def test_pack_4bit_known_word():
    # GPTQ/AutoGPTQ: 8 codes per int32 along K, lowest nibble first
    codes = torch.arange(8, dtype=torch.uint8).reshape(8, 1)
    assert pk.pack_int32(codes, 4, dim=0).item() == 0x76543210


def test_pack_3bit_matches_autogptq_loop():
    # independent reference: AutoGPTQ's 3-bit packing loop (10 codes, 2+1 split, 10 codes, 1+2 split, 10 codes)
    g = torch.Generator().manual_seed(0)
    iw = torch.randint(0, 8, (32, 5), generator=g).to(torch.int64)
    q = torch.zeros(3, 5, dtype=torch.int64)
    i, row = 0, 0
    for j in range(i, i + 10):
        q[row] |= iw[j] << (3 * (j - i))
    i += 10
    q[row] |= iw[i] << 30
    row += 1
    q[row] |= (iw[i] >> 2) & 1
    i += 1
    for j in range(i, i + 10):
        q[row] |= iw[j] << (3 * (j - i) + 1)
    i += 10
    q[row] |= iw[i] << 31
    row += 1
    q[row] |= (iw[i] >> 1) & 0x3
    i += 1
    for j in range(i, i + 10):
        q[row] |= iw[j] << (3 * (j - i) + 2)
    q = torch.where(q >= 2**31, q - 2**32, q).to(torch.int32)
    assert torch.equal(pk.pack_int32(iw.to(torch.uint8), 3, dim=0), q)


def test_awq_order_roundtrip_and_layout():
    codes = torch.arange(8, dtype=torch.uint8).reshape(1, 8)
    packed = pk.pack_int32(codes, 4, dim=1, order=pk.AWQ_ORDER)
    # AWQ puts code 0 in nibble 0, code 2 in nibble 1, code 4 in nibble 2, ...
    assert packed.item() == (0 | 2 << 4 | 4 << 8 | 6 << 12 | 1 << 16 | 3 << 20 | 5 << 24 | 7 << 28)
    assert torch.equal(pk.unpack_int32(packed, 4, dim=1, order=pk.AWQ_ORDER), codes)


def test_nibbles_and_signed():
    codes = torch.randint(0, 16, (4, 32), dtype=torch.uint8)
    assert torch.equal(pk.unpack_nibbles_uint8(pk.pack_nibbles_uint8(codes)), codes)
    s = torch.arange(-8, 8, dtype=torch.int8)
    assert torch.equal(pk.offset_to_signed(pk.signed_to_offset(s, 4), 4), s)


def test_out_of_range_codes_rejected():
    with pytest.raises(ValueError):
        pk.pack_int32(torch.tensor([[16]] * 8, dtype=torch.uint8), 4)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dim", [0, 1])
def test_unpack_matches_explicit_shifts_on_3d_and_does_not_alias(bits, dim):
    """The byte-wise unpack path equals word-wise shifts (sign bit set included), for any dim."""
    g = torch.Generator().manual_seed(7)
    packed = torch.randint(-(2**31), 2**31 - 1, (4, 6, 5), generator=g, dtype=torch.int64).to(torch.int32)
    w = packed.movedim(dim, -1).to(torch.int64) & 0xFFFFFFFF
    want = torch.stack([(w >> s) & ((1 << bits) - 1) for s in range(0, 32, bits)], -1)
    want = want.reshape(*w.shape[:-1], -1).to(torch.uint8).movedim(-1, dim)
    got = pk.unpack_int32(packed, bits, dim=dim)
    assert torch.equal(got, want)
    got.fill_(0)
    assert packed.abs().sum() > 0 and torch.equal(pk.unpack_int32(packed, bits, dim=dim), want)
