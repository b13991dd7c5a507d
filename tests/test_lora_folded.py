"""Folded LoRA (base weight + every slot's A in one buffer; decode-sized forwards run one GEMM + one kernel):
folded == unfolded == a naive loop for merged q|k|v and gate|up layers (adapters of several ranks on subsets
of the shards, tokens without an adapter, a slot replaced), the weight aliasing (loading through
weight_loader, base-only forwards, a replaced weight raises), an engine run on the folded path == peft, and
the Triton kernel vs its twin through Triton's interpreter (child process: TRITON_INTERPRET must be set
before triton is imported). GPU checks: tests/gpu/test_lora_folded_gpu.py."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"

# (name, in, shards {name: size}, bias, slots, max rank, adapters per slot: {shard index: rank})
LAYERS = [
    ("qkv_odd_shards", 40, {"q": 20, "k": 12, "v": 12}, False, 3, 8, [{0: 8, 1: 8, 2: 8}, {0: 4, 2: 4}, {1: 2}]),
    ("gate_up", 32, {"gate": 48, "up": 48}, False, 4, 16, [{0: 16, 1: 16}, {1: 3}, None, {0: 8}]),
    ("qkv_bias", 24, {"q": 16, "k": 8, "v": 8}, True, 2, 4, [{0: 4, 2: 2}, {0: 1, 1: 4, 2: 4}]),
    ("plain_o", 48, {"o": 40}, False, 2, 8, [{0: 8}, {0: 5}]),
]


def _ctx(num_tokens: int, num_slots: int):
    from quanta.lora.layers import LoRAContext

    return LoRAContext(num_tokens, num_slots, torch.device("cpu"))


def _fill(ctx, slots: torch.Tensor) -> None:
    """What LoRAManager.prepare writes (on the CPU the host buffers are the device buffers)."""
    from quanta.kernels.lora import group_by_slot

    t = len(slots)
    idx, counts, starts = group_by_slot(slots.numpy(), ctx.num_slots)
    ctx.h_slots[:] = -1
    ctx.h_slots[:t] = slots
    ctx.h_sorted[: len(idx)] = torch.as_tensor(idx, dtype=torch.int32)
    ctx.h_counts[:] = torch.as_tensor(counts, dtype=torch.int32)
    ctx.h_starts[:] = torch.as_tensor(starts, dtype=torch.int32)
    ctx.meta.max_count = int(counts.max(initial=0))
    ctx.active = True


def _base(k: int, shards: dict[str, int], bias: bool, seed: int):
    from quanta.layers.linear import Linear, MergedLinear

    layer = MergedLinear(k, shards, bias) if len(shards) > 1 else Linear(k, sum(shards.values()), bias)
    g = torch.Generator().manual_seed(seed)
    layer.weight.data.copy_(torch.randn(layer.weight.shape, generator=g) * k**-0.5)
    if bias:
        layer.bias.data.copy_(torch.randn(layer.bias.shape, generator=g))
    return layer


def _adapter(k: int, sizes: list[int], spec: dict[int, int] | None, seed: int):
    if spec is None:
        return None
    g = torch.Generator().manual_seed(seed)
    return [
        (i, torch.randn(r, k, generator=g) * k**-0.5, torch.randn(sizes[i], r, generator=g) * r**-0.5)
        for i, r in spec.items()
    ]


def _pair(case, num_tokens: int = 80):
    """(ctx, folded layer, unfolded layer, adapter weights per slot) over copies of one base layer."""
    from quanta.lora.layers import LoRALinear

    name, k, shards, bias, s, r, specs = case
    ctx = _ctx(num_tokens, s)
    sizes = list(shards.values())
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    table = [(n, st, sz) for n, st, sz in zip(shards, starts, sizes)]
    layers = []
    for fold in (True, False):
        base = _base(k, shards, bias, seed=len(name))
        layers.append(LoRALinear(base, ctx, table, r, torch.float32, torch.device("cpu"), fold=fold))
    weights = [_adapter(k, sizes, spec, seed=100 + i) for i, spec in enumerate(specs)]
    for layer in layers:
        for slot, w in enumerate(weights):
            layer.set_slot(slot, w)
    return ctx, layers[0], layers[1], weights


def _naive(base, weights, x, slots, shard_ranges):
    y = torch.nn.functional.linear(x, base.weight, base.bias)
    for t in range(x.shape[0]):
        s = int(slots[t])
        for shard, a, b in (weights[s] or []) if s >= 0 else []:
            start, size = shard_ranges[shard]
            y[t, start : start + size] += b @ (a @ x[t])
    return y


@pytest.mark.parametrize("case", LAYERS, ids=lambda c: c[0])
def test_folded_equals_unfolded_and_naive(case, monkeypatch):
    import quanta.lora.layers as L

    ctx, folded, plain, weights = _pair(case)
    assert folded.folded and not plain.folded
    calls = []
    monkeypatch.setattr(L, "lora_folded_ref", lambda *a, **kw: calls.append(1) or _twin(*a, **kw))
    s = ctx.num_slots
    g = torch.Generator().manual_seed(7)
    for t in (1, 13, L.FOLD_MAX_ROWS, L.FOLD_MAX_ROWS + 9):  # the last one runs base + lora_apply
        x = torch.randn(t, folded.in_features, generator=g)
        slots = torch.randint(-1, s, (t,), generator=g, dtype=torch.int32)
        slots[0] = -1  # a token without an adapter
        _fill(ctx, slots)
        n = len(calls)
        got, ref = folded(x), plain(x)
        assert len(calls) == n + (t <= L.FOLD_MAX_ROWS)
        assert got.shape == (t, folded.out_features) and got.is_contiguous()
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got, _naive(plain.base, weights, x, slots, plain.shard_ranges), atol=1e-4, rtol=1e-4)
        none = slots < 0
        torch.testing.assert_close(got[none], torch.nn.functional.linear(x[none], plain.base.weight, plain.base.bias))
    # replace slot 1's adapter (another rank, other shards), then a 3-D input
    nshards = len(folded.shard_ranges)
    new = _adapter(folded.in_features, [sz for _, sz in folded.shard_ranges], {nshards - 1: 2}, seed=999)
    folded.set_slot(1, new)
    plain.set_slot(1, new)
    weights[1] = new
    x = torch.randn(2, 5, folded.in_features, generator=g)
    slots = torch.tensor([1, 1, -1, 0, 1, 1, 0, -1, 1, 1], dtype=torch.int32)
    _fill(ctx, slots)
    got = folded(x)
    assert got.shape == (2, 5, folded.out_features)
    torch.testing.assert_close(got, plain(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        got.view(10, -1), _naive(plain.base, weights, x.view(10, -1), slots, plain.shard_ranges), atol=1e-4, rtol=1e-4
    )
    ctx.active = False  # a step without adapters: the base layer alone, on the weight view
    torch.testing.assert_close(folded(x), plain.base(x))


def _twin(*args, **kw):
    from quanta.kernels.lora_folded import lora_folded_ref

    return lora_folded_ref(*args, **kw)


def test_weight_aliasing_and_loading():
    from quanta.layers.linear import MergedLinear
    from quanta.lora.layers import LoRALinear, can_fold

    ctx, folded, _, _ = _pair(LAYERS[0])
    base = folded.base
    n, k = folded.out_features, folded.in_features
    w_full = folded.w_full
    assert w_full.shape == (n + ctx.num_slots * 3 * folded.max_rank, k) and w_full.is_contiguous()
    assert base.weight.data_ptr() == w_full.data_ptr() and base.weight.is_contiguous()
    assert isinstance(base.weight, torch.nn.Parameter) and base.weight.shape == (n, k)
    assert folded.lora_a.data_ptr() == w_full[n:].data_ptr() and folded.lora_a.stride(2) == 1
    assert folded.lora_a.shape == (ctx.num_slots, 3 * folded.max_rank, k)
    assert torch.count_nonzero(w_full[n:]) > 0  # set_slot wrote A into w_full
    # loading (re)writes the view in place: the folded GEMM sees the new weights
    new_k = torch.randn(12, k)
    base.weight.weight_loader(base.weight, new_k, "k")
    assert torch.equal(w_full[20:32], new_k)
    base.weight_loader(base.weight, torch.zeros(n, k))
    assert torch.count_nonzero(w_full[:n]) == 0 and torch.count_nonzero(w_full[n:]) > 0
    # a replaced weight would leave w_full stale: the folded path refuses to run
    _fill(ctx, torch.tensor([0, 1, -1], dtype=torch.int32))
    base.weight.data = torch.randn(n, k)
    with pytest.raises(RuntimeError, match="replaced after folding"):
        folded(torch.randn(3, k))
    # not folded: quantized, other dtype
    q = MergedLinear(8, {"a": 8, "b": 8})
    q.quant_method = object()
    assert not can_fold(q, torch.float32, torch.device("cpu"))
    assert not can_fold(MergedLinear(8, {"a": 8}), torch.float16, torch.device("cpu"))
    wrapped = LoRALinear(q, ctx, [("a", 0, 8), ("b", 8, 8)], 4, torch.float32, torch.device("cpu"))
    assert not wrapped.folded and wrapped.lora_a.shape == (ctx.num_slots, 8, 8)


def test_twin_matches_naive_loop():
    from quanta.kernels.lora_folded import lora_folded_ref

    g = torch.Generator().manual_seed(3)
    t, n, s, r, splits = 9, 30, 3, 4, (10, 20)
    yf = torch.randn(t, n + s * 3 * r, generator=g)
    b = torch.randn(s, n, r, generator=g)
    bias = torch.randn(n, generator=g)
    slots = torch.tensor([2, -1, 0, 0, 1, 2, -1, 1, 0], dtype=torch.int32)
    out = lora_folded_ref(yf, b, slots, n, splits, bias)
    ref = yf[:, :n] + bias
    for i in range(t):
        sl = int(slots[i])
        if sl < 0:
            continue
        for c in range(n):
            shard = (c >= 10) + (c >= 20)
            u = yf[i, n + sl * 3 * r + shard * r : n + sl * 3 * r + (shard + 1) * r]
            ref[i, c] += u @ b[sl, c]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_engine_decode_runs_folded_and_matches_peft(tmp_path, tiny_model_factory, monkeypatch):
    import quanta.lora.layers as L
    from quanta import LLM, SamplingParams
    from quanta.llmapi import LoraConfig, LoRARequest
    from tests.test_lora import ALL, PeftRef, make_adapter, prompts

    base = tiny_model_factory("qwen2")  # q|k|v with a bias
    ad = make_adapter(base, tmp_path / "a", 8, ALL, seed=4)
    calls = []
    monkeypatch.setattr(L, "lora_folded_ref", lambda *a, **kw: calls.append(1) or _twin(*a, **kw))
    ps = prompts(3, seed=6)
    lr = LoRARequest("a", 1, str(ad))
    with LLM(
        str(base), skip_tokenizer_init=True, max_batch_size=8, lora_config=LoraConfig(max_lora_rank=8, max_loras=2)
    ) as llm:
        layers = llm.engine.runner.lora.layers
        assert layers and all(layer.folded for layer in layers.values())
        outs = llm.generate(ps, SamplingParams(max_tokens=6, end_id=2), lora_request=[lr, None, lr], use_tqdm=False)
    assert calls
    ref_a, ref_base = PeftRef(base, ad), PeftRef(base, None)
    for p, lra, out in zip(ps, [lr, None, lr], outs):
        assert out.outputs[0].token_ids == (ref_a if lra else ref_base).greedy(p, 6)[0]


# ---------------------------------------------------------------- the Triton kernel, interpreted
# (name, tokens, slots, rank, splits, out, bias, block_n or None): fp32 in the interpreter
KERNEL_CASES = [
    ("qkv_odd_shards_bn32", 13, 3, 8, (20, 32), 44, False, 32),
    ("gate_up_two_blocks", 5, 4, 16, (48,), 96, True, 32),
    ("plain_one_token", 1, 2, 4, (), 40, True, None),
    ("qkv_64_tokens_r12", 64, 2, 12, (64, 80), 96, False, None),
    ("no_adapter", 7, 2, 8, (16,), 32, True, None),
    ("r40_five_slots_three_k_steps", 9, 5, 40, (24,), 56, False, None),  # 2 slots of 64 ranks per step
]


def kernel_child() -> dict:
    from quanta.kernels.lora import make_lora_meta
    from quanta.kernels.lora_folded import lora_folded, lora_folded_ref

    res = {}
    for name, t, s, r, splits, n, bias, bn in KERNEL_CASES:
        g = torch.Generator().manual_seed(len(name))
        ns = len(splits) + 1
        yf = torch.randn(t, n + s * ns * r, generator=g)
        b = torch.randn(s, n, r, generator=g)
        bv = torch.randn(n, generator=g) if bias else None
        slots = torch.randint(-1, s - 1, (t,), generator=g, dtype=torch.int32)  # the last slot: no tokens
        if name == "no_adapter":
            slots.fill_(-1)
        meta = make_lora_meta(slots, s)
        yf[:, n + (s - 1) * ns * r :] = float("nan")  # a slot without tokens is never read
        got = lora_folded(yf, b, meta.slots, meta.counts, n, splits, bv, bn)
        ref = lora_folded_ref(yf, b, slots, n, splits, bv)  # torch.where drops the NaNs of other slots
        err = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-6))
        res[name] = err if torch.isfinite(got).all() else float("inf")
    return res


@pytest.fixture(scope="module")
def interpreted() -> dict:
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(SRC), str(HERE)]))
    code = "import json, test_lora_folded as t; print(json.dumps(t.kernel_child()))"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=HERE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", [c[0] for c in KERNEL_CASES])
def test_kernel_matches_twin_interpreted(interpreted, name):
    assert interpreted[name] < 1e-5
