"""Prefix reuse: a shared system prompt + many different questions, time to first token with
KvCacheConfig(enable_block_reuse=True) vs False (issue 9: target >= 5x faster).

    python benchmarks/bench_prefix_reuse.py ../shared/configs/llama-3.2-1b.json --json out.json
    python benchmarks/bench_prefix_reuse.py MODEL_DIR --system-len 2000 --num-questions 200

A config.json runs with dummy weights (as `quanta bench` does); prompts are random token ids. The engine
is driven step by step from this thread (no background loop), so a request's TTFT is the wall time from
its submission to the end of the step that sampled its first token (that step syncs with the device).
Two modes, each with reuse off and on (a fresh LLM each, same arguments otherwise):
- sequential: one question at a time (the system prompt is cached after the first); median / p99 TTFT
  of all but the first question;
- burst: every question submitted at once; TTFT p50 / p99 and the time until the last first token.
Before measuring, each LLM serves two unrelated warm-up requests (kernels compiled, graphs warm).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch

from quanta import LLM, SamplingParams
from quanta.llmapi import KvCacheConfig


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _ttfts(llm: LLM, prompts: list[list[int]], params: SamplingParams, burst: bool, first_id: int) -> list[float]:
    """TTFT (s) of each prompt, stepping the engine by hand; drains every request before returning."""
    eng = llm.engine
    pending: dict[int, tuple[float, object]] = {}
    out: dict[int, float] = {}

    def submit(i: int, ids: list[int]) -> None:
        req = llm._input.make_request(first_id + i, None, ids, params)
        pending[i] = (time.perf_counter(), req)
        eng.add_request(req)

    def run_until_first_tokens() -> None:
        while pending:
            eng.step()
            now = time.perf_counter()
            for i, (t0, req) in list(pending.items()):
                if req.first_token_time is not None:
                    out[i] = now - t0
                    del pending[i]

    if burst:
        for i, ids in enumerate(prompts):
            submit(i, ids)
        run_until_first_tokens()
    else:
        for i, ids in enumerate(prompts):
            submit(i, ids)
            run_until_first_tokens()
            while eng.has_unfinished():
                eng.step()
    while eng.has_unfinished():
        eng.step()
    return [out[i] for i in range(len(prompts))]


def _run(args, reuse: bool, prompts: list[list[int]], vocab_warm: list[list[int]]) -> dict:
    dummy = args.model.endswith(".json")
    kv = KvCacheConfig(enable_block_reuse=reuse, tokens_per_block=args.tokens_per_block,
                       free_gpu_memory_fraction=args.kv_fraction)
    t0 = time.perf_counter()
    llm = LLM(args.model, load_format="dummy" if dummy else "auto", skip_tokenizer_init=dummy, dtype=args.dtype,
              device=args.device, kv_cache_config=kv, max_num_tokens=args.max_num_tokens,
              max_batch_size=args.max_batch_size, enable_chunked_prefill=True, enforce_eager=args.enforce_eager)
    build_s = time.perf_counter() - t0
    llm.shutdown()  # drive the engine from this thread
    device = str(llm._built.device)
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True)
    _ttfts(llm, vocab_warm, params, burst=True, first_id=1_000_000)
    res: dict = {"reuse": reuse, "build_s": build_s}
    # sequential first: its first question computes the system prompt (not counted); burst then finds it cached
    for mode in ("sequential", "burst"):
        _sync(device)
        t = time.perf_counter()
        ttft = _ttfts(llm, prompts, params, burst=mode == "burst", first_id=2_000_000 if mode == "burst" else 0)
        wall = time.perf_counter() - t
        measured = ttft[1:] if mode == "sequential" else ttft
        stats = llm.engine.kv.stats
        res[mode] = {"ttft_p50_ms": 1e3 * statistics.median(measured), "ttft_p99_ms": 1e3 * _pct(measured, 0.99),
                     "ttft_first_ms": 1e3 * ttft[0], "last_first_token_s": max(ttft) if mode == "burst" else None,
                     "wall_s": wall, "cache_hit_rate": stats.hit_rate, "reused_tokens": stats.reused_tokens}
    res["num_kv_blocks"] = llm.engine.kv.num_blocks
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="model folder, or a config.json (dummy weights)")
    ap.add_argument("--system-len", type=int, default=2000)
    ap.add_argument("--question-len", type=int, default=40)
    ap.add_argument("--num-questions", type=int, default=200)
    ap.add_argument("--output-len", type=int, default=8)
    ap.add_argument("--tokens-per-block", type=int, default=32)
    ap.add_argument("--max-num-tokens", type=int, default=8192)
    ap.add_argument("--max-batch-size", type=int, default=256)
    ap.add_argument("--kv-fraction", type=float, default=0.9, help="KvCacheConfig.free_gpu_memory_fraction")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default=None)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--json", default=None, help="write the results here")
    a = ap.parse_args()

    from transformers import AutoConfig

    cfg = json.loads(Path(a.model).read_text()) if a.model.endswith(".json") else \
        AutoConfig.from_pretrained(a.model).to_dict()
    vocab = cfg["vocab_size"]
    g = torch.Generator().manual_seed(0)
    system = torch.randint(10, vocab - 10, (a.system_len,), generator=g).tolist()
    prompts = [system + torch.randint(10, vocab - 10, (a.question_len,), generator=g).tolist()
               for _ in range(a.num_questions)]
    warm = [torch.randint(10, vocab - 10, (a.system_len + a.question_len,), generator=g).tolist() for _ in range(2)]
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    result = {"model": a.model, "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
              "date": time.strftime("%Y-%m-%d"), "args": vars(a)}
    result["off"] = _run(a, False, prompts, warm)
    result["on"] = _run(a, True, prompts, warm)
    for mode in ("sequential", "burst"):
        result[f"{mode}_ttft_p50_speedup"] = result["off"][mode]["ttft_p50_ms"] / result["on"][mode]["ttft_p50_ms"]
    _print(result)
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))


def _print(r: dict) -> None:
    a = r["args"]
    print(f"\n== prefix reuse: {r['model']} on {r['device']} ({r['date']}) ==")
    print(f"system prompt {a['system_len']} tokens + {a['num_questions']} questions of {a['question_len']} tokens, "
          f"{a['output_len']} output tokens, tokens_per_block {a['tokens_per_block']}, "
          f"max_num_tokens {a['max_num_tokens']}")
    print(f"{'mode':<11} {'reuse':<6} {'TTFT p50 ms':>12} {'TTFT p99 ms':>12} {'first ms':>10} {'wall s':>8} "
          f"{'hit rate':>9}")
    for mode in ("sequential", "burst"):
        for key in ("off", "on"):
            m = r[key][mode]
            print(f"{mode:<11} {key:<6} {m['ttft_p50_ms']:>12.2f} {m['ttft_p99_ms']:>12.2f} {m['ttft_first_ms']:>10.2f} "
                  f"{m['wall_s']:>8.2f} {m['cache_hit_rate']:>9.3f}")
    print(f"TTFT p50 speedup with reuse: sequential {r['sequential_ttft_p50_speedup']:.1f}x, "
          f"burst {r['burst_ttft_p50_speedup']:.1f}x (target >= 5x)")


if __name__ == "__main__":
    main()
