"""Quantized GEMM fast paths vs their references.

CPU: the Triton weight-only kernel (W4A16 / W8A16) under Triton's interpreter, in one child process
(TRITON_INTERPRET must be set before triton is imported; `python tests/test_quantization_kernels.py` prints
{case: relative error}). GPU (skipped without CUDA): the same kernel compiled, torch._int_mm (SmoothQuant),
torch._scaled_mm (FP8), and a whole quantized model with kernels vs the reference path.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

TOL = 1e-3

# (name, M, N, K, group, bits, zero point, bias, dtype)
W_INT_CASES = [
    ("w4_gemv_g32_ragged_k", 1, 96, 172, 32, 4, False, False, torch.float32),
    ("w4_m5_g64_zp_bias", 5, 64, 128, 64, 4, True, True, torch.float32),
    ("w4_m40_g128", 40, 72, 256, 128, 4, False, False, torch.float32),
    ("w8_m33_g128_bias", 33, 80, 256, 128, 8, False, True, torch.float32),
    ("w8_per_channel_m70_zp", 70, 48, 64, 64, 8, True, False, torch.float32),
    ("w8_per_channel_m2_gemv", 2, 40, 512, 512, 8, False, True, torch.float32),
    # one row of whole K steps (the shapes the removed int32-word GEMV took; the asm GEMV needs a GPU)
    ("row1_w8_m1_g128_bias", 1, 24, 1024, 128, 8, False, True, torch.float32),
    ("row1_w4_m1_g64_zp_bias", 1, 40, 2048, 64, 4, True, True, torch.float32),
    ("row1_w4_m1_g128_fp16", 1, 16, 2048, 128, 4, False, False, torch.float16),
    ("row1_w4_m1_g32_zp_split", 1, 8, 4096, 32, 4, True, False, torch.float32),
    ("bytes_w8_m1_g128_zp_ragged", 1, 24, 384, 128, 8, True, False, torch.float32),
    ("bytes_w4_m2_g128_fp16", 2, 32, 512, 128, 4, False, False, torch.float16),
    ("bytes_w4_m3_g64_zp_bias", 3, 40, 256, 64, 4, True, True, torch.float32),
    ("next_w4_m1_g32_ragged__bn4_bk64_sk1_nx", 1, 24, 300, 32, 4, True, False, torch.float32),
    ("next_w4_m2_g128_split2__bn8_bk128_sk2_nx", 2, 40, 1024, 128, 4, False, True, torch.float32),
    ("next_w8_m1_g64__bn4_bk128_sk1_nx", 1, 24, 512, 64, 8, True, True, torch.float32),
    # >= DEQUANT_MIN_ROWS rows: dequantize (w_int_dequant.py), then the matmul
    ("dequant_w4_m64_g32_zp_ragged", 64, 40, 172, 32, 4, True, True, torch.float32),
    ("dequant_w4_m80_g128_fp16", 80, 48, 256, 128, 4, False, False, torch.float16),
]
# the tl.dot GEMM forced at small M (w_int_linear sends M <= 16 to the GEMV)
W_INT_GEMM_CASES = [
    ("gemm_w4_m1_g32_ragged_k", 1, 96, 172, 32, 4, False, False, torch.float32),
    ("gemm_w4_m5_g64_zp_bias", 5, 64, 128, 64, 4, True, True, torch.float32),
    ("gemm_w8_m3_g128", 3, 40, 256, 128, 8, False, False, torch.float32),
]


# (name, N, K, group, bits, zero point, scale dtype, output dtype): w_int_dequant must equal dequantize_groups exactly
DEQUANT_EXACT_CASES = [
    ("exact_dequant_w4_g32_zp_ragged_fp32scale_to_fp16", 40, 172, 32, 4, True, torch.float32, torch.float16),
    ("exact_dequant_w4_g128_fp16", 33, 512, 128, 4, False, torch.float16, torch.float16),
    ("exact_dequant_w8_g64_zp_fp32", 17, 320, 64, 8, True, torch.float32, torch.float32),
]


def _case(m, n, k, group, bits, zp, bias, dtype, device="cpu", seed=0):  # also used by test_kernels_interpret
    from quanta.quantization.int_quant import group_qparams, pack_int4, quantize_groups

    g = torch.Generator().manual_seed(seed)
    w, x = torch.randn(n, k, generator=g), torch.randn(m, k, generator=g)
    s, z = group_qparams(w, bits, group, zp, dtype)
    q = quantize_groups(w, s, z, bits, group)
    packed = pack_int4(q) if bits == 4 else q
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    t = [x.to(dtype), packed, s, z, b]
    return [v.to(device) if v is not None else None for v in t]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-6))


def _run_all() -> dict:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from functools import partial

    from quanta.kernels.gemv import GemvConfig
    from quanta.quantization.w_int_kernel import w_int_gemm, w_int_gemv, w_int_linear, w_int_linear_ref

    results: dict = {}
    for name, m, n, k, group, bits, zp, bias, dtype in W_INT_CASES + W_INT_GEMM_CASES:
        fn = w_int_gemm if name.startswith("gemm_") else w_int_linear
        if name.startswith("next_"):  # the byte GEMV with the next step's weights loaded early ("_nx")
            fn = partial(w_int_gemv, config=GemvConfig.parse(name.split("__")[1]))
        try:
            x, p, s, z, b = _case(m, n, k, group, bits, zp, bias, dtype)
            results[name] = _rel(fn(x, p, s, z, bits, group, k, b), w_int_linear_ref(x, p, s, z, bits, group, k, b))
        except Exception as e:  # report per case
            results[name] = f"{type(e).__name__}: {e}"
    from quanta.quantization.int_quant import dequantize_groups, unpack_int4
    from quanta.quantization.w_int_dequant import w_int_dequant

    # the dequantized weight itself, bit for bit against the twin's (scales stored in fp32 and in the x dtype)
    for name, n, k, group, bits, zp, scale_dtype, dtype in DEQUANT_EXACT_CASES:
        try:
            _, p, s, z, _ = _case(1, n, k, group, bits, zp, False, scale_dtype)
            want = dequantize_groups(unpack_int4(p) if bits == 4 else p, s, z, bits, group, k, dtype)
            got = w_int_dequant(p, s, z, bits, group, k, dtype)
            results[name] = float((got.float() - want.float()).abs().max())
        except Exception as e:
            results[name] = f"{type(e).__name__}: {e}"
    return results


@pytest.fixture(scope="module")
def interpreted() -> dict:
    from .interpret import run_interpreted  # (this file also runs as the child script)

    return run_interpreted(__file__)


@pytest.mark.parametrize("name", [c[0] for c in DEQUANT_EXACT_CASES])
def test_w_int_dequant_interpreted_is_exact(interpreted: dict, name: str) -> None:
    assert interpreted.get(name, "missing") == 0.0, interpreted.get(name, "missing")


@pytest.mark.parametrize("name", [c[0] for c in W_INT_CASES + W_INT_GEMM_CASES])
def test_w_int_kernel_interpreted_matches_ref(interpreted: dict, name: str) -> None:
    err = interpreted.get(name, "missing")
    assert isinstance(err, float), err
    assert err < TOL, f"{name}: relative error {err:.2e}"


# ---------------------------------------------------------------- GPU
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("m", [1, 7, 16, 100])
@pytest.mark.parametrize("bits,zp", [(4, False), (4, True), (8, False)])
def test_w_int_kernel_gpu(m, bits, zp):
    from quanta.quantization.w_int_kernel import w_int_linear, w_int_linear_ref

    x, p, s, z, b = _case(m, 512, 1024, 128, bits, zp, True, torch.bfloat16, "cuda")
    ref = w_int_linear_ref(x.float(), p, s.float(), z, bits, 128, 1024, b.float())
    assert _rel(w_int_linear(x, p, s, z, bits, 128, 1024, b), ref) < 2e-2


@cuda
@pytest.mark.parametrize("n,k,group,zp,dtype,cfg", [
    (512, 1024, 128, False, torch.bfloat16, "bn8_bk1024_sk0_w4_s3"),
    (6144, 4096, 128, True, torch.bfloat16, "bn16_bk512_sk0_w4_s3"),
    (4096, 14336, 128, False, torch.bfloat16, "bn32_bk512_sk0_w8_s3"),
    (3072, 2048, 64, True, torch.float16, "bn64_bk256_sk0_w4_s3"),
    (1000, 4096, 32, False, torch.bfloat16, "bn16_bk512_sk2_w4_s1"),
    (2048, 8192, 128, True, torch.bfloat16, "bn4_bk2048_sk0_w4_s4"),
    # the next step's words in registers ("_nx"), TMA loads ("_tma"); ragged N (TMA: rows past N read as zeros)
    (1000, 4096, 128, True, torch.bfloat16, "bn8_bk1024_sk0_w4_s1_nx"),
    (4096, 14336, 128, False, torch.bfloat16, "bn8_bk1024_sk2_w4_s1_nx"),
    (3072, 2048, 64, True, torch.float16, "bn8_bk512_sk0_w4_s1_nx"),
    (1000, 4096, 128, True, torch.bfloat16, "bn8_bk1024_sk0_w4_s3_tma"),
    (4096, 14336, 128, False, torch.bfloat16, "bn8_bk1024_sk2_w4_s4_tma"),
    (3072, 2048, 32, False, torch.float16, "bn16_bk512_sk0_w4_s3_tma"),
    # x as planes of half2 pairs in the weights' layout ("_xp", w_int_gemv_asm.x_planes)
    (1000, 4096, 128, True, torch.bfloat16, "bn8_bk1024_sk1_w4_s1_xp"),
    (4096, 14336, 128, False, torch.bfloat16, "bn8_bk1024_sk2_w4_s1_nx_xp"),
    (3072, 2048, 64, True, torch.float16, "bn8_bk512_sk0_w4_s1_xp"),
])
def test_w_int_gemv_asm_gpu(monkeypatch, n, k, group, zp, dtype, cfg):
    """The half2 inline-PTX int4 GEMV (w_int_gemv_asm.py) at one row vs the reference."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("the asm GEMV needs sm_90")
    from quanta.kernels.gemv import GemvConfig
    from quanta.quantization import w_int_gemv_asm
    from quanta.quantization.w_int_kernel import w_int_gemv, w_int_linear_ref

    monkeypatch.setattr(w_int_gemv_asm, "ASM_ENABLED", True)
    x, p, s, z, b = _case(1, n, k, group, 4, zp, True, dtype, "cuda")
    assert w_int_gemv_asm.asm_ok(4, p, x, 1, min(group, GemvConfig.parse(cfg).block_k), True)
    ref = w_int_linear_ref(x.float(), p, s.float(), z, 4, group, k, b.float())
    assert _rel(w_int_gemv(x, p, s, z, 4, group, k, b, GemvConfig.parse(cfg)), ref) < 2e-2


@cuda
@pytest.mark.parametrize("m", [1, 16, 40])
def test_int8_mm_gpu_matches_reference(m):
    from quanta.quantization.int_quant import quant_int8_per_channel, quant_int8_per_token
    from quanta.quantization.smoothquant import int8_mm_gpu

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(m, 256, generator=g).cuda(), torch.randn(128, 256, generator=g).cuda()
    xq, xs = quant_int8_per_token(x)
    wq, ws = quant_int8_per_channel(w)
    ref = (xq.float() * xs) @ (wq.float() * ws[:, None]).t()
    assert _rel(int8_mm_gpu(xq, wq, xs, ws, torch.float32), ref) < 1e-4


@cuda
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("m", [1, 5, 16, 77])
def test_fp8_quant_kernel_and_scaled_mm_match_reference(per_channel, m):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs sm_89+")
    from quanta.config import QuantConfig
    from quanta.kernels.fp8_quant import quant_fp8
    from quanta.layers.linear import Linear
    from quanta.quantization.base import get_quant_method
    from quanta.quantization.int_quant import quant_fp8_per_token, to_fp8

    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, 256, generator=g).cuda().bfloat16()
    static = x.float().abs().amax().reshape(()) / 448
    xq, xs = quant_fp8(x, None if per_channel else static, m + (-m) % 16)
    rq, rs = quant_fp8_per_token(x) if per_channel else (to_fp8(x, static), static)
    assert torch.equal(xq[:m].float(), rq.float()) and not xq[m:].float().any()
    if per_channel:
        assert torch.allclose(xs[:m], rs)
    lin = Linear(256, 128).cuda().bfloat16()
    lin.weight.data.normal_(generator=torch.Generator("cuda").manual_seed(1))
    method = get_quant_method(QuantConfig(quant_algo="FP8_PER_CHANNEL_PER_TOKEN" if per_channel else "FP8"))
    stats = type("S", (), {"act_amax": x.float().abs().amax()})()
    method.quantize(lin, stats)
    ref = (rq.float() * rs) @ (lin.weight.float() * lin.weight_scale).t()
    from quanta.layers import fast_ops

    was = fast_ops.use_kernels()
    fast_ops.set_use_kernels(True)
    try:
        assert _rel(lin(x), ref) < 2e-2
    finally:
        fast_ops.set_use_kernels(was)


@cuda
@pytest.mark.parametrize("algo", ["W4A16_AWQ", "W8A16", "W8A8_SQ_PER_CHANNEL", "FP8"])
def test_quantized_model_kernels_match_reference_on_gpu(algo):
    from quanta import LLM, SamplingParams
    from quanta.assets import ASSETS
    from quanta.config import CalibConfig, QuantConfig

    if algo == "FP8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs sm_89+")
    kw = dict(quant_config=QuantConfig(quant_algo=algo), calib_config=CalibConfig(calib_dataset="random",
              calib_batches=4, calib_max_seq_length=128), max_batch_size=8, enforce_eager=True)
    p = SamplingParams(max_tokens=16)
    with LLM(str(ASSETS / "quanta-tiny"), **kw) as fast:
        a = fast.generate("Once upon a time", p, use_tqdm=False).outputs[0].token_ids
    with LLM(str(ASSETS / "quanta-tiny"), disable_kernels=True, **kw) as ref:
        b = ref.generate("Once upon a time", p, use_tqdm=False).outputs[0].token_ids
    assert a[:8] == b[:8]


if __name__ == "__main__":
    print(json.dumps(_run_all()))
