"""The mma word layout of the tensor-core int4 GEMV (quantization/w_int_mma.py), on the CPU: pack / unpack round
trip, the documented nibble formula, and the twin equal to the canonical reference."""

from __future__ import annotations

import pytest
import torch

from quanta.quantization.int_quant import unpack_int4
from quanta.quantization.w_int_mma import MmaConfig, mma_pack, mma_unpack, w_int_mma_linear_ref


@pytest.mark.parametrize("n,k,group", [(48, 256, 128), (16, 128, 64), (32, 512, 256)])
def test_pack_round_trip_and_formula(n, k, group):
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
    words = mma_pack(packed, group)
    assert words.shape == (n // 16, k // group, group // 64, 32, 4) and words.dtype == torch.int32
    assert torch.equal(mma_unpack(words), packed)
    q = unpack_int4(packed)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        t, g, half, lane, s = (int(torch.randint(0, d, (1,), generator=gen)) for d in words.shape)
        r, c, word = lane // 4, lane % 4, int(words[t, g, half, lane, s]) & 0xFFFFFFFF
        for h in range(2):
            for kh in range(2):
                for e in range(2):
                    k_at = g * group + 64 * half + 32 * (s // 2) + 8 * c + 4 * (s % 2) + 2 * kh + e
                    want = q[16 * t + r + 8 * h, k_at]
                    assert (word >> (4 * (h + 2 * kh + 4 * e))) & 0xF == want


@pytest.mark.parametrize("dtype,zp", [(torch.bfloat16, True), (torch.float16, True), (torch.bfloat16, False)])
def test_pack_sz_formula(dtype, zp):
    """The packed scale / zero pairs: [t, r, g, h] = (scale bits << 16) | z of row 16 t + r + 8 h (z = 8 without zero
    points), the scale's bits exact (negative scales too)."""
    from quanta.quantization.w_int_mma import mma_pack_sz

    scale = (torch.randn(48, 5) * 0.01).to(dtype)
    zero = torch.randint(0, 16, (48, 5), dtype=torch.uint8) if zp else None
    sz = mma_pack_sz(scale, zero)
    assert sz.shape == (3, 8, 5, 2) and sz.dtype == torch.int32 and sz.stride(3) == 1
    assert (sz.stride(1), sz.stride(2)) == (10, 2)  # stored [t, r, g, h]
    for t in range(3):
        for g in range(5):
            for r in range(8):
                for h in range(2):
                    v, row = int(sz[t, r, g, h]), 16 * t + r + 8 * h
                    bits = torch.tensor([(v >> 16) & 0xFFFF], dtype=torch.int32).to(torch.int16).view(dtype)
                    assert bits.item() == scale[row, g].item()
                    assert v & 0xFFFF == (int(zero[row, g]) if zp else 8)
    with pytest.raises(ValueError, match="bf16 / fp16 scales"):
        mma_pack_sz(torch.ones(16, 2), None)


@pytest.mark.parametrize("m,k,group", [(16, 256, 128), (3, 256, 64), (9, 384, 128)])
def test_x_frag_formula(m, k, group):
    """x in the kernel's fragment order: [g, H, nt, j, lane 4 r + c, w] = x's word [8 nt + r, g group / 2 + 32 H +
    16 j + 4 c + w], rows >= M zero."""
    from quanta.quantization.w_int_mma import x_frag

    x = torch.randn(m, k).bfloat16()
    xf = x_frag(x, group)
    assert xf.shape == (k // group, group // 64, 2, 2, 32, 4) and xf.dtype == torch.int32
    words = x.view(torch.int32)
    for g, h, nt, j, lane, w in torch.cartesian_prod(*(torch.arange(d) for d in xf.shape)).tolist()[::7]:
        row, col = 8 * nt + lane // 4, g * group // 2 + 32 * h + 16 * j + 4 * (lane % 4) + w
        assert int(xf[g, h, nt, j, lane, w]) == (int(words[row, col]) if row < m else 0)
    with pytest.raises(ValueError, match="x_frag takes <= 16 rows"):
        x_frag(torch.zeros(17, 128, dtype=torch.bfloat16), 64)


def test_pack_rejects_ragged_shapes():
    with pytest.raises(ValueError, match="N % 16"):
        mma_pack(torch.zeros(24, 64, dtype=torch.uint8), 128)


def test_ref_equals_canonical_ref():
    from quanta.quantization.w_int_kernel import w_int_linear_ref

    packed = torch.randint(0, 256, (32, 128), dtype=torch.uint8)
    scale = torch.rand(32, 2) * 0.01
    zero = torch.randint(0, 16, (32, 2), dtype=torch.uint8)
    x = torch.randn(3, 256)
    want = w_int_linear_ref(x, packed, scale, zero, 4, 128, 256)
    assert torch.equal(w_int_mma_linear_ref(x, mma_pack(packed, 128), scale, zero, 128), want)


def test_config_text():
    assert MmaConfig.parse("t2_w8_np") == MmaConfig(tiles=2, warps=8, prefetch=False)
    assert str(MmaConfig.parse("t4_w4")) == "t4_w4"
    assert MmaConfig.parse("t1_w8_px") == MmaConfig(tiles=1, warps=8, xprefetch=True)
    assert str(MmaConfig.parse("t1_w8_np_px")) == "t1_w8_np_px"
    assert MmaConfig.parse("t2_w2_np_ps") == MmaConfig(tiles=2, warps=2, prefetch=False, sprefetch=True)
    assert str(MmaConfig.parse("t1_w8_px_ps")) == "t1_w8_px_ps"
    assert MmaConfig.parse("t1_w8_px_ps_p2") == MmaConfig(tiles=1, warps=8, xprefetch=True, sprefetch=True, deep=True)
    assert str(MmaConfig.parse("t1_w8_px_ps_p2")) == "t1_w8_px_ps_p2"
    assert MmaConfig.parse("t2_w2_l2") == MmaConfig(tiles=2, warps=2, l2=True) and str(MmaConfig(l2=True)) == "t1_w4_l2"
    assert MmaConfig.parse("t1_w8_px_ps_r128") == MmaConfig(tiles=1, warps=8, xprefetch=True, sprefetch=True, regs=128)
    assert str(MmaConfig.parse("t1_w8_px_ps_r128")) == "t1_w8_px_ps_r128"
    for bad in ("auto", "t1_w8_xx", "tx_w8", "", "t1_w4_sr", "t1_w8_ns"):  # "_ns" (the old epilogue): removed
        with pytest.raises(ValueError, match="t<tiles>, w<warps>, r<registers>, np"):
            MmaConfig.parse(bad)


def test_rows_and_configs():
    from quanta.quantization import w_int_mma

    assert w_int_mma._rows("2-16") == (2, 16) and w_int_mma._rows("4") == (4, 4) and w_int_mma._rows("") == (0, -1)
    assert w_int_mma.config_for(16, 28672, 4096) == MmaConfig(tiles=2, warps=2, prefetch=False, sprefetch=True)
    assert w_int_mma.config_for(4, 4096, 14336) == MmaConfig(tiles=1, warps=8)
    # 16 rows, x, words and scales prefetched: o one tile a program; down (K >= 8192, 128 programs of two tiles for 132
    # SMs) and qkv (384 tiles > 2 x 132 SMs) two tiles a program sharing x
    assert str(w_int_mma.config_for(16, 4096, 14336)) == "t2_w16_px_ps"
    assert str(w_int_mma.config_for(16, 4096, 4096)) == "t1_w8_px_ps"
    assert str(w_int_mma.config_for(16, 6144, 4096)) == "t2_w8_px_ps"
    assert str(w_int_mma.config_for(16, 2048, 8192)) == "t1_w8_px_ps"  # 1B's down: 64 programs of two tiles too few
    assert w_int_mma.config_for(4, 4096, 4096) == MmaConfig(tiles=1, warps=8, prefetch=False)
    # one row: every warp resident at once; qkv (384 tiles > 2 x 132 SMs) 8 warps at 80 registers, others 16 at 64
    for (n, k), want in {(6144, 4096): "t1_w8_px_ps_r80", (4096, 4096): "t1_w16_ps_r64",
                         (4096, 14336): "t1_w16_ps_r64", (3072, 2048): "t1_w16_ps_r64"}.items():
        assert str(w_int_mma.config_for(1, n, k)) == want
    assert str(w_int_mma.silu_config(1)) == "t2_w4_px_ps_r72" and str(w_int_mma.silu_config(16)) == "t2_w2_np_ps"


def test_shape_configs():
    from quanta.quantization import w_int_mma

    table = w_int_mma.shape_configs("6144x4096=t1_w8; 4096X4096=t2_w4_np;")
    assert table == {(6144, 4096): MmaConfig(tiles=1, warps=8),
                     (4096, 4096): MmaConfig(tiles=2, warps=4, prefetch=False)}
    with pytest.raises(ValueError, match="QUANTA_INT_MMA_SHAPES.*NxK=config"):
        w_int_mma.shape_configs("4096=t1_w8")


def test_only_groups_the_kernel_takes():
    """Groups of 64 / 128 only: a 256 group or a per-channel int4 checkpoint's one group as wide as K (its loads cover
    two 64-k halves) stays on the other GEMVs."""
    from quanta.quantization import w_int_mma

    cuda = torch.device("cuda")
    for group in (256, 4096, 32):
        assert not w_int_mma.supported(group, 4096, 4096, torch.bfloat16, cuda)
    words = mma_pack(torch.zeros(16, 128, dtype=torch.uint8), 256)
    with pytest.raises(ValueError, match="groups of 64 or 128"):
        w_int_mma.w_int_mma_linear(torch.zeros(1, 256, dtype=torch.bfloat16), words, torch.ones(16, 1), None, 256)


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
    assert w_int_mma.silu_config(1) == MmaConfig(tiles=2, warps=4, xprefetch=True, sprefetch=True, regs=72)
    assert w_int_mma.silu_config(16) == MmaConfig(tiles=2, warps=2, prefetch=False, sprefetch=True)
    assert w_int_mma.silu_config(4) == MmaConfig(tiles=2, warps=2)


def test_usable_xf_rows(monkeypatch):
    """x in fragment order only at QUANTA_INT_MMA_XF_ROWS rows (off by default), where the mma GEMV runs at all."""
    from types import SimpleNamespace

    from quanta.quantization import w_int_mma

    layer = SimpleNamespace(weight_mma=torch.zeros(1), in_features=64)
    x16 = torch.zeros(16, 64, dtype=torch.bfloat16)
    assert w_int_mma.XF_ROWS == (0, -1) and not w_int_mma.usable_xf(layer, x16)
    monkeypatch.setattr(w_int_mma, "XF_ROWS", (9, 16))
    assert w_int_mma.usable_xf(layer, x16) and not w_int_mma.usable_xf(layer, x16[:4])
    assert not w_int_mma.usable_xf(SimpleNamespace(weight_mma=None, in_features=64), x16)
