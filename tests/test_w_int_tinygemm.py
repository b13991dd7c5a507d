"""PyTorch's int4 GEMM route for W4A16 (quantization/w_int_tinygemm.py): the layout conversion on the CPU (through
PyTorch's CPU twin of the op), the kernel and the engine on a GPU against the reference."""

from __future__ import annotations

import pytest
import torch

from quanta.quantization import w_int_tinygemm as tg
from quanta.quantization.int_quant import dequantize_groups, pack_int4, unpack_int4


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-6))


def _case(n: int, k: int, group: int, zp: bool, device: str = "cpu", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    s = (torch.rand(n, k // group, generator=g) * 0.01 + 0.001).bfloat16()
    z = torch.randint(0, 16, (n, k // group), generator=g, dtype=torch.uint8) if zp else None
    return q.to(device), s.to(device), None if z is None else z.to(device)


def test_high_nibble_even_swaps_the_packing() -> None:
    q, _, _ = _case(8, 64, 32, False)
    swapped = tg.high_nibble_even(pack_int4(q))
    assert torch.equal((swapped >> 4), q[:, 0::2]) and torch.equal(swapped & 0xF, q[:, 1::2])
    assert torch.equal(unpack_int4(tg.high_nibble_even(swapped)), q)


@pytest.mark.skipif(not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"), reason="no CPU int4pack op")
@pytest.mark.parametrize("zp", [False, True])
@pytest.mark.parametrize("group", [32, 128])
def test_scales_and_zeros_give_quantas_dequantization(zp: bool, group: int) -> None:
    """PyTorch's CPU int4 GEMM (same (q - 8) * scale + zero formula as the CUDA one) on our scales-and-zeros."""
    n, k = 64, 256
    q, s, z = _case(n, k, group, zp)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(1)).bfloat16()
    ref = x.float() @ dequantize_groups(q, s, z, 4, group, k, torch.float32).t()
    w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), tg.INNER_K_TILES)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, w, group, tg.scales_and_zeros(s, z))
    assert _rel(y, ref) < 1e-2


def test_supported_names_what_tinygemm_takes() -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    ok = tg._ops_present()
    assert tg.supported(4, 128, 4096, 4096, torch.bfloat16, cuda) == ok
    assert not tg.supported(4, 128, 4096, 4096, torch.bfloat16, cpu)
    assert not tg.supported(8, 128, 4096, 4096, torch.bfloat16, cuda)
    assert not tg.supported(4, 128, 4096, 4096, torch.float16, cuda)
    assert not tg.supported(4, 96, 4096, 4096, torch.bfloat16, cuda)
    assert not tg.supported(4, 128, 4100, 4096, torch.bfloat16, cuda)
    assert not tg.supported(4, 128, 4096, 4000, torch.bfloat16, cuda)


# ---------------------------------------------------------------- GPU
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 3, 16, 64])
@pytest.mark.parametrize("n,k,group,zp", [(512, 1024, 128, False), (6144, 4096, 128, True), (4096, 14336, 64, False),
                                          (3072, 2048, 32, True)])
def test_tinygemm_matches_reference_gpu(m: int, n: int, k: int, group: int, zp: bool) -> None:
    from quanta.quantization.w_int_kernel import w_int_linear_ref

    q, s, z = _case(n, k, group, zp, "cuda")
    packed = pack_int4(q)
    x = torch.randn(m, k, device="cuda", generator=torch.Generator("cuda").manual_seed(2)).bfloat16()
    bias = torch.randn(n, device="cuda").bfloat16()
    ref = w_int_linear_ref(x.float(), packed, s.float(), z, 4, group, k, bias.float())
    w, sz = tg.pack(packed, s, z)
    assert _rel(tg.linear(x, w, sz, group, n, bias), ref) < 2e-2


@cuda
@pytest.mark.gpu
def test_engine_on_tinygemm_gives_the_reference_tokens(monkeypatch) -> None:
    from quanta import LLM, SamplingParams
    from quanta.assets import ASSETS
    from quanta.config import CalibConfig, QuantConfig

    monkeypatch.setattr(tg, "MAX_ROWS", 16)
    kw = dict(quant_config=QuantConfig(quant_algo="W4A16_AWQ"), calib_config=CalibConfig(
        calib_dataset="random", calib_batches=4, calib_max_seq_length=128), max_batch_size=8, dtype="bfloat16")
    p = SamplingParams(max_tokens=16)
    with LLM(str(ASSETS / "quanta-tiny"), **kw) as fast:
        attached = sum(hasattr(mod, "tinygemm") for mod in fast.engine.runner.model.modules())
        a = fast.generate(["Once upon a time", "The cat"], p, use_tqdm=False)
    with LLM(str(ASSETS / "quanta-tiny"), disable_kernels=True, enforce_eager=True, **kw) as ref:
        b = ref.generate(["Once upon a time", "The cat"], p, use_tqdm=False)
    assert attached >= 6 * 4  # qkv, o, gate_up and down of the 6 layers
    for x, y in zip(a, b):
        assert x.outputs[0].token_ids[:8] == y.outputs[0].token_ids[:8]
