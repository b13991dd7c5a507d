"""Chunked prefill: a long prompt arrives while streams decode; the streams' inter-token latency (ITL)
with and without chunked prefill (issue 9: with chunks, ITL p99 within 2x of the median).

    python benchmarks/bench_chunked_prefill.py ../shared/configs/llama-3.1-8b.json --json out.json
    python benchmarks/bench_chunked_prefill.py MODEL_DIR --long-len 16384 --streams 32 --chunk-tokens 2048

A config.json runs with dummy weights (as `quanta bench` does); prompts are random token ids (prefix
reuse off, so nothing is served from the cache). The engine is driven step by step from this thread: a
stream's token arrives at the end of the step that sampled it (each step syncs with the device), so ITL
is the wall time between two steps that gave the stream a token. Per run:
1. --streams requests of --stream-prompt-len tokens start and decode for --warm-steps steps;
2. the --long-len prompt arrives; steps go on until its first token, then --cool-steps more;
3. ITL over all streams: p50 / p99 / max "during" the long prefill (from its arrival to its first token)
   and "overall" (the whole measured span), plus the long prompt's TTFT and the number of steps it took.
Runs: chunked (enable_chunked_prefill=True, max_num_tokens=--chunk-tokens, each policy of
--policies) and unchunked (max_num_tokens large enough for the whole prompt plus the decodes).
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
from quanta.llmapi import KvCacheConfig, SchedulerConfig


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


def _summary(gaps: list[float]) -> dict:
    if not gaps:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None, "p99_over_p50": None, "n": 0}
    p50, p99 = statistics.median(gaps), _pct(gaps, 0.99)
    return {"p50_ms": 1e3 * p50, "p99_ms": 1e3 * p99, "max_ms": 1e3 * max(gaps), "p99_over_p50": p99 / p50,
            "n": len(gaps)}


def _run(a, chunked: bool, policy: str | None, streams: list[list[int]], long_prompt: list[int],
         warm: list[int]) -> dict:
    dummy = a.model.endswith(".json")
    max_num_tokens = a.chunk_tokens if chunked else len(long_prompt) + a.streams + 64
    sched = SchedulerConfig(context_chunking_policy=policy) if policy else SchedulerConfig()
    llm = LLM(a.model, load_format="dummy" if dummy else "auto", skip_tokenizer_init=dummy, dtype=a.dtype,
              device=a.device, enable_chunked_prefill=chunked, max_num_tokens=max_num_tokens,
              max_batch_size=max(a.streams + 1, 8), max_seq_len=a.max_seq_len, enforce_eager=a.enforce_eager,
              kv_cache_config=KvCacheConfig(enable_block_reuse=False, free_gpu_memory_fraction=a.kv_fraction),
              scheduler_config=sched)
    llm.shutdown()  # drive the engine from this thread
    eng = llm.engine
    stream_params = SamplingParams(max_tokens=a.warm_steps + a.cool_steps + len(long_prompt) // 16 + 64,
                                   ignore_eos=True)
    # warm-up: a prompt as long as the long one (kernels and graphs warm for these shapes)
    eng.add_request(llm._input.make_request(10**6, None, warm, SamplingParams(max_tokens=2, ignore_eos=True)))
    while eng.has_unfinished():
        eng.step()
    reqs = [llm._input.make_request(i, None, p, stream_params) for i, p in enumerate(streams)]
    for r in reqs:
        eng.add_request(r)
    while any(r.seqs[0].num_output_tokens == 0 for r in reqs):
        eng.step()
    last = [time.perf_counter()] * len(reqs)
    counts = [r.seqs[0].num_output_tokens for r in reqs]
    gaps: list[tuple[float, float, int]] = []  # (gap, time of the token, stream)

    def step() -> float:
        eng.step()
        now = time.perf_counter()
        for i, r in enumerate(reqs):
            n = r.seqs[0].num_output_tokens
            if n > counts[i]:
                gaps.append((now - last[i], now, i))
                last[i], counts[i] = now, n
        return now

    for _ in range(a.warm_steps):
        step()
    long = llm._input.make_request(10**6 + 1, None, long_prompt, SamplingParams(max_tokens=4, ignore_eos=True))
    t_arrive = time.perf_counter()
    eng.add_request(long)
    steps = 0
    while long.first_token_time is None:
        t_first = step()
        steps += 1
    for _ in range(a.cool_steps):
        step()
    for r in reqs:
        eng.abort_request(r.request_id)
    while eng.has_unfinished():
        eng.step()
    during = [g for g, t, _ in gaps if t_arrive < t <= t_first]
    res = {"chunked": chunked, "policy": policy, "max_num_tokens": max_num_tokens,
           "long_ttft_ms": 1e3 * (t_first - t_arrive), "long_prefill_steps": steps,
           "streams_with_a_token_every_step": sum(
               1 for i in range(len(reqs)) if sum(1 for _, t, j in gaps if j == i and t_arrive < t <= t_first) == steps),
           "during": _summary(during), "overall": _summary([g for g, _, _ in gaps])}
    return res


def _free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="model folder, or a config.json (dummy weights)")
    ap.add_argument("--long-len", type=int, default=16384)
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--stream-prompt-len", type=int, default=128)
    ap.add_argument("--chunk-tokens", type=int, default=2048, help="max_num_tokens of the chunked runs")
    ap.add_argument("--policies", default="FIRST_COME_FIRST_SERVED,EQUAL_PROGRESS")
    ap.add_argument("--warm-steps", type=int, default=32)
    ap.add_argument("--cool-steps", type=int, default=32)
    ap.add_argument("--max-seq-len", type=int, default=None, help="default: long-len + 1024")
    ap.add_argument("--kv-fraction", type=float, default=0.9, help="KvCacheConfig.free_gpu_memory_fraction")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default=None)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--no-unchunked", action="store_true", help="skip the unchunked run")
    ap.add_argument("--json", default=None, help="write the results here")
    a = ap.parse_args()
    a.max_seq_len = a.max_seq_len or a.long_len + 1024

    from transformers import AutoConfig

    cfg = json.loads(Path(a.model).read_text()) if a.model.endswith(".json") else \
        AutoConfig.from_pretrained(a.model).to_dict()
    vocab = cfg["vocab_size"]
    g = torch.Generator().manual_seed(0)
    streams = [torch.randint(10, vocab - 10, (a.stream_prompt_len,), generator=g).tolist() for _ in range(a.streams)]
    long_prompt = torch.randint(10, vocab - 10, (a.long_len,), generator=g).tolist()
    warm = torch.randint(10, vocab - 10, (a.long_len,), generator=g).tolist()
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    result = {"model": a.model, "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
              "date": time.strftime("%Y-%m-%d"), "args": vars(a), "runs": []}
    for policy in [p for p in a.policies.split(",") if p]:
        result["runs"].append(_run(a, True, policy, streams, long_prompt, warm))
        _free_device_memory()
    if not a.no_unchunked:
        result["runs"].append(_run(a, False, None, streams, long_prompt, warm))
    _print(result)
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))


def _print(r: dict) -> None:
    a = r["args"]
    print(f"\n== chunked prefill: {r['model']} on {r['device']} ({r['date']}) ==")
    print(f"{a['streams']} decoding streams ({a['stream_prompt_len']}-token prompts); a {a['long_len']}-token "
          f"prompt arrives after {a['warm_steps']} steps")
    print(f"{'run':<34} {'steps':>5} {'TTFT ms':>9} {'every':>5} | {'ITL during: p50':>15} {'p99':>8} {'max':>8} "
          f"{'p99/p50':>7} | {'overall p50':>11} {'p99':>8} {'p99/p50':>7}")
    for run in r["runs"]:
        name = f"chunked {run['policy']} ({run['max_num_tokens']})" if run["chunked"] else \
            f"unchunked ({run['max_num_tokens']})"
        d, o = run["during"], run["overall"]

        def f(x, w=8, p=2):
            return f"{x:>{w}.{p}f}" if x is not None else f"{'-':>{w}}"

        print(f"{name:<34} {run['long_prefill_steps']:>5} {run['long_ttft_ms']:>9.1f} "
              f"{run['streams_with_a_token_every_step']:>5} | {f(d['p50_ms'], 15)} {f(d['p99_ms'])} {f(d['max_ms'])} "
              f"{f(d['p99_over_p50'], 7)} | {f(o['p50_ms'], 11)} {f(o['p99_ms'])} {f(o['p99_over_p50'], 7)}")
    print("('every': streams that got a token in every step of the long prefill; target: chunked ITL p99/p50 <= 2)")


if __name__ == "__main__":
    main()
