"""The one-launch decode attention (kernels/decode_attention_fused.py) vs its twin through Triton's interpreter.

Each case runs twice on batches of the same shape (the second launch reuses the split counters, which must be
back at 0 after each), and checks the output, the cache contents (the new token's slot written, nothing else),
q left as it is, rows of sequences without a query token left unwritten. The new token's slot holds garbage
before a write launch, so a kernel that read it back instead of taking the new k and v from registers fails; the
16-bit cases take the double-buffered tile loop (PREFETCH). TRITON_INTERPRET must be set before triton is
imported, so the checks run in one child process; tests/gpu/test_decode_attention_fused_gpu.py runs the same
checks on CUDA.
"""

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
TOL = 1e-3

# (name, seqs as (cached prefix, new tokens), num_heads, num_kv_heads, head_dim, block_size, grid splits or None,
#  window, mode: rope = rotary + cache write, write = cache write only, attend = attention only)
CASES = [
    ("short_1split_gqa4_d64", [(5, 1), (40, 1)], 8, 2, 64, 16, 1, None, "rope"),
    ("grid8_few_live_gqa4", [(0, 1), (30, 1), (130, 1), (300, 1), (0, 0), (64, 0)], 8, 2, 64, 16, 8, None, "rope"),
    ("long_all_splits_mha_d128_bs32", [(400, 1), (3, 1)], 2, 2, 128, 32, 3, None, "rope"),
    ("window200_gqa4_d64", [(300, 1), (50, 1)], 4, 1, 64, 16, 4, 200, "rope"),
    ("write_no_rope_mha_d128", [(200, 1), (10, 1), (70, 1)], 4, 4, 128, 16, 4, None, "write"),
    ("attend_only_gqa4_d64", [(260, 1), (1, 1)], 8, 2, 64, 16, 5, None, "attend"),
    ("head_dim80_gqa3", [(95, 1), (31, 1)], 6, 2, 80, 16, 2, None, "rope"),
    ("graph_bound_auto_splits", [(200, 1), (0, 1)], 8, 2, 64, 16, None, None, "rope"),
]
# 16-bit cases (name, case as in CASES, dtype): 64 x 64 K/V tiles take the double-buffered tile loop (PREFETCH).
# fp16, not bf16: the interpreter gets bf16 tl.dot wrong (the GPU tests cover bf16).
LOW_PRECISION_CASES = [
    ("llama1b_short_fp16", [(127, 1), (255, 1), (0, 1), (64, 0)], 32, 8, 64, 16, 2, None, "rope", torch.float16),
    ("llama1b_window_fp16", [(300, 1), (130, 1)], 32, 8, 64, 16, 4, 150, "rope", torch.float16),
    ("gqa8_write_fp16", [(191, 1), (64, 1)], 8, 1, 64, 16, 1, None, "write", torch.float16),
]
BACKEND_CHECKS = ["backend_forward_decode", "backend_forward_rope_decode"]
LOW_PRECISION = {"padding_slot_fp16", *(c[0] for c in LOW_PRECISION_CASES)}
CHECK_NAMES = [c[0] for c in CASES] + [c[0] for c in LOW_PRECISION_CASES] + ["padding_slot_fp16", "merge_chunked",
                                                                              "tile256", "one_seq_tile16", *BACKEND_CHECKS]


def decode_batch(seqs, h, kh, d, bs, dtype, device, seed, pad_last_slot=False):
    """A paged decode batch plus the rotary inputs (positions = seq_len - 1 of each query token)."""
    from kernel_cases import make_paged_batch

    from quanta.layers.rotary import RotaryEmbedding

    b = make_paged_batch(seqs, h, kh, d, bs, dtype=dtype, device=device, pad_tokens=2, seed=seed)
    positions = torch.zeros(b.q.shape[0], dtype=torch.int64, device=device)
    qsl, lens = b.meta.query_start_loc.tolist(), b.meta.seq_lens.tolist()
    for s, n in enumerate(lens):
        if qsl[s + 1] - qsl[s] == 1:
            positions[qsl[s]] = n - 1
    if pad_last_slot:  # a CUDA-graph padding sequence: its token writes nothing
        b.meta.slot_mapping[qsl[-2]] = -1
    rot = RotaryEmbedding(d, max(lens) + 1, 10000.0, {"rope_type": "default"}).to(device)
    return b, (positions, rot.cos_cache, rot.sin_cache)


def fused_check(case: tuple, dtype=torch.float32, device="cpu", seed=0, max_seq_len=None, pad_last_slot=False):
    """Two launches on two batches of one shape (case = CASES[i][1:]): the max relative error (output, written
    cache slots) as a float, or a string saying what broke."""
    from kernel_cases import rel_err

    from quanta.kernels import decode_attention_fused as daf
    from quanta.kernels.kv_cache_write import kv_cache_write_ref

    seqs, h, kh, d, bs, splits, window, mode = case
    worst = 0.0
    for launch in range(2):
        b, rope = decode_batch(seqs, h, kh, d, bs, dtype, device, seed + launch, pad_last_slot)
        m = b.meta
        if mode == "attend":
            kv_cache_write_ref(b.k, b.v, b.k_cache, b.v_cache, m.slot_mapping)
        kw = {} if mode == "attend" else dict(k=b.k, v=b.v, slot_mapping=m.slot_mapping)
        rope = rope if mode == "rope" else None
        kc, vc, q0 = b.k_cache.clone(), b.v_cache.clone(), b.q.clone()
        out = torch.full_like(b.q, float("nan"))
        args = (m.block_tables, m.seq_lens, m.query_start_loc)
        kw.update(rope=rope, window=window)
        daf.decode_attention_fused(b.q, kc, vc, *args, max_seq_len or m.max_seq_len, d**-0.5, **kw, out=out,
                                   num_splits=splits)  # fmt: skip
        ref = daf.decode_attention_fused_ref(b.q, b.k_cache, b.v_cache, *args, d**-0.5, **kw)
        if device == "cuda":
            torch.cuda.synchronize()
        if int(daf.decode_counters(b.q.device, 1).abs().sum()) != 0:
            return f"launch {launch}: counters not back at 0"
        if not torch.equal(q0, b.q):
            return f"launch {launch}: q was modified"
        qsl = m.query_start_loc.tolist()
        live = torch.tensor([t < qsl[-1] for t in range(b.q.shape[0])], device=device)
        if out[live].isnan().any() or not out[~live].isnan().all():
            return f"launch {launch}: a query row left unwritten or a padding row written"
        worst = max(worst, rel_err(out[live], ref[live]))
        slots = m.slot_mapping[m.slot_mapping >= 0]
        for got, want in ((kc, b.k_cache), (vc, b.v_cache)):
            flat_got, flat_want = got.view(-1, kh, d), want.view(-1, kh, d)
            if len(slots):
                worst = max(worst, rel_err(flat_got[slots], flat_want[slots]))
            flat_got[slots] = flat_want[slots]
            if not torch.equal(got, want):
                return f"launch {launch}: a cache slot other than the new tokens' was written"
    return worst


def backend_check(name: str, device: str = "cpu", dtype=torch.float32) -> float | str:
    """TritonBackend.forward / forward_rope on a decode step vs the torch_ref backend (+ the rotary twin)."""
    from kernel_cases import rel_err

    from quanta.attention.backend import get_backend
    from quanta.kernels.rotary import apply_rotary_emb_ref

    b, (pos, cos, sin) = decode_batch([(300, 1), (7, 1), (0, 1), (40, 0)], 8, 2, 64, 16, dtype, device, seed=5)
    caches = (b.k_cache.clone(), b.v_cache.clone())
    triton_backend = get_backend("triton")
    triton_backend.fused_decode_max_seqs = 64  # this batch of 4 through the one-launch kernel (default: batch 1)
    if name == "backend_forward_rope_decode":
        out = triton_backend.forward_rope(b.q, b.k, b.v, b.k_cache, b.v_cache, b.meta, 0.125, pos, cos, sin)
        q, k = apply_rotary_emb_ref(b.q, b.k, pos, cos, sin, inplace=False)
    else:
        out = triton_backend.forward(b.q, b.k, b.v, b.k_cache, b.v_cache, b.meta, 0.125)
        q, k = b.q, b.k
    ref = get_backend("torch_ref").forward(q, k, b.v, *caches, b.meta, 0.125)
    n = b.num_real_tokens
    # the kernel rotates k with its own FMA order: equal up to rounding (bitwise on the CPU interpreter)
    tol = 0 if device == "cpu" else (1e-6 if dtype == torch.float32 else 1e-2)
    if not all(
        torch.allclose(a.float(), b_.float(), rtol=tol, atol=tol) for a, b_ in zip((b.k_cache, b.v_cache), caches)
    ):
        return "caches differ"
    return rel_err(out[:n], ref[:n])


def child_main() -> None:
    results: dict = {}
    for name, *case in CASES:
        max_len = 131072 if case[5] is None else None  # the bound CUDA graphs use: a wide grid, few live splits
        results[name] = fused_check(tuple(case), max_seq_len=max_len)
    for name, *case, dtype in LOW_PRECISION_CASES:
        results[name] = fused_check(tuple(case), dtype=dtype)
    from quanta.kernels import decode_attention_fused as daf

    daf.MERGE_VALUES, merge_values = 4 * 64, daf.MERGE_VALUES  # the merge in chunks of one split: n round trips
    results["merge_chunked"] = fused_check(([(400, 1), (90, 1)], 8, 2, 64, 16, 6, None, "rope"))
    daf.MERGE_VALUES = merge_values
    daf.MANY, many = (256, 4, 0), daf.MANY  # big tiles: <= 256 keys one split (+ a 2-tile split merge)
    results["tile256"] = fused_check(([(200, 1), (256, 1), (700, 1), (1, 1)], 8, 2, 64, 16, 6, None, "rope"))
    daf.MANY = many
    daf.FUSED_TILE_N, tile_n = 16, daf.FUSED_TILE_N  # one sequence, 16-key tiles: many tiles a split
    results["one_seq_tile16"] = fused_check(([(300, 1)], 8, 2, 64, 16, 6, None, "rope"))
    daf.FUSED_TILE_N = tile_n
    pad_case = ([(129, 1), (20, 1), (0, 1)], 8, 2, 64, 16, 4, None, "rope")
    results["padding_slot_fp16"] = fused_check(pad_case, dtype=torch.float16, pad_last_slot=True)
    for name in BACKEND_CHECKS:
        results[name] = backend_check(name)
    print(json.dumps(results))


@pytest.fixture(scope="module")
def interpreted() -> dict:
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install -e '.[dev]')")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(HERE.parent / "src"), str(HERE)]))
    code = "import test_decode_attention_fused as t; t.child_main()"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=HERE)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", CHECK_NAMES)
def test_decode_fused_matches_ref(interpreted: dict, name: str) -> None:
    err = interpreted[name]
    assert isinstance(err, float), err
    assert err < (1e-2 if name in LOW_PRECISION else TOL), f"{name}: relative error {err:.2e}"


def test_launch_shape(monkeypatch) -> None:
    """One sequence: FUSED_TILE_N keys, warps by head dim, double buffer up to PREFETCH_TILE_BYTES; several: MANY."""
    from quanta.kernels import decode_attention_fused as daf

    for name, value in (("FUSED_TILE_N", 64), ("FUSED_NUM_WARPS", 0), ("PREFETCH_TILE_BYTES", 8192),
                        ("MANY", (32, 4, 4096))):
        monkeypatch.setattr(daf, name, value)
    assert daf.launch_shape(64, 1, 2) == (64, 4, True)
    assert daf.launch_shape(128, 1, 2) == (64, 8, False)
    assert daf.launch_shape(256, 1, 2) == (32, 8, False)
    assert daf.launch_shape(64, 16, 2) == (32, 4, True)
    assert daf.launch_shape(128, 2, 2) == (32, 4, False)
    assert daf.launch_shape(128, 16, 4) == (32, 4, False)


def test_fused_num_warps(monkeypatch) -> None:
    """The one-launch decode's warps: 4 up to head_dim 64, 8 above (no spills at 128), or QUANTA_FUSED_DECODE_WARPS."""
    from quanta.kernels import decode_attention_fused as daf

    monkeypatch.setattr(daf, "FUSED_NUM_WARPS", 0)
    assert [daf.fused_num_warps(d) for d in (32, 64, 128, 256)] == [4, 4, 8, 8]
    monkeypatch.setattr(daf, "FUSED_NUM_WARPS", 2)
    assert daf.fused_num_warps(128) == 2
