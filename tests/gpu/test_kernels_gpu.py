"""Every Triton kernel vs its *_ref twin on CUDA, several shapes and dtypes (skipped without a GPU)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
pytest.importorskip("triton")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernel_cases import make_paged_batch, rel_err  # noqa: E402

from quanta.attention.backend import get_backend  # noqa: E402
from quanta.kernels.activation import silu_and_mul, silu_and_mul_ref  # noqa: E402
from quanta.kernels.kv_cache_write import kv_cache_write, kv_cache_write_ref  # noqa: E402
from quanta.kernels.paged_attention import paged_attention_prefill  # noqa: E402
from quanta.kernels.paged_attention_decode import paged_attention_decode  # noqa: E402
from quanta.kernels.paged_attention_ref import paged_attention_ref  # noqa: E402
from quanta.kernels.rms_norm import fused_add_rms_norm, fused_add_rms_norm_ref, rms_norm, rms_norm_ref  # noqa: E402
from quanta.kernels.rotary import apply_rotary_emb, apply_rotary_emb_ref  # noqa: E402

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
TOL = {torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.float32: 1e-3}
ID = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}

# (num_heads, num_kv_heads, head_dim, block_size)
ATTN_SHAPES = [
    (32, 8, 128, 16),  # Llama-3 8B / 3.2-1B (head_dim 64 below)
    (28, 4, 128, 32),  # Qwen2.5-7B: GQA 7
    (16, 8, 128, 64),  # Qwen3-0.6B
    (32, 8, 64, 16),
    (8, 4, 8, 16),  # stories260K
    (12, 12, 80, 32),  # MHA, padded head_dim
    (8, 1, 256, 16),  # MQA, big head_dim
]
MIXED_SEQS = [(0, 37), (100, 1), (250, 64), (3, 1), (0, 1), (1000, 130), (17, 200)]


def _shape_id(s: tuple) -> str:
    return "h{}kv{}d{}bs{}".format(*s)


@pytest.mark.parametrize("dtype", DTYPES, ids=ID.get)
@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=_shape_id)
def test_prefill_mixed(shape, dtype) -> None:
    h, kh, d, bs = shape
    b = make_paged_batch(MIXED_SEQS, h, kh, d, bs, dtype=dtype, device="cuda", pad_tokens=5)
    m = b.meta
    kv_cache_write_ref(b.k, b.v, b.k_cache, b.v_cache, m.slot_mapping)
    args = (b.q, b.k_cache, b.v_cache, m.block_tables, m.seq_lens, m.query_start_loc)
    n = b.num_real_tokens
    out = paged_attention_prefill(*args, m.max_query_len, d**-0.5)
    assert rel_err(out[:n], paged_attention_ref(*args, d**-0.5)[:n]) < TOL[dtype]


@pytest.mark.parametrize("num_splits", [None, 1, 7])
@pytest.mark.parametrize("dtype", DTYPES, ids=ID.get)
@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=_shape_id)
def test_decode(shape, dtype, num_splits) -> None:
    h, kh, d, bs = shape
    seqs = [(0, 1), (15, 1), (16, 1), (511, 1), (2047, 1), (64, 0), (90, 1)]
    b = make_paged_batch(seqs, h, kh, d, bs, dtype=dtype, device="cuda")
    m = b.meta
    kv_cache_write_ref(b.k, b.v, b.k_cache, b.v_cache, m.slot_mapping)
    args = (b.q, b.k_cache, b.v_cache, m.block_tables, m.seq_lens, m.query_start_loc)
    out = paged_attention_decode(*args, m.max_seq_len, d**-0.5, num_splits=num_splits)
    assert rel_err(out, paged_attention_ref(*args, d**-0.5)) < TOL[dtype]


@pytest.mark.parametrize("warps,tile_n", [(8, 64), (4, 32)])
@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=_shape_id)
def test_decode_warps(monkeypatch, shape, warps, tile_n) -> None:
    """QUANTA_DECODE_WARPS / _TILE_N: the split kernel with more warps or 32-key tiles (no spills at head_dim 128)
    gives the same attention."""
    from quanta.kernels import paged_attention_decode as pad

    monkeypatch.setattr(pad, "DECODE_NUM_WARPS", warps)
    monkeypatch.setattr(pad, "DECODE_TILE_N", tile_n)
    h, kh, d, bs = shape
    b = make_paged_batch([(15, 1), (511, 1), (2047, 1), (90, 1)], h, kh, d, bs, dtype=torch.bfloat16, device="cuda")
    m = b.meta
    kv_cache_write_ref(b.k, b.v, b.k_cache, b.v_cache, m.slot_mapping)
    args = (b.q, b.k_cache, b.v_cache, m.block_tables, m.seq_lens, m.query_start_loc)
    for num_splits in (None, 1, 7):
        out = paged_attention_decode(*args, m.max_seq_len, d**-0.5, num_splits=num_splits)
        assert rel_err(out, paged_attention_ref(*args, d**-0.5)) < 1e-2, num_splits


def test_decode_long_single_sequence() -> None:
    b = make_paged_batch([(32000, 1)], 32, 8, 128, 16, dtype=torch.bfloat16, device="cuda")
    m = b.meta
    kv_cache_write_ref(b.k, b.v, b.k_cache, b.v_cache, m.slot_mapping)
    args = (b.q, b.k_cache, b.v_cache, m.block_tables, m.seq_lens, m.query_start_loc)
    out = paged_attention_decode(*args, m.max_seq_len, 128**-0.5)  # auto: many splits
    assert rel_err(out, paged_attention_ref(*args, 128**-0.5)) < 1e-2


@pytest.mark.parametrize("dtype", DTYPES, ids=ID.get)
def test_backend_vs_torch_ref(dtype) -> None:
    for seqs in (MIXED_SEQS, [(300, 1), (7, 1), (0, 1)]):
        b = make_paged_batch(seqs, 32, 8, 128, 16, dtype=dtype, device="cuda", pad_tokens=3)
        caches = (b.k_cache.clone(), b.v_cache.clone())
        out = get_backend("triton").forward(b.q, b.k, b.v, b.k_cache, b.v_cache, b.meta, 0.1)
        ref = get_backend("torch_ref").forward(b.q, b.k, b.v, *caches, b.meta, 0.1)
        assert torch.equal(b.k_cache, caches[0]) and torch.equal(b.v_cache, caches[1])
        n = b.num_real_tokens
        assert rel_err(out[:n], ref[:n]) < TOL[dtype]


def test_decode_cuda_graph_replay() -> None:
    """Capture the decode step once, then replay it on a batch with other lengths and block tables."""
    h, kh, d, bs, num_blocks, width = 32, 8, 128, 16, 400, 256
    kw = dict(dtype=torch.bfloat16, device="cuda", num_blocks=num_blocks, max_blocks_per_seq=width)
    first = make_paged_batch([(10, 1), (200, 1), (3000, 1), (0, 1)], h, kh, d, bs, seed=1, **kw)
    second = make_paged_batch([(2500, 1), (1, 1), (77, 1), (1200, 1)], h, kh, d, bs, seed=2, **kw)
    static = make_paged_batch([(10, 1), (200, 1), (3000, 1), (0, 1)], h, kh, d, bs, seed=1, **kw)
    static.meta.max_seq_len = width * bs  # the bound used at capture; fixes num_splits
    backend = get_backend("triton")

    def step() -> torch.Tensor:
        return backend.forward(static.q, static.k, static.v, static.k_cache, static.v_cache, static.meta, d**-0.5)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile + warm up outside the graph
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for batch in (second, first):
        for name in ("q", "k", "v", "k_cache", "v_cache"):
            getattr(static, name).copy_(getattr(batch, name))
        for name in ("slot_mapping", "block_tables", "seq_lens", "query_start_loc"):
            getattr(static.meta, name).copy_(getattr(batch.meta, name))
        graph.replay()
        ref = get_backend("torch_ref").forward(
            batch.q, batch.k, batch.v, batch.k_cache, batch.v_cache, batch.meta, d**-0.5
        )
        torch.cuda.synchronize()
        assert rel_err(out, ref) < 1e-2
        assert torch.equal(static.k_cache, batch.k_cache)


@pytest.mark.parametrize("dtype", DTYPES, ids=ID.get)
def test_kv_cache_write(dtype) -> None:
    b = make_paged_batch([(5, 40), (0, 3), (60, 1)], 32, 8, 128, 16, dtype=dtype, device="cuda", pad_tokens=6)
    kc, vc = b.k_cache.clone(), b.v_cache.clone()
    kv_cache_write(b.k, b.v, kc, vc, b.meta.slot_mapping)
    kv_cache_write_ref(b.k, b.v, b.k_cache, b.v_cache, b.meta.slot_mapping)
    assert torch.equal(kc, b.k_cache) and torch.equal(vc, b.v_cache)


@pytest.mark.parametrize("dtype", DTYPES, ids=ID.get)
@pytest.mark.parametrize("num_tokens,hidden", [(1, 2048), (37, 4096), (300, 896), (8, 64)])
def test_rms_norm(dtype, num_tokens, hidden) -> None:
    x = torch.randn(num_tokens, hidden, device="cuda", dtype=dtype)
    res = torch.randn_like(x)
    w = (1 + 0.1 * torch.randn(hidden, device="cuda")).to(dtype)
    assert rel_err(rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6)) < TOL[dtype]
    out, new_res = fused_add_rms_norm(x, res, w, 1e-5)
    out_ref, new_res_ref = fused_add_rms_norm_ref(x, res, w, 1e-5)
    assert torch.equal(new_res, new_res_ref)
    assert rel_err(out, out_ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=ID.get)
@pytest.mark.parametrize("h,kh,d,rot", [(32, 8, 128, 128), (16, 8, 64, 64), (8, 4, 8, 8), (12, 4, 80, 40)])
def test_rotary(dtype, h, kh, d, rot) -> None:
    num_tokens = 50
    qkv = torch.randn(num_tokens, (h + 2 * kh) * d, device="cuda", dtype=dtype)
    q = qkv[:, : h * d].view(num_tokens, h, d)
    k = qkv[:, h * d : (h + kh) * d].view(num_tokens, kh, d)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rot, 2, device="cuda").float() / rot))
    angles = torch.arange(4096, device="cuda").float()[:, None] * inv_freq[None, :]
    pos = torch.randint(0, 4096, (num_tokens,), device="cuda")
    q_ref, k_ref = apply_rotary_emb_ref(q, k, pos, angles.cos(), angles.sin(), inplace=False)
    apply_rotary_emb(q, k, pos, angles.cos(), angles.sin())  # in place through strided views
    assert rel_err(q, q_ref) < TOL[dtype] and rel_err(k, k_ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=ID.get)
@pytest.mark.parametrize("num_tokens,inter", [(1, 8192), (64, 14336), (33, 1000)])
def test_silu_and_mul(dtype, num_tokens, inter) -> None:
    x = torch.randn(num_tokens, 2 * inter, device="cuda", dtype=dtype)
    assert rel_err(silu_and_mul(x), silu_and_mul_ref(x)) < TOL[dtype]
