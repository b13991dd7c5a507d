"""The one-launch decode attention (kernels/decode_attention_fused.py) at batch 1, by launch parameters (issue 5).

    python benchmarks/bench_decode_fused.py [--model 1b] [--seq-lens 128,192,256,1024,4096] [--json out.json]

Per launch: rotary of q / k, the new token's KV write, split-K attention, merge. Each number is microseconds per
launch inside a CUDA graph of 16 back-to-back launches (as 16 layers), after a 256 MiB L2 flush; variants change
the split count (`default` = what a CUDA-graph capture at the model's max length gets), num_warps, the keys a
split reads at least, and the key tile. The unfused pair (KV write kernel + split-K decode + reduce) is the
baseline. Checks every variant against decode_attention_fused_ref first.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if "--dry-run" in sys.argv:  # CPU: the Triton interpreter, one call per variant, no timing (checks the script)
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

SHAPES = {"1b": (32, 8, 64, 131072), "8b": (32, 8, 128, 131072)}  # heads, kv heads, head_dim, max length
VARIANTS = [  # (name, num_splits or None, num_warps, min keys a split, one split up to this many keys, tile keys)
    ("default", None, 4, 64, 128, 64),
    ("min128", None, 4, 128, 0, 64),  # the default before the seventh session
    ("min64", None, 4, 64, 0, 64),
    ("min256", None, 4, 256, 0, 64),
    ("splits1", 1, 4, 64, 128, 64),
    ("splits4", 4, 4, 64, 128, 64),
    ("warps8", None, 8, 64, 128, 64),
    ("tile32", None, 4, 64, 128, 32),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="1b", choices=sorted(SHAPES))
    ap.add_argument("--seq-lens", default="128,192,256,1024,4096")
    ap.add_argument("--launches", type=int, default=16)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--json", default=None)
    ap.add_argument("--dry-run", action="store_true")
    a = ap.parse_args()
    from kernel_cases import make_paged_batch

    from quanta.kernels import decode_attention_fused as daf
    from quanta.kernels.gemv import time_cuda
    from quanta.kernels.kv_cache_write import kv_cache_write
    from quanta.kernels.paged_attention import _num_sms
    from quanta.kernels.paged_attention_decode import decode_num_splits, paged_attention_decode

    heads, kv_heads, d, max_len = SHAPES[a.model]
    dev = torch.device("cpu" if a.dry_run else "cuda")
    knobs = ("DECODE_NUM_WARPS", "FUSED_MIN_TOKENS_PER_SPLIT", "FUSED_ONE_SPLIT_TOKENS", "DECODE_TILE_N")
    scale, defaults = d**-0.5, [getattr(daf, k) for k in knobs]
    flush = torch.empty(256 << 20, dtype=torch.int8, device=dev)
    if a.dry_run:
        time_cuda = lambda fn, reps, flush: fn() and 0.0  # noqa: E731
    name_dev = "cpu (dry run)" if a.dry_run else torch.cuda.get_device_name()
    rows = []
    print(
        f"{name_dev}  model {a.model}: {heads} heads / {kv_heads} kv / head_dim {d}, batch 1, "
        f"us per launch ({a.launches} launches a graph)",
        flush=True,
    )
    for seq_len in (int(s) for s in a.seq_lens.split(",")):
        dtype = torch.float16 if a.dry_run else torch.bfloat16  # (the interpreter's bf16 dot is wrong)
        b = make_paged_batch([(seq_len - 1, 1)], heads, kv_heads, d, 32, dtype=dtype, device=dev.type)
        m = b.meta
        pos = torch.tensor([seq_len - 1], device=dev)
        cos, sin = torch.randn(2, seq_len + 8, d // 2, device=dev).to(dtype).unbind(0)
        rope = (pos, cos, sin)
        k_ref, v_ref = b.k_cache.clone(), b.v_cache.clone()
        ref = daf.decode_attention_fused_ref(
            b.q, k_ref, v_ref, m.block_tables, m.seq_lens, m.query_start_loc, scale, b.k, b.v, m.slot_mapping, rope
        )
        line = f"S={seq_len:6d} |"

        def unfused(b=b, m=m):
            kv_cache_write(b.k, b.v, b.k_cache, b.v_cache, m.slot_mapping)
            return paged_attention_decode(
                b.q, b.k_cache, b.v_cache, m.block_tables, m.seq_lens, m.query_start_loc, max_len, scale
            )

        t = time_cuda(lambda: [unfused() for _ in range(a.launches)], a.reps, flush=flush) / a.launches
        rows.append(dict(seq_len=seq_len, variant="unfused (write + split + reduce, no rotary)", us=t))
        line += f" unfused {t:5.1f} |"
        for name, splits, warps, min_keys, one_keys, tile in VARIANTS:
            for k, v in zip(knobs, (warps, min_keys, one_keys, tile)):
                setattr(daf, k, v)
            n_splits = splits or decode_num_splits(1, kv_heads, max_len, _num_sms(dev), min_keys)

            def fused(n_splits=n_splits, b=b, m=m, rope=rope):
                return daf.decode_attention_fused(
                    b.q,
                    b.k_cache,
                    b.v_cache,
                    m.block_tables,
                    m.seq_lens,
                    m.query_start_loc,
                    max_len,
                    scale,
                    b.k,
                    b.v,
                    m.slot_mapping,
                    rope,
                    num_splits=n_splits,
                )

            try:
                err = float((fused().float() - ref.float()).abs().max())
                t = time_cuda(lambda: [fused() for _ in range(a.launches)], a.reps, flush=flush) / a.launches
            except Exception as e:  # a variant that does not compile is reported, not fatal
                err, t = f"{type(e).__name__}: {str(e)[:60]}", float("nan")
            rows.append(
                dict(
                    seq_len=seq_len,
                    variant=name,
                    splits=n_splits,
                    warps=warps,
                    min_keys=min_keys,
                    one_split_keys=one_keys,
                    tile=tile,
                    us=t,
                    max_abs_err=err,
                )
            )
            line += f" {name} {t:5.1f}" + ("" if isinstance(err, float) and err < 5e-2 else " (ERR)")
        for k, v in zip(knobs, defaults):
            setattr(daf, k, v)
        print(line, flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"device": name_dev, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
