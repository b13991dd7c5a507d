"""The split add + RMSNorm's math (kernels/split_norm.py) on the CPU: its twins against the plain norm, and the
model code's fallback where no GEMV can take it (every CPU run)."""

from __future__ import annotations

import torch

from quanta.kernels.split_norm import inv_rms_ref, split_norm_ref
from quanta.layers.norm import rms_norm_ref


def test_split_norm_ref_equals_norm_then_linear():
    g = torch.Generator().manual_seed(0)
    n, k = 96, 64
    y = torch.randn(k, generator=g) * 2
    res = torch.randn(k, generator=g).bfloat16()
    nw = (torch.rand(k, generator=g) + 0.5).bfloat16()
    w = torch.randn(n, k, generator=g)
    h, xw, parts = split_norm_ref(y, res, nw, block_n=8)
    assert parts.shape == (8,) and torch.equal(h, (y.bfloat16().float() + res.float()).bfloat16())
    got = inv_rms_ref(parts, k, 1e-5) * (w @ xw.float())
    want = w @ rms_norm_ref(h[None], nw, 1e-5)[0].float()
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


def test_linear_add_norm_falls_back_on_cpu():
    from quanta.layers import fast_ops
    from quanta.layers.linear import Linear
    from quanta.layers.norm import RMSNorm

    lin, nxt, norm = Linear(32, 16), Linear(16, 24), RMSNorm(16)
    for mod in (lin, nxt):
        torch.nn.init.normal_(mod.weight)  # Linear's weight starts as torch.empty
    x, res = torch.randn(1, 32), torch.randn(1, 16)
    out, r = fast_ops.linear_add_norm(lin, x, res, norm, nxt, silu=False)
    assert r is res and torch.equal(out, lin(x))
    out, r = fast_ops.linear_add_norm(lin, x, None, norm, nxt, silu=True, fallback=lambda t: t * 2)
    assert r is None and torch.equal(out, x * 2)


def test_layers_know_the_next_one_without_owning_it():

    from transformers import LlamaConfig

    from quanta.models.llama import LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64)
    model = LlamaForCausalLM(cfg)
    layers = model.model.layers
    assert [lay.next_layer for lay in layers] == [(layers[1],), (layers[2],), ()]
    names = [n for n, _ in model.named_modules()]
    assert len(names) == len(set(names)) and not any("next_layer" in n for n in names)
