"""The one-launch decode attention (kernels/decode_attention_fused.py) on CUDA: vs its twin over shapes, dtypes
and split counts; repeated launches (races between splits, the new key's write and its tile read, counters);
a CUDA graph captured at the model's max length and replayed on other lengths. Skipped without a GPU."""

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
from test_decode_attention_fused import backend_check, decode_batch, fused_check  # noqa: E402

from quanta.attention.backend import get_backend  # noqa: E402
from quanta.kernels.decode_attention_fused import decode_attention_fused, decode_counters  # noqa: E402
from quanta.kernels.rotary import apply_rotary_emb_ref  # noqa: E402

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
TOL = {torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.float32: 1e-3}
ID = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# (num_heads, num_kv_heads, head_dim, block_size)
SHAPES = [
    (32, 8, 64, 16),  # Llama-3.2-1B
    (32, 8, 128, 16),  # Llama-3.1-8B
    (28, 4, 128, 32),  # Qwen2.5-7B: GQA 7
    (12, 12, 80, 32),  # MHA, padded head_dim
    (8, 1, 256, 16),  # MQA, big head_dim (TILE_N 32)
]
SEQS = [(0, 1), (15, 1), (16, 1), (511, 1), (2047, 1), (64, 0), (90, 1), (0, 0)]


def _shape_id(s: tuple) -> str:
    return "h{}kv{}d{}bs{}".format(*s)


@pytest.mark.parametrize("num_splits", [None, 1, 7, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=ID.get)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_fused_decode_rope(shape, dtype, num_splits) -> None:
    err = fused_check((SEQS, *shape, num_splits, None, "rope"), dtype=dtype, device="cuda")
    assert isinstance(err, float) and err < TOL[dtype], err


@pytest.mark.parametrize("mode", ["write", "attend"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=ID.get)
def test_fused_decode_no_rope(mode, dtype) -> None:
    err = fused_check((SEQS, 32, 8, 128, 16, None, None, mode), dtype=dtype, device="cuda")
    assert isinstance(err, float) and err < TOL[dtype], err


@pytest.mark.parametrize("window,num_splits", [(100, 4), (1000, None), (4096, 16)])
def test_fused_decode_window(window, num_splits) -> None:
    err = fused_check((SEQS, 32, 8, 64, 16, num_splits, window, "rope"), dtype=torch.bfloat16, device="cuda")
    assert isinstance(err, float) and err < 1e-2, err


@pytest.mark.parametrize("seqs", [[(200, 1)], [(5000, 1)], [(0, 1), (3, 1)], [(20000, 1), (1, 1), (300, 1)]])
def test_fused_decode_graph_bound(seqs) -> None:
    """Splits from the model's max length (what CUDA graphs capture): a wide grid, few non-empty splits."""
    err = fused_check((seqs, 32, 8, 64, 16, None, None, "rope"), dtype=torch.bfloat16, device="cuda",
                      max_seq_len=131072, pad_last_slot=len(seqs) > 1)  # fmt: skip
    assert isinstance(err, float) and err < 1e-2, err


@pytest.mark.parametrize("tile_n,warps", [(64, 8), (128, 4), (256, 8), (32, 4), (16, 4)])
@pytest.mark.parametrize("shape", SHAPES[:2], ids=_shape_id)
def test_fused_decode_big_tiles(monkeypatch, shape, tile_n, warps) -> None:
    """QUANTA_FUSED_DECODE_TILE_N / _WARPS: bigger tiles (a short sequence one split, all its keys loaded before
    the PDL wait) and smaller ones (fewer registers), at the graph bound and with given splits."""
    from quanta.kernels import decode_attention_fused as daf

    monkeypatch.setattr(daf, "FUSED_TILE_N", tile_n)
    monkeypatch.setattr(daf, "FUSED_NUM_WARPS", warps)
    monkeypatch.setattr(daf, "MANY", (tile_n, warps, 8192))
    for seqs in ([(200, 1), (256, 1), (129, 1), (700, 1), (1, 1)], [(700, 1)]):
        for splits, max_len in ((None, 131072), (5, None)):
            err = fused_check((seqs, *shape, splits, None, "rope"), dtype=torch.bfloat16, device="cuda",
                              max_seq_len=max_len)
            assert isinstance(err, float) and err < 1e-2, (seqs, splits, err)


@pytest.mark.parametrize("dtype", DTYPES, ids=ID.get)
@pytest.mark.parametrize("name", ["backend_forward_decode", "backend_forward_rope_decode"])
def test_backend_decode(name, dtype) -> None:
    err = backend_check(name, "cuda", dtype)
    assert isinstance(err, float) and err < TOL[dtype], err


@pytest.mark.parametrize("num_splits", [4, 33])
def test_repeated_launches_are_identical(num_splits) -> None:
    """Races (a merge reading a partial not yet visible, a tile read before the new key lands, a counter left
    behind) would show as launches that differ: the merge order is fixed, so the output is deterministic."""
    seqs = [(1000, 1), (130, 1), (63, 1), (4000, 1)]
    b, rope = decode_batch(seqs, 32, 8, 64, 16, torch.bfloat16, "cuda", seed=11)
    m = b.meta
    k0, v0 = b.k_cache.clone(), b.v_cache.clone()
    args = (b.q, b.k_cache, b.v_cache, m.block_tables, m.seq_lens, m.query_start_loc, 131072, 0.125)
    kw = dict(k=b.k, v=b.v, slot_mapping=m.slot_mapping, rope=rope, num_splits=num_splits)
    first = decode_attention_fused(*args, **kw).clone()
    first_k = b.k_cache.clone()
    n = b.num_real_tokens
    for _ in range(200):
        b.k_cache.copy_(k0)  # the new key's slot holds garbage again before every launch
        b.v_cache.copy_(v0)
        out = decode_attention_fused(*args, **kw)
        assert torch.equal(out[:n], first[:n]) and torch.equal(b.k_cache, first_k)
    assert int(decode_counters(b.q.device, 1).abs().sum()) == 0


def test_cuda_graph_replay_rope() -> None:
    """Capture the fused decode step (forward_rope) at the model's max length, replay it on other batches."""
    h, kh, d, bs, num_blocks, width = 32, 8, 64, 16, 400, 512
    kw = dict(dtype=torch.bfloat16, device="cuda", num_blocks=num_blocks, max_blocks_per_seq=width)
    batches = [make_paged_batch(s, h, kh, d, bs, seed=i, **kw) for i, s in enumerate(
        [[(10, 1), (200, 1), (3000, 1), (0, 1)], [(2500, 1), (1, 1), (77, 1), (1200, 1)]])]  # fmt: skip
    static = make_paged_batch([(10, 1), (200, 1), (3000, 1), (0, 1)], h, kh, d, bs, seed=0, **kw)
    static.meta.max_seq_len = 131072  # the bound used at capture; fixes num_splits
    positions = torch.zeros(4, dtype=torch.int64, device="cuda")
    angles = torch.arange(4096, device="cuda")[:, None].float() * 1e-3 * torch.arange(1, d // 2 + 1, device="cuda")
    cos, sin = angles.cos(), angles.sin()
    backend = get_backend("triton")

    def step() -> torch.Tensor:
        s = static
        return backend.forward_rope(s.q, s.k, s.v, s.k_cache, s.v_cache, s.meta, d**-0.5, positions, cos, sin)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile + warm up (and allocate the counters) outside the graph
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for batch in (batches[1], batches[0], batches[1]):
        for name in ("q", "k", "v", "k_cache", "v_cache"):
            getattr(static, name).copy_(getattr(batch, name))
        for name in ("slot_mapping", "block_tables", "seq_lens", "query_start_loc"):
            getattr(static.meta, name).copy_(getattr(batch.meta, name))
        positions.copy_(batch.meta.seq_lens.long() - 1)
        graph.replay()
        q, k = apply_rotary_emb_ref(batch.q, batch.k, positions, cos, sin, inplace=False)
        caches = (batch.k_cache.clone(), batch.v_cache.clone())
        ref = get_backend("torch_ref").forward(q, k, batch.v, *caches, batch.meta, d**-0.5)
        torch.cuda.synchronize()
        assert rel_err(out, ref) < 1e-2
        assert rel_err(static.k_cache, caches[0]) < 1e-2 and torch.equal(static.v_cache, caches[1])
    assert int(decode_counters(out.device, 1).abs().sum()) == 0
