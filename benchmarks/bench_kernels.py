"""Time each Triton kernel against its *_ref twin on CUDA (median of triton.testing.do_bench).

    python benchmarks/bench_kernels.py            # all kernels, Llama-3.1-8B-like shapes, bf16
    python benchmarks/bench_kernels.py --only decode --sweep   # decode tile / warps sweep

Decode attention also reports GB/s = bytes of K/V read / time (compare with ~3.0 TB/s copy bandwidth of an
H100 SXM, see shared/PERFORMANCE.md); prefill reports TFLOP/s of the causal attention FLOPs. Columns:
`triton_us`, `ref_us` (the PyTorch twin, eager), `sdpa_us` (torch SDPA on the same K/V laid out densely:
a peer, not a reference for paging), `speedup` = ref / triton.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from kernel_cases import make_paged_batch  # noqa: E402

from quanta.kernels import paged_attention as pa  # noqa: E402
from quanta.kernels import paged_attention_decode as pad  # noqa: E402
from quanta.kernels.activation import silu_and_mul, silu_and_mul_ref  # noqa: E402
from quanta.kernels.kv_cache_write import kv_cache_write, kv_cache_write_ref  # noqa: E402
from quanta.kernels.paged_attention_ref import paged_attention_ref  # noqa: E402
from quanta.kernels.rms_norm import fused_add_rms_norm, fused_add_rms_norm_ref, rms_norm, rms_norm_ref  # noqa: E402
from quanta.kernels.rotary import apply_rotary_emb, apply_rotary_emb_ref  # noqa: E402

H, KH, D, BS = 32, 8, 128, 16  # Llama-3.1-8B attention
HIDDEN, INTER = 4096, 14336
ROWS: list[dict] = []
SDPA = torch.nn.functional.scaled_dot_product_attention


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3  # us


def row(kernel: str, shape: str, fast, ref=None, peer=None, *, work: str = "", amount: float = 0.0) -> None:
    t = bench(fast)
    r = bench(ref) if ref is not None else float("nan")
    p = bench(peer) if peer is not None else float("nan")
    rate = ""
    if work == "GB/s":
        rate = f"{amount / t / 1e3:8.1f} GB/s"
    elif work == "TFLOP/s":
        rate = f"{amount / t / 1e6:8.1f} TFLOP/s"
    ROWS.append(dict(kernel=kernel, shape=shape, triton=t, ref=r, sdpa=p, rate=rate))
    print(f"{kernel:18s} {shape:34s} {t:10.1f} {r:10.1f} {p:10.1f} {r / t:8.2f}x  {rate}", flush=True)


def _dense(batch, seqs):  # [B, H, S, D] copies for the SDPA peer (equal lengths only)
    k = torch.stack(batch.full_k).transpose(1, 2)
    v = torch.stack(batch.full_v).transpose(1, 2)
    q_len = seqs[0][1]
    q = batch.q[: len(seqs) * q_len].view(len(seqs), q_len, H, D).transpose(1, 2)
    return q, k, v


def bench_decode(dtype: torch.dtype) -> None:
    for num_seqs, seq_len in [(1, 1024), (1, 8192), (1, 32768), (8, 4096), (32, 2048), (64, 1024), (256, 1024)]:
        seqs = [(seq_len - 1, 1)] * num_seqs
        b = make_paged_batch(seqs, H, KH, D, BS, dtype=dtype, device="cuda")
        m = b.meta
        kv_cache_write(b.k, b.v, b.k_cache, b.v_cache, m.slot_mapping)
        args = (b.q, b.k_cache, b.v_cache, m.block_tables, m.seq_lens, m.query_start_loc)
        kv_bytes = 2 * num_seqs * seq_len * KH * D * b.k_cache.element_size()
        q, k, v = _dense(b, seqs)
        splits = pad.decode_num_splits(num_seqs, KH, m.max_seq_len, pa._num_sms(q.device))
        row(
            "decode_attention",
            f"B={num_seqs} S={seq_len} splits={splits}",
            partial(pad.paged_attention_decode, *args, m.max_seq_len, D**-0.5),
            partial(paged_attention_ref, *args, D**-0.5) if num_seqs <= 64 else None,
            partial(SDPA, q, k, v, enable_gqa=True),
            work="GB/s",
            amount=kv_bytes,
        )


def bench_prefill(dtype: torch.dtype) -> None:
    for num_seqs, q_len, ctx in [(1, 2048, 0), (4, 2048, 0), (16, 512, 0), (2, 1024, 3072), (1, 8192, 0)]:
        seqs = [(ctx, q_len)] * num_seqs
        b = make_paged_batch(seqs, H, KH, D, BS, dtype=dtype, device="cuda")
        m = b.meta
        kv_cache_write(b.k, b.v, b.k_cache, b.v_cache, m.slot_mapping)
        args = (b.q, b.k_cache, b.v_cache, m.block_tables, m.seq_lens, m.query_start_loc)
        flops = num_seqs * 4 * H * D * (q_len * (q_len + 1) / 2 + q_len * ctx)
        q, k, v = _dense(b, seqs)
        row(
            "prefill_attention",
            f"B={num_seqs} q={q_len} ctx={ctx}",
            partial(pa.paged_attention_prefill, *args, m.max_query_len, D**-0.5),
            partial(paged_attention_ref, *args, D**-0.5),
            partial(SDPA, q, k, v, is_causal=True, enable_gqa=True) if ctx == 0 else None,
            work="TFLOP/s",
            amount=flops,
        )
    mixed = [(1000, 1)] * 60 + [(0, 512), (2048, 256)]
    b = make_paged_batch(mixed, H, KH, D, BS, dtype=dtype, device="cuda")
    m = b.meta
    args = (b.q, b.k_cache, b.v_cache, m.block_tables, m.seq_lens, m.query_start_loc)
    row(
        "mixed_attention",
        "60 decodes@1k + 512 + 256@2k",
        partial(pa.paged_attention_prefill, *args, m.max_query_len, D**-0.5),
        partial(paged_attention_ref, *args, D**-0.5),
    )


def bench_small_ops(dtype: torch.dtype) -> None:
    for t in (1, 64, 4096):
        x = torch.randn(t, HIDDEN, device="cuda", dtype=dtype)
        res, w = torch.randn_like(x), torch.randn(HIDDEN, device="cuda", dtype=dtype)
        nbytes = x.numel() * x.element_size()
        shape = f"T={t} hidden={HIDDEN}"
        row(
            "rms_norm",
            shape,
            partial(rms_norm, x, w, 1e-5),
            partial(rms_norm_ref, x, w, 1e-5),
            work="GB/s",
            amount=2 * nbytes,
        )
        fast, ref = partial(fused_add_rms_norm, x, res, w, 1e-5), partial(fused_add_rms_norm_ref, x, res, w, 1e-5)
        row("fused_add_rms_norm", shape, fast, ref, work="GB/s", amount=4 * nbytes)
        xi = torch.randn(t, 2 * INTER, device="cuda", dtype=dtype)
        fast, ref = partial(silu_and_mul, xi), partial(silu_and_mul_ref, xi)
        row("silu_and_mul", f"T={t} inter={INTER}", fast, ref, work="GB/s", amount=1.5 * xi.numel() * xi.element_size())
        qkv = torch.randn(t, (H + 2 * KH) * D, device="cuda", dtype=dtype)
        q, k = qkv[:, : H * D].view(t, H, D), qkv[:, H * D : (H + KH) * D].view(t, KH, D)
        pos = torch.randint(0, 8192, (t,), device="cuda")
        ang = torch.arange(8192, device="cuda").float()[:, None] * torch.rand(D // 2, device="cuda")[None, :]
        cos, sin = ang.cos(), ang.sin()
        fast, ref = partial(apply_rotary_emb, q, k, pos, cos, sin), partial(apply_rotary_emb_ref, q, k, pos, cos, sin)
        row("rotary", f"T={t} H={H} KH={KH} D={D}", fast, ref)
        b = make_paged_batch([(0, t)], H, KH, D, BS, dtype=dtype, device="cuda")
        m = b.meta
        kv_args = (b.k, b.v, b.k_cache, b.v_cache, m.slot_mapping)
        fast, ref = partial(kv_cache_write, *kv_args), partial(kv_cache_write_ref, *kv_args)
        row(
            "kv_cache_write",
            f"T={t} KH={KH} D={D}",
            fast,
            ref,
            work="GB/s",
            amount=4 * b.k.numel() * b.k.element_size(),
        )


def sweep_decode(dtype: torch.dtype) -> None:
    """Decode tile size x warps x tokens-per-split, on a few batch shapes."""
    batches = []
    for num_seqs, seq_len in [(1, 8192), (8, 4096), (64, 1024)]:
        b = make_paged_batch([(seq_len - 1, 1)] * num_seqs, H, KH, D, BS, dtype=dtype, device="cuda")
        batches.append((num_seqs, seq_len, b))
    for tile_n in (32, 64, 128):
        for warps in (2, 4, 8):
            for min_tok in (64, 128, 256, 512):
                pad.DECODE_TILE_N, pad.DECODE_NUM_WARPS, pad.DECODE_MIN_TOKENS_PER_SPLIT = tile_n, warps, min_tok
                print(f"-- DECODE_TILE_N={tile_n} DECODE_NUM_WARPS={warps} DECODE_MIN_TOKENS_PER_SPLIT={min_tok}")
                for num_seqs, seq_len, b in batches:
                    m = b.meta
                    args = (b.q, b.k_cache, b.v_cache, m.block_tables, m.seq_lens, m.query_start_loc)
                    fast = partial(pad.paged_attention_decode, *args, m.max_seq_len, D**-0.5)
                    kv_bytes = 2 * num_seqs * seq_len * KH * D * b.k_cache.element_size()
                    row("decode_attention", f"B={num_seqs} S={seq_len}", fast, work="GB/s", amount=kv_bytes)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--only", choices=["decode", "prefill", "small"], default=None)
    parser.add_argument("--sweep", action="store_true", help="sweep decode launch parameters")
    parser.add_argument("--block-size", type=int, default=BS)
    a = parser.parse_args()
    globals()["BS"] = a.block_size
    dtype = getattr(torch, a.dtype)
    print(
        f"device: {torch.cuda.get_device_name()}  dtype: {a.dtype}  triton {triton.__version__}  torch {torch.__version__}"
    )
    print(f"{'kernel':18s} {'shape':34s} {'triton_us':>10s} {'ref_us':>10s} {'sdpa_us':>10s} {'speedup':>9s}  rate")
    if a.sweep:
        sweep_decode(dtype)
        return
    if a.only in (None, "decode"):
        bench_decode(dtype)
    if a.only in (None, "prefill"):
        bench_prefill(dtype)
    if a.only in (None, "small"):
        bench_small_ops(dtype)


if __name__ == "__main__":
    main()
