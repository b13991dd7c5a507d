"""Every Triton kernel vs its *_ref twin on the CPU, through Triton's interpreter.

TRITON_INTERPRET must be set before triton is imported, so the checks run in one child process
(`python tests/test_kernels_interpret.py` prints a JSON dict {check: relative error or error text});
the pytest side only launches it once and asserts on each entry.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
TOL = 1e-3

# (name, seqs as (cached prefix, new tokens), num_heads, num_kv_heads, head_dim, block_size, pad_tokens)
ATTENTION_CASES = [
    ("mixed_gqa2_d32_bs16", [(0, 7), (5, 1), (20, 9), (33, 1), (16, 16)], 4, 2, 32, 16, 3),
    ("mixed_gqa3_d40_bs32", [(0, 12), (40, 1), (3, 30), (0, 1)], 6, 2, 40, 32, 2),
    ("prefill_mha_d8_bs16", [(0, 21), (0, 3)], 4, 4, 8, 16, 0),
    ("chunk_gqa8_d64_bs64", [(70, 9), (0, 64)], 8, 1, 64, 64, 0),
]
# (name, seqs, num_heads, num_kv_heads, head_dim, block_size, num_splits)
DECODE_CASES = [
    ("decode_gqa2_split1", [(0, 1), (16, 1), (49, 1), (129, 1), (0, 0)], 4, 2, 32, 16, 1),
    ("decode_gqa2_split3", [(0, 1), (16, 1), (49, 1), (129, 1), (0, 0)], 4, 2, 32, 16, 3),
    ("decode_gqa4_split8_bs32", [(200, 1), (7, 1)], 8, 2, 16, 32, 8),
    ("decode_gqa3_d80_split2", [(95, 1), (31, 1)], 6, 2, 80, 16, 2),
    ("decode_gqa4_tile32_split3", [(200, 1), (33, 1), (1, 1)], 8, 2, 32, 16, 3),  # QUANTA_DECODE_TILE_N=32
]
# (name, seqs, num_heads, num_kv_heads, head_dim, block_size, window, decode num_splits or None = prefill)
WINDOW_CASES = [
    ("window_prefill_w5_bs16", [(0, 21), (30, 9), (70, 1), (5, 1)], 4, 2, 16, 16, 5, None),
    ("window_prefill_w70_bs8", [(0, 90), (100, 20), (3, 40)], 4, 4, 16, 8, 70, None),
    ("window_decode_w20_split1", [(129, 1), (7, 1), (0, 0), (40, 1)], 4, 2, 16, 16, 20, 1),
    ("window_decode_w100_split3", [(300, 1), (64, 1), (99, 1)], 4, 2, 16, 16, 100, 3),
]
OTHER_CHECKS = [
    "kv_cache_write_k",
    "kv_cache_write_v",
    "rms_norm",
    "fused_add_rms_norm_out",
    "fused_add_rms_norm_res",
    "fused_add_rms_norm_planes",
    "rotary_q",
    "rotary_k",
    "rotary_partial_q",
    "silu_and_mul",
    "fused_add_rms_norm_frag",
    "silu_and_mul_frag",
    "backend_mixed",
    "backend_decode",
]
# (name, M, N, K, bias, dtype, config string): the bf16-style GEMV (fp32 / fp16 in the interpreter)
GEMV_CASES = [
    ("gemv_m1_n37_k300_bias", 1, 37, 300, True, "float32", "bn4_bk128_sk1"),
    ("gemv_m3_n19_k200_split3", 3, 19, 200, False, "float32", "bn4_bk64_sk3"),
    ("gemv_m1_n33_k1000_autosplit", 1, 33, 1000, True, "float32", "bn8_bk128_sk0"),
    ("gemv_m8_n40_k160_dot_split2_fp16", 8, 40, 160, True, "float16", "bn16_bk32_sk2_dot"),
    ("gemv_m3_n21_k96_fp16_nodot", 3, 21, 96, False, "float16", "bn2_bk64_sk1"),
]
# (name, M, N, K, group, bits, zero point, bias, dtype, config string): the weight-only int GEMV
W_INT_GEMV_CASES = [
    ("wgemv4_m1_g32_ragged_bias", 1, 37, 300, 32, 4, False, True, "float32", "bn4_bk128_sk1"),
    ("wgemv4_m3_g64_zp_split2", 3, 19, 200, 64, 4, True, False, "float32", "bn4_bk128_sk2"),
    ("wgemv4_m1_g128_zp_bias_wide", 1, 13, 512, 128, 4, True, True, "float32", "bn4_bk256_sk0"),
    ("wgemv8_m1_g128_bias", 1, 21, 384, 128, 8, False, True, "float32", "bn8_bk256_sk0"),
    ("wgemv8_m3_g64_zp_split3", 3, 21, 384, 64, 8, True, False, "float32", "bn4_bk64_sk3"),
    ("wgemv8_m2_per_channel", 2, 13, 512, 512, 8, False, False, "float32", "bn4_bk128_sk2"),
    ("wgemv4_m8_g32_zp_dot_fp16", 8, 40, 160, 32, 4, True, True, "float16", "bn16_bk64_sk2_dot"),
    ("wgemv8_m8_g128_dot_fp16", 8, 40, 300, 128, 8, False, False, "float16", "bn16_bk256_sk2_dot"),
    ("wgemv4_m3_g128_dispatch", 3, 24, 256, 128, 4, False, True, "float32", None),
    # swap-AB (y^T = W x^T): "_dott" dots q - z, "_dotto" OFFSET + q; bk <= group: scale after the dot
    ("wgemv4_m16_g128_dott_ragged_n_fp16", 16, 70, 512, 128, 4, False, True, "float16", "bn64_bk128_sk1_dott"),
    ("wgemv4_m3_g64_zp_dott_split3_fp16", 3, 40, 384, 64, 4, True, False, "float16", "bn32_bk64_sk3_dott"),
    ("wgemv4_m1_g128_zp_bk32_dott_fp16", 1, 37, 512, 128, 4, True, True, "float16", "bn16_bk32_sk2_dott"),
    ("wgemv4_m3_g32_dott_bk128_4groups_fp16", 3, 24, 256, 32, 4, False, False, "float16", "bn16_bk128_sk2_dott"),
    ("wgemv4_m16_g64_zp_dotto_split2_fp16", 16, 50, 320, 64, 4, True, True, "float16", "bn32_bk64_sk2_dotto"),
    ("wgemv4_m1_g128_dotto_ragged_k_fp16", 1, 33, 300, 128, 4, False, False, "float16", "bn32_bk128_sk0_dotto"),
    ("wgemv4_m3_g32_zp_dotto_bk64_2groups_fp16", 3, 21, 192, 32, 4, True, False, "float16", "bn16_bk64_sk1_dotto"),
    ("wgemv8_m16_g128_zp_dott_split2_fp16", 16, 40, 384, 128, 8, True, False, "float16", "bn32_bk64_sk2_dott"),
    ("wgemv8_m3_per_channel_dotto_fp16", 3, 21, 512, 512, 8, False, True, "float16", "bn16_bk128_sk0_dotto"),
    ("wgemv8_m1_g32_zp_dott_bk64_2groups_fp16", 1, 19, 256, 32, 8, True, False, "float16", "bn16_bk64_sk1_dott"),
    ("wgemv4_m3_g64_dott_fp32_fallback", 3, 19, 200, 64, 4, True, False, "float32", "bn64_bk128_sk2_dott"),
]
# (name, tokens, in, rank per slot (zero-padded to the largest; the last slot gets no token), output splits,
#  out, fused (block_n, n_tiles, block_k, block_m_max) or None = FUSED_TABLE): LoRA fused and shrink + expand
LORA_CASES = [
    ("lora_plain_r8", 9, 64, (8, 8, 8), (), 48, None),
    ("lora_qkv_mixed_ranks", 37, 40, (16, 4, 12, 8), (32, 48), 64, (16, 2, 16, 32)),
    ("lora_gate_up_odd_k", 11, 300, (8, 2, 8), (16,), 40, (16, 1, 64, 32)),
    ("lora_qkv_odd_shards_mtiles", 70, 64, (8, 3, 8), (20, 36), 52, (16, 3, 32, 16)),
    ("lora_r64_wide_tiles", 6, 96, (64, 16, 64), (), 100, (32, 4, 32, 32)),
    ("lora_no_adapter", 5, 32, (4, 4), (24,), 48, None),
]
LORA_NAMES = [f"{c[0]}_{path}" for c in LORA_CASES for path in ("fused", "split")]
CHECK_NAMES = LORA_NAMES + OTHER_CHECKS + [c[0] for c in GEMV_CASES] + [c[0] for c in W_INT_GEMV_CASES] + [c[0] for c in ATTENTION_CASES] + [c[0] for c in DECODE_CASES] + [c[0] for c in WINDOW_CASES]


# ---------------------------------------------------------------- child side (TRITON_INTERPRET=1)
def _attention_checks(results: dict) -> None:
    from kernel_cases import make_paged_batch, rel_err

    from quanta.kernels.kv_cache_write import kv_cache_write_ref
    from quanta.kernels.paged_attention import paged_attention_prefill
    from quanta.kernels.paged_attention_decode import paged_attention_decode
    from quanta.kernels.paged_attention_ref import paged_attention_ref

    for name, seqs, h, kh, d, bs, pad in ATTENTION_CASES:
        b = make_paged_batch(seqs, h, kh, d, bs, pad_tokens=pad, seed=len(name))
        m, scale = b.meta, d**-0.5
        kv_cache_write_ref(b.k, b.v, b.k_cache, b.v_cache, m.slot_mapping)
        args = (b.q, b.k_cache, b.v_cache, m.block_tables, m.seq_lens, m.query_start_loc)
        n = b.num_real_tokens
        out = paged_attention_prefill(*args, m.max_query_len, scale)
        results[name] = rel_err(out[:n], paged_attention_ref(*args, scale)[:n])
    from quanta.kernels import paged_attention_decode as pad

    for name, seqs, h, kh, d, bs, splits in DECODE_CASES:
        b = make_paged_batch(seqs, h, kh, d, bs, seed=len(name))
        m, scale = b.meta, d**-0.5
        kv_cache_write_ref(b.k, b.v, b.k_cache, b.v_cache, m.slot_mapping)
        args = (b.q, b.k_cache, b.v_cache, m.block_tables, m.seq_lens, m.query_start_loc)
        pad.DECODE_TILE_N, tile_n = (32 if "tile32" in name else pad.DECODE_TILE_N), pad.DECODE_TILE_N
        out = paged_attention_decode(*args, m.max_seq_len, scale, num_splits=splits)
        pad.DECODE_TILE_N = tile_n
        results[name] = rel_err(out, paged_attention_ref(*args, scale))
    for name, seqs, h, kh, d, bs, window, splits in WINDOW_CASES:
        b = make_paged_batch(seqs, h, kh, d, bs, seed=len(name))
        m, scale = b.meta, d**-0.5
        kv_cache_write_ref(b.k, b.v, b.k_cache, b.v_cache, m.slot_mapping)
        args = (b.q, b.k_cache, b.v_cache, m.block_tables, m.seq_lens, m.query_start_loc)
        if splits is None:
            out = paged_attention_prefill(*args, m.max_query_len, scale, window=window)
        else:
            out = paged_attention_decode(*args, m.max_seq_len, scale, num_splits=splits, window=window)
        n = b.num_real_tokens
        results[name] = rel_err(out[:n], paged_attention_ref(*args, scale, window=window)[:n])


def _backend_checks(results: dict) -> None:
    import torch
    from kernel_cases import make_paged_batch, rel_err

    from quanta.attention.backend import get_backend

    for name, seqs in [("backend_mixed", [(0, 5), (9, 1), (17, 6)]), ("backend_decode", [(30, 1), (3, 1)])]:
        b = make_paged_batch(seqs, 4, 2, 16, 16, pad_tokens=2, seed=7)
        ref_caches = (b.k_cache.clone(), b.v_cache.clone())
        out = get_backend("triton").forward(b.q, b.k, b.v, b.k_cache, b.v_cache, b.meta, 0.25)
        ref = get_backend("torch_ref").forward(b.q, b.k, b.v, *ref_caches, b.meta, 0.25)
        n = b.num_real_tokens
        caches_equal = torch.equal(b.k_cache, ref_caches[0]) and torch.equal(b.v_cache, ref_caches[1])
        results[name] = rel_err(out[:n], ref[:n]) if caches_equal else "caches differ"


def _small_op_checks(results: dict) -> None:
    import torch
    from kernel_cases import make_paged_batch, rel_err

    from quanta.kernels.activation import silu_and_mul, silu_and_mul_ref
    from quanta.kernels.kv_cache_write import kv_cache_write, kv_cache_write_ref
    from quanta.kernels.rms_norm import fused_add_rms_norm, fused_add_rms_norm_ref, rms_norm, rms_norm_ref
    from quanta.kernels.rotary import apply_rotary_emb, apply_rotary_emb_ref

    g = torch.Generator().manual_seed(0)
    b = make_paged_batch([(3, 5), (0, 2), (17, 1)], 4, 2, 16, 16, pad_tokens=4)
    kc, vc = b.k_cache.clone(), b.v_cache.clone()
    kv_cache_write(b.k, b.v, kc, vc, b.meta.slot_mapping)
    kv_cache_write_ref(b.k, b.v, b.k_cache, b.v_cache, b.meta.slot_mapping)  # padding slots (-1) untouched
    results["kv_cache_write_k"] = rel_err(kc, b.k_cache)
    results["kv_cache_write_v"] = rel_err(vc, b.v_cache)

    x, res = torch.randn(5, 48, generator=g), torch.randn(5, 48, generator=g)
    w = torch.randn(48, generator=g)
    results["rms_norm"] = rel_err(rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6))
    out, new_res = fused_add_rms_norm(x, res, w, 1e-5)
    out_ref, new_res_ref = fused_add_rms_norm_ref(x, res, w, 1e-5)
    results["fused_add_rms_norm_out"] = rel_err(out, out_ref)
    results["fused_add_rms_norm_res"] = rel_err(new_res, new_res_ref)
    from quanta.kernels.rms_norm import fused_add_rms_norm_planes
    from quanta.quantization.w_int_gemv_asm import x_planes

    xh, rh, wh = torch.randn(3, 256, generator=g).half(), torch.randn(3, 256, generator=g).half(), w.new_ones(256).half()
    out, new_res, planes = fused_add_rms_norm_planes(xh, rh, wh, 1e-5, 128)  # + the asm GEMV's x_planes of out
    want = torch.stack([x_planes(row, 128) for row in out])
    same = torch.equal(planes.view(torch.int32), want) and torch.equal(out, fused_add_rms_norm(xh, rh, wh, 1e-5)[0])
    results["fused_add_rms_norm_planes"] = 0.0 if same else 1.0

    num_tokens, h, kh, d = 6, 4, 2, 32
    qkv = torch.randn(num_tokens, (h + 2 * kh) * d, generator=g)  # q, k are strided views of a fused qkv
    q = qkv[:, : h * d].view(num_tokens, h, d)
    k = qkv[:, h * d : (h + kh) * d].view(num_tokens, kh, d)
    pos = torch.tensor([0, 5, 9, 1, 30, 2])
    angles = torch.arange(40)[:, None].float() * torch.rand(d // 2, generator=g)[None, :]
    q_ref, k_ref = apply_rotary_emb_ref(q, k, pos, angles.cos(), angles.sin(), inplace=False)
    apply_rotary_emb(q, k, pos, angles.cos(), angles.sin(), inplace=True)
    results["rotary_q"] = rel_err(q, q_ref)
    results["rotary_k"] = rel_err(k, k_ref)
    part = angles[:, : d // 4]  # rotary_dim = d / 2: the second half of each head stays as it is
    q2, _ = apply_rotary_emb(q, k, pos, part.cos(), part.sin(), inplace=False)
    q2_ref, _ = apply_rotary_emb_ref(q, k, pos, part.cos(), part.sin(), inplace=False)
    results["rotary_partial_q"] = rel_err(q2, q2_ref) + float(not torch.equal(q2[..., d // 2 :], q[..., d // 2 :]))

    x = torch.randn(7, 2 * 40, generator=g)
    results["silu_and_mul"] = rel_err(silu_and_mul(x), silu_and_mul_ref(x))
    _frag_checks(results, g)


def _gemv_checks(results: dict) -> None:
    import torch
    from kernel_cases import rel_err
    from test_quantization_kernels import _case

    from quanta.kernels.gemv import GemvConfig, gemv, gemv_ref
    from quanta.quantization.w_int_kernel import w_int_gemv, w_int_linear, w_int_linear_ref

    g = torch.Generator().manual_seed(0)
    for name, m, n, k, bias, dtype, cfg in GEMV_CASES:
        dt = getattr(torch, dtype)
        x, w = torch.randn(m, k, generator=g).to(dt), torch.randn(n, k, generator=g).to(dt)
        b = torch.randn(n, generator=g).to(dt) if bias else None
        ref = gemv_ref(x.float(), w.float(), b.float() if bias else None)
        results[name] = rel_err(gemv(x, w, b, GemvConfig.parse(cfg)).float(), ref)
    for name, m, n, k, group, bits, zp, bias, dtype, cfg in W_INT_GEMV_CASES:
        x, p, s, z, b = _case(m, n, k, group, bits, zp, bias, getattr(torch, dtype), seed=len(name))
        ref = w_int_linear_ref(x.float(), p, s.float(), z, bits, group, k, b.float() if bias else None)
        if cfg is None:  # through the dispatch (M <= 16 -> GEMV)
            out = w_int_linear(x, p, s, z, bits, group, k, b)
        else:
            out = w_int_gemv(x, p, s, z, bits, group, k, b, GemvConfig.parse(cfg))
        results[name] = rel_err(out.float(), ref)


def _lora_checks(results: dict) -> None:
    import torch
    from kernel_cases import rel_err

    from quanta.kernels.lora import lora_expand, lora_shrink, make_lora_meta
    from quanta.kernels.lora_fused import FusedConfig, lora_apply_ref, lora_fused

    for name, t, k, ranks, splits, o, cfg in LORA_CASES:
        g = torch.Generator().manual_seed(len(name))
        s, r, shards = len(ranks), max(ranks), len(splits) + 1
        a, b = torch.randn(s, shards * r, k, generator=g), torch.randn(s, o, r, generator=g)
        for slot, rank in enumerate(ranks):  # an adapter of lower rank: zeros above its rank
            a[slot].view(shards, r, k)[:, rank:] = 0
            b[slot, :, rank:] = 0
        x, y = torch.randn(t, k, generator=g), torch.randn(t, o, generator=g)
        slots = torch.randint(-1, s - 1, (t,), generator=g, dtype=torch.int32)  # -1: no adapter
        meta = make_lora_meta(slots.fill_(-1) if name == "lora_no_adapter" else slots, s)
        ref = lora_apply_ref(y.clone(), x, a, b, meta, splits)
        config = FusedConfig(*cfg[:3], block_m_max=cfg[3]) if cfg else None
        outs = {"fused": lora_fused(y.clone(), x, a, b, meta, splits, config),
                "split": lora_expand(y.clone(), lora_shrink(x, a, meta), b, meta, splits)}
        for path, out in outs.items():  # tokens without an adapter must stay exactly as they were
            results[f"{name}_{path}"] = rel_err(out, ref) + float(not torch.equal(out[slots < 0], y[slots < 0]))


def _run_all() -> dict:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    sys.path.insert(0, str(HERE))
    results: dict = {}
    for group in (_small_op_checks, _gemv_checks, _attention_checks, _backend_checks, _lora_checks):
        try:
            group(results)
        except Exception as e:  # report instead of dying: the parent shows it per check
            import traceback

            results[f"{group.__name__} crashed"] = traceback.format_exc(limit=4)
            results.setdefault("_error", f"{type(e).__name__}: {e}")
    return results


def _unfrag(frag, dtype):
    """w_int_mma.x_frag's inverse: [G, H, 2, 2, 32, 4] int32 -> the 16 rows [16, K] of dtype."""
    g, h = frag.shape[:2]
    words = frag.reshape(g, h, 2, 2, 8, 4, 4).permute(2, 4, 0, 1, 3, 5, 6)  # [nt, r, g, H, j, c, w]
    return words.reshape(16, -1).contiguous().view(dtype)


def _frag_checks(results: dict, g) -> None:
    """The RMSNorm and silu_and_mul writing their rows in the mma GEMV's fragment order too (rows < M)."""
    import torch

    from quanta.kernels.activation import silu_and_mul
    from quanta.kernels.rms_norm import fused_add_rms_norm, fused_add_rms_norm_frag
    from quanta.quantization.w_int_mma import x_frag

    xh, rh = torch.randn(11, 256, generator=g).half(), torch.randn(11, 256, generator=g).half()
    wh = torch.randn(256, generator=g).half()
    out, res, frag = fused_add_rms_norm_frag(xh, rh, wh, 1e-5, 128)
    want = fused_add_rms_norm(xh, rh, wh, 1e-5)[0]
    same = torch.equal(_unfrag(frag, torch.half)[:11], out) and torch.equal(out, want)
    same = same and torch.equal(_unfrag(x_frag(out, 128), torch.half)[:11], out)  # the helper's own inverse
    results["fused_add_rms_norm_frag"] = 0.0 if same else 1.0
    gu = torch.randn(5, 2 * 192, generator=g).half()
    act, frag = silu_and_mul(gu, 64)
    same = torch.equal(_unfrag(frag, torch.half)[:5], act) and torch.equal(act, silu_and_mul(gu))
    results["silu_and_mul_frag"] = 0.0 if same else 1.0


# ---------------------------------------------------------------- parent side (pytest)
@pytest.fixture(scope="module")
def interpreted() -> dict:
    from .interpret import run_interpreted  # (this file also runs as the child script)

    return run_interpreted(__file__)


@pytest.mark.parametrize("name", CHECK_NAMES)
def test_kernel_matches_ref(interpreted: dict, name: str) -> None:
    crashed = {k: v for k, v in interpreted.items() if k.endswith("crashed")}
    err = interpreted.get(name, crashed or "missing")
    assert isinstance(err, float), err
    assert err < TOL, f"{name}: relative error {err:.2e}"


if __name__ == "__main__":
    print(json.dumps(_run_all()))
