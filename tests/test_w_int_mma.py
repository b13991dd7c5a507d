"""The mma word layout of the tensor-core int4 GEMV (quantization/w_int_mma.py), on the CPU: pack / unpack round
trip, the documented nibble formula, and the twin equal to the canonical reference."""

from __future__ import annotations

import pytest
import torch

from quanta.quantization.int_quant import unpack_int4
from quanta.quantization.w_int_mma import (
    MmaConfig,
    mma_pack,
    mma_pack_scales,
    mma_unpack,
    mma_unpack_scales,
    mma_weights,
    w_int_mma_linear_ref,
)


@pytest.mark.parametrize("n,k,group", [(48, 256, 128), (16, 128, 64), (32, 512, 32)])
def test_pack_round_trip_and_formula(n, k, group):
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
    words = mma_pack(packed, group)
    assert words.shape == (n // 16, k // group, 32, group // 16) and words.dtype == torch.int32
    assert torch.equal(mma_unpack(words), packed)
    q = unpack_int4(packed)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        t, g, lane, j = (int(torch.randint(0, d, (1,), generator=gen)) for d in words.shape)
        r, c, word = lane // 4, lane % 4, int(words[t, g, lane, j]) & 0xFFFFFFFF
        for h in range(2):
            for kh in range(2):
                for e in range(2):
                    want = q[16 * t + r + 8 * h, g * group + c * group // 4 + 4 * j + 2 * kh + e]
                    assert (word >> (4 * (h + 2 * kh + 4 * e))) & 0xF == want


def test_pack_rejects_ragged_shapes():
    with pytest.raises(ValueError, match="N % 16"):
        mma_pack(torch.zeros(24, 64, dtype=torch.uint8), 128)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("zp", [True, False])
def test_scale_words_round_trip_and_formula(dtype, zp):
    scale = (torch.rand(48, 5) * 0.02 - 0.01).to(dtype)
    zero = torch.randint(0, 16, (48, 5), dtype=torch.uint8) if zp else None
    sz = mma_pack_scales(scale, zero, dtype)
    assert sz.shape == (3, 5, 8, 2) and sz.dtype == torch.int32
    s2, z2 = mma_unpack_scales(sz, dtype)
    assert torch.equal(s2, scale) and torch.equal(z2, zero if zp else torch.full_like(z2, 8))
    magic = 0x4300 if dtype == torch.bfloat16 else 0x6400
    t, g, r = 2, 4, 7
    lo, hi = 16 * t + r, 16 * t + 8 + r
    word_s, word_z = (int(v) & 0xFFFFFFFF for v in sz[t, g, r])
    assert word_s & 0xFFFF == int(scale[lo, g].view(torch.int16)) & 0xFFFF
    assert word_s >> 16 == int(scale[hi, g].view(torch.int16)) & 0xFFFF
    z = zero if zp else torch.full((48, 5), 8)
    assert word_z == (magic | int(z[lo, g])) | ((magic | int(z[hi, g])) << 16)


def test_ref_equals_canonical_ref():
    from quanta.quantization.w_int_kernel import w_int_linear_ref

    packed = torch.randint(0, 256, (32, 128), dtype=torch.uint8)
    scale = (torch.rand(32, 2) * 0.01).bfloat16()
    zero = torch.randint(0, 16, (32, 2), dtype=torch.uint8)
    x = torch.randn(3, 256)
    want = w_int_linear_ref(x, packed, scale.float(), zero, 4, 128, 256)
    mw = mma_weights(packed, scale, zero, 128, torch.bfloat16)
    assert mw.shape == (32, 256)
    assert torch.equal(w_int_mma_linear_ref(x, mw), want)
    want_sym = w_int_linear_ref(x, packed, scale.float(), None, 4, 128, 256)
    assert torch.equal(w_int_mma_linear_ref(x, mma_weights(packed, scale, None, 128, torch.bfloat16)), want_sym)


def test_config_text():
    assert MmaConfig.parse("t2_w8_d3") == MmaConfig(tiles=2, warps=8, depth=3)
    assert MmaConfig.parse("t4_w4") == MmaConfig(tiles=4, warps=4, depth=2)
    assert str(MmaConfig.parse("t4_w4_d1")) == "t4_w4_d1"


def test_rows_and_configs():
    from quanta.quantization import w_int_mma

    assert w_int_mma._rows("2-16") == (2, 16) and w_int_mma._rows("4") == (4, 4) and w_int_mma._rows("") == (0, -1)
    for m, n, k in [(16, 28672, 4096), (4, 4096, 14336), (16, 6144, 4096), (1, 6144, 4096)]:
        cfg = w_int_mma.config_for(m, n, k)
        assert cfg.tiles == (2 if m > 8 else 1) and cfg.warps in (2, 4, 8) and 1 <= cfg.depth <= 4


def test_attach_is_a_no_op_on_the_cpu():
    from quanta.quantization import w_int_mma

    class Layer:
        in_features, out_features = 256, 32
        weight_packed = torch.zeros(32, 128, dtype=torch.uint8)
        weight_scale = torch.ones(32, 2, dtype=torch.bfloat16)

    layer = Layer()
    w_int_mma.attach(layer, 128)
    assert not hasattr(layer, "weight_mma") and not w_int_mma.usable(layer, torch.zeros(2, 256))
    assert not w_int_mma.usable_silu(layer, torch.zeros(1, 256))
    assert w_int_mma.silu_config(1).tiles == 2 and w_int_mma.silu_config(16).tiles == 2
