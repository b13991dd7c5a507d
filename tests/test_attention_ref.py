"""The torch_ref backend (ground truth of the kernels, attention of the CPU engine) vs dense causal
attention computed straight from each sequence's full K/V, plus the backend registry."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_cases import dense_attention, make_paged_batch, rel_err  # noqa: E402

from quanta.attention.backend import available_backends, get_backend  # noqa: E402

CASES = [
    # seqs as (cached prefix, new tokens), num_heads, num_kv_heads, head_dim, block_size, pad_tokens
    ([(0, 7), (5, 1), (20, 9), (33, 1), (16, 16)], 4, 2, 32, 16, 3),  # mixed prefill/decode/chunked
    ([(0, 12), (40, 1), (3, 30)], 6, 2, 40, 32, 0),  # GQA 3, odd head_dim
    ([(0, 21), (0, 3)], 8, 4, 8, 16, 2),  # stories260K-like shape, pure prefill
    ([(100, 1), (1, 1), (63, 1), (64, 1)], 8, 1, 64, 64, 0),  # pure decode, MQA, page boundaries
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"h{c[1]}kv{c[2]}d{c[3]}bs{c[4]}")
def test_torch_ref_matches_dense(case) -> None:
    seqs, h, kh, d, bs, pad = case
    b = make_paged_batch(seqs, h, kh, d, bs, pad_tokens=pad, seed=1)
    expected = dense_attention(b, d**-0.5)
    cache_before = (b.k_cache.clone(), b.v_cache.clone())
    out = get_backend("torch_ref").forward(b.q, b.k, b.v, b.k_cache, b.v_cache, b.meta, d**-0.5)
    n = b.num_real_tokens
    assert out.shape == b.q.shape and out.dtype == b.q.dtype
    assert rel_err(out[:n], expected) < 1e-5
    assert torch.all(out[n:] == 0)  # padding tokens belong to no sequence
    # K/V landed at their slots; slot -1 (padding) wrote nothing.
    slots = b.meta.slot_mapping
    real = slots >= 0
    assert torch.equal(b.k_cache.view(-1, kh, d)[slots[real]], b.k[real])
    assert torch.equal(b.v_cache.view(-1, kh, d)[slots[real]], b.v[real])
    untouched = torch.ones(b.k_cache.shape[0] * bs, dtype=torch.bool)
    untouched[slots[real]] = False
    assert torch.equal(b.k_cache.view(-1, kh, d)[untouched], cache_before[0].view(-1, kh, d)[untouched])


WINDOW_CASES = [
    # seqs, num_heads, num_kv_heads, head_dim, block_size, window
    ([(0, 21), (30, 9), (70, 1), (5, 1), (16, 16)], 4, 2, 16, 16, 5),  # window inside one block
    ([(0, 40), (33, 7), (100, 1), (2, 1)], 4, 4, 8, 8, 17),  # window across blocks
    ([(3, 4), (9, 1)], 4, 2, 16, 16, 64),  # window longer than every sequence: plain causal
]


@pytest.mark.parametrize("case", WINDOW_CASES, ids=lambda c: f"w{c[5]}bs{c[4]}")
def test_torch_ref_sliding_window_matches_dense(case) -> None:
    from dataclasses import replace

    seqs, h, kh, d, bs, window = case
    b = make_paged_batch(seqs, h, kh, d, bs, pad_tokens=2, seed=3)
    out = get_backend("torch_ref").forward(b.q, b.k, b.v, b.k_cache, b.v_cache, replace(b.meta, window=window), 0.3)
    n = b.num_real_tokens
    assert rel_err(out[:n], dense_attention(b, 0.3, window=window)) < 1e-5
    if window < 64:  # the window really changes the answer
        assert rel_err(out[:n], dense_attention(b, 0.3)) > 1e-2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_torch_ref_half_precision(dtype: torch.dtype) -> None:
    b = make_paged_batch([(9, 4), (30, 1)], 4, 2, 16, 16, dtype=dtype, seed=2)
    out = get_backend("torch_ref").forward(b.q, b.k, b.v, b.k_cache, b.v_cache, b.meta, 0.25)
    assert out.dtype == dtype
    assert rel_err(out[: b.num_real_tokens], dense_attention(b, 0.25)) < 1e-2


def test_registry() -> None:
    assert {"torch_ref", "triton"} <= set(available_backends())
    backend = get_backend("torch_ref")
    assert backend.name == "torch_ref" and hasattr(backend, "forward")
    with pytest.raises(ValueError, match="unknown attention backend"):
        get_backend("no_such_backend")


def test_torch_ref_works_without_triton() -> None:
    # A CPU-only install: make `import triton` fail, then run the reference backend end to end.
    code = """
import sys
class _NoTriton:
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("no triton here")
sys.meta_path.insert(0, _NoTriton())
sys.modules.pop("triton", None)
import torch
from quanta.attention.backend import get_backend
from quanta.attention.metadata import AttentionMetadata
kc = torch.zeros(4, 16, 2, 8); vc = torch.zeros(4, 16, 2, 8)
meta = AttentionMetadata(
    slot_mapping=torch.tensor([16, 17, 18]), block_tables=torch.tensor([[1, 0]], dtype=torch.int32),
    seq_lens=torch.tensor([3], dtype=torch.int32), query_start_loc=torch.tensor([0, 3], dtype=torch.int32),
    max_query_len=3, max_seq_len=3)
out = get_backend("torch_ref").forward(torch.randn(3, 4, 8), torch.randn(3, 2, 8), torch.randn(3, 2, 8), kc, vc, meta, 0.3)
assert out.shape == (3, 4, 8) and "triton" not in sys.modules
try:
    get_backend("triton").forward(torch.randn(3, 4, 8), torch.randn(3, 2, 8), torch.randn(3, 2, 8), kc, vc, meta, 0.3)
except RuntimeError as e:
    assert "needs triton" in str(e)
else:
    raise AssertionError("triton backend ran without triton")
"""
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), src) if p)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
