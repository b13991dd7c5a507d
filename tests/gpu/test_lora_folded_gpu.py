"""Folded LoRA on a GPU: the lora_folded kernel vs its twin (bench shapes, dtypes, bias, 1..64 tokens), a
folded LoRALinear == the unfolded one (eager and replayed in a CUDA graph after the slot mapping changes),
and the engine with folded layers under CUDA graphs == the unfolded engine == peft (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
pytest.importorskip("triton")

from quanta.kernels.lora import group_by_slot, make_lora_meta  # noqa: E402
from quanta.kernels.lora_folded import lora_folded, lora_folded_ref  # noqa: E402

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
TOL = {torch.float16: 1e-2, torch.bfloat16: 2e-2, torch.float32: 1e-4}
ID = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# (name, tokens, slots, rank, output splits, out, bias)
SHAPES = [
    ("1b_qkv_decode32", 32, 8, 16, (2048, 2560), 3072, False),
    ("1b_o_decode32", 32, 8, 16, (), 2048, False),
    ("1b_gate_up_decode32", 32, 8, 16, (8192,), 16384, False),
    ("1b_down_decode1", 1, 8, 16, (), 2048, False),
    ("qwen_qkv_bias_decode64", 64, 4, 64, (3584, 4096), 4608, True),
    ("tiny_odd_shards", 37, 3, 8, (20, 36), 52, True),
]


def _case(shape, dtype, seed=0, all_none=False):
    _, t, s, r, splits, n, bias = shape
    g = torch.Generator().manual_seed(seed)
    ns = len(splits) + 1
    yf = torch.randn(t, n + s * ns * r, generator=g).to("cuda", dtype)
    b = (torch.randn(s, n, r, generator=g) * r**-0.5).to("cuda", dtype)
    bv = torch.randn(n, generator=g).to("cuda", dtype) if bias else None
    slots = torch.randint(-1, s, (t,), generator=g, dtype=torch.int32)
    if all_none:
        slots.fill_(-1)
    return yf, b, bv, make_lora_meta(slots.cuda(), s), splits, n


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-6))


@pytest.mark.parametrize("dtype", DTYPES, ids=ID.get)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s[0])
def test_kernel_matches_twin(shape, dtype):
    yf, b, bv, meta, splits, n = _case(shape, dtype)
    got = lora_folded(yf, b, meta.slots, meta.counts, n, splits, bv)
    ref = lora_folded_ref(yf.float(), b.float(), meta.slots, n, splits, None if bv is None else bv.float())
    assert got.shape == (yf.shape[0], n) and got.is_contiguous() and got.dtype == dtype
    assert _rel(got, ref) < TOL[dtype]
    none = meta.slots < 0
    plain = yf[:, :n].float() + (0 if bv is None else bv.float())
    torch.testing.assert_close(got[none].float(), plain[none].to(dtype).float())  # copied (+ bias)


@pytest.mark.parametrize("block_n", [32, 64, 128])
def test_kernel_block_widths(block_n):
    for shape in SHAPES:
        yf, b, bv, meta, splits, n = _case(shape, torch.bfloat16, seed=block_n)
        got = lora_folded(yf, b, meta.slots, meta.counts, n, splits, bv, block_n)
        ref = lora_folded_ref(yf.float(), b.float(), meta.slots, n, splits, None if bv is None else bv.float())
        assert _rel(got, ref) < TOL[torch.bfloat16], shape[0]


def test_no_adapter_tokens_copy():
    yf, b, bv, meta, splits, n = _case(SHAPES[0], torch.bfloat16, all_none=True)
    assert torch.equal(lora_folded(yf, b, meta.slots, meta.counts, n, splits, bv), yf[:, :n])


def _layers(dtype, t, s, r, k, shards, bias):
    from quanta.layers.linear import MergedLinear
    from quanta.lora.layers import LoRAContext, LoRALinear

    ctx = LoRAContext(t, s, torch.device("cuda"))
    ctx.use_kernels = True
    sizes = list(shards.values())
    table = [(name, sum(sizes[:i]), size) for i, (name, size) in enumerate(shards.items())]
    g = torch.Generator().manual_seed(1)
    w = torch.randn(sum(sizes), k, generator=g) * k**-0.5
    bv = torch.randn(sum(sizes), generator=g) if bias else None
    layers = []
    for fold in (True, False):
        with torch.device("cuda"):
            base = MergedLinear(k, shards, bias).to(dtype)
        base.weight.data.copy_(w)
        if bias:
            base.bias.data.copy_(bv)
        layers.append(LoRALinear(base, ctx, table, r, dtype, torch.device("cuda"), fold=fold))
    for slot in range(s):
        rank = max(1, r >> slot)
        ws = [
            (i, torch.randn(rank, k, generator=g) * k**-0.5, torch.randn(size, rank, generator=g) * rank**-0.5)
            for i, size in enumerate(sizes)
            if (i + slot) % 3
        ]
        for layer in layers:
            layer.set_slot(slot, [(i, a.to("cuda", dtype), bb.to("cuda", dtype)) for i, a, bb in ws])
    assert layers[0].folded and not layers[1].folded
    return ctx, layers[0], layers[1]


def _fill(ctx, slots):
    idx, counts, starts = group_by_slot(slots.numpy(), ctx.num_slots)
    m = ctx.meta
    m.slots.fill_(-1)
    m.slots[: len(slots)].copy_(slots)
    m.sorted_idx[: len(idx)].copy_(torch.as_tensor(idx, dtype=torch.int32))
    m.counts.copy_(torch.as_tensor(counts, dtype=torch.int32))
    m.starts.copy_(torch.as_tensor(starts, dtype=torch.int32))
    m.max_count = int(counts.max(initial=0))
    ctx.active = True


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=ID.get)
@pytest.mark.parametrize("bias", [False, True])
def test_folded_layer_equals_unfolded_eager_and_graph(dtype, bias):
    t, s, r, k = 48, 4, 16, 512
    ctx, folded, plain = _layers(dtype, t, s, r, k, {"q": 512, "k": 128, "v": 128}, bias)
    g = torch.Generator().manual_seed(5)
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
    x = torch.randn(t, k, generator=g).to("cuda", dtype)
    for seed in (0, 1):
        _fill(ctx, torch.randint(-1, s, (t,), generator=torch.Generator().manual_seed(seed), dtype=torch.int32))
        assert _rel(folded(x), plain(x)) < tol
    big = torch.randn(100, k, generator=g).to("cuda", dtype)  # > FOLD_MAX_ROWS: base + shrink / expand
    big_ctx_slots = torch.randint(-1, s, (100,), generator=g, dtype=torch.int32)
    from quanta.lora.layers import LoRAContext

    ctx2 = LoRAContext(100, s, torch.device("cuda"))
    ctx2.use_kernels = True
    folded.ctx = plain.ctx = ctx2
    _fill(ctx2, big_ctx_slots)
    assert _rel(folded(big), plain(big)) < tol
    folded.ctx = plain.ctx = ctx
    # CUDA graph: captured with no adapter tokens, replayed with others
    _fill(ctx, torch.full((t,), -1, dtype=torch.int32))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        folded(x)  # warm up (Triton compiles) off the capture
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = folded(x)
    for seed in (2, 3):
        _fill(ctx, torch.randint(-1, s, (t,), generator=torch.Generator().manual_seed(seed), dtype=torch.int32))
        x.copy_(torch.randn(t, k, generator=g).to(dtype))
        graph.replay()
        torch.cuda.synchronize()
        assert _rel(out, plain(x)) < tol


def test_base_only_forward_unchanged():
    """ctx.active False: the base GEMM on the weight view gives the bits of the unfolded layer's."""
    ctx, folded, plain = _layers(torch.bfloat16, 32, 4, 16, 2048, {"gate": 8192, "up": 8192}, False)
    x = torch.randn(32, 2048, device="cuda", dtype=torch.bfloat16)
    ctx.active = False
    assert folded.base.weight.is_contiguous() and folded.base.weight.data_ptr() == folded.w_full.data_ptr()
    assert torch.equal(folded(x), plain(x))


def test_engine_folded_equals_unfolded_and_peft(tmp_path, monkeypatch):
    import quanta.lora.layers as L
    from quanta import LLM, SamplingParams
    from quanta.llmapi import LoraConfig, LoRARequest
    from tests.conftest import make_tiny_model
    from tests.test_lora import ALL, PeftRef, make_adapter, prompts

    base = make_tiny_model(tmp_path / "qwen2", "qwen2")  # q|k|v with a bias
    specs = [(4, ALL), (16, ["q_proj", "v_proj"]), (8, ["o_proj", "up_proj", "down_proj"])]
    reqs = [
        LoRARequest(f"a{i}", i + 1, str(make_adapter(base, tmp_path / f"a{i}", r, t, seed=i)))
        for i, (r, t) in enumerate(specs)
    ]
    order = [reqs[i % 3] if i % 4 else None for i in range(24)]
    ps = prompts(len(order), seed=2)
    params = SamplingParams(max_tokens=12, end_id=2)
    results = {}
    for fold in (True, False):
        if not fold:
            monkeypatch.setattr(L, "can_fold", lambda *a: False)
        with LLM(
            str(base),
            skip_tokenizer_init=True,
            dtype="float32",
            max_batch_size=32,
            lora_config=LoraConfig(max_lora_rank=16, max_loras=3),
        ) as llm:
            assert all(layer.folded == fold for layer in llm.engine.runner.lora.layers.values())
            results[fold] = [
                o.outputs[0].token_ids for o in llm.generate(ps, params, lora_request=order, use_tqdm=False)
            ]
    assert results[True] == results[False]
    refs = {None: PeftRef(base, None, "cuda")}
    for lr in reqs:
        refs[lr.lora_path] = PeftRef(base, lr.lora_path, "cuda")
    for p, lr, got in zip(ps, order, results[True]):
        assert got == refs[lr.lora_path if lr else None].greedy(p, 12)[0]
