"""What the HTTP server costs: time per output token with N concurrent streams through `quanta serve` vs the
same load on the Python API (`LLM.generate_async(streaming=True)`), each in a fresh process, alternating.

    python benchmarks/bench_server_overhead.py [--model PATH] [--concurrency 64] [--output-len 64] [--repeats 3]

Both sides: the same random token-id prompts, greedy, ignore_eos, max_tokens = --output-len, all requests at
once, every request streamed; TPOT = (last token time - first token time) / (tokens - 1) per request, as seen
by the consumer (the HTTP client, or the `async for` over the RequestOutput). The HTTP client runs in this
process, on the same machine: on a small CPU box it competes with the server for cores, so the ratio is an
upper bound of the server's cost. Prints one JSON line per run and a summary; --json writes them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STORIES = Path(os.environ.get("QUANTA_SHARED", ROOT.parent / "shared")) / "models" / "stories260K"

API_CHILD = r"""
import asyncio, json, sys, time
from quanta import LLM, SamplingParams
from quanta.llmapi import KvCacheConfig
model, prompts, output_len, kv = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
llm = LLM(model, kv_cache_config=KvCacheConfig(max_tokens=kv))
params = SamplingParams(max_tokens=output_len, ignore_eos=True)
llm.generate([prompts[0]], params, use_tqdm=False)  # warm-up, as the server's first request

async def one(p):
    start = time.perf_counter()
    first = last = None
    n = 0
    async for out in llm.generate_async(p, params, streaming=True):
        k = len(out.outputs[0].token_ids_diff)
        if k:
            now = time.perf_counter()
            if first is None:
                first = now
            last = now
            n = len(out.outputs[0].token_ids)
    return {"ttft": first - start, "e2e": last - start, "tokens": n,
            "tpot": (last - first) / (n - 1) if n > 1 else None}

import os
def cpu():  # per-thread CPU seconds of this process: (main thread, all other threads)
    tick, main, other = os.sysconf("SC_CLK_TCK"), 0.0, 0.0
    for tid in os.listdir("/proc/self/task"):
        f = open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()
        t = (int(f[11]) + int(f[12])) / tick
        if int(tid) == os.getpid():
            main += t
        else:
            other += t
    return main, other

async def main():
    t0 = time.perf_counter()
    res = await asyncio.gather(*[one(p) for p in prompts])
    return res, time.perf_counter() - t0

c0 = cpu()
res, wall = asyncio.run(main())
c1 = cpu()
print(json.dumps({"results": res, "wall": wall, "cpu_main": c1[0] - c0[0], "cpu_other": c1[1] - c0[1]}))
llm.shutdown()
"""


def _env(threads: int | None) -> dict:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_api(model: str, prompts: list[list[int]], output_len: int, kv: int, threads: int | None) -> dict:
    p = subprocess.run([sys.executable, "-c", API_CHILD, model, json.dumps(prompts), str(output_len), str(kv)],
                       capture_output=True, text=True, check=True, env=_env(threads))
    data = json.loads(p.stdout.strip().splitlines()[-1])
    tokens = sum(r["tokens"] for r in data["results"])
    return summarize([r["tpot"] for r in data["results"]], [r["ttft"] for r in data["results"]], tokens,
                     data["wall"], (data["cpu_main"], data["cpu_other"]))


def proc_cpu(pid: int) -> tuple[float, float]:
    """CPU seconds of process `pid`: (its main thread, its other threads); zeros where /proc is absent."""
    tick, main, other = os.sysconf("SC_CLK_TCK"), 0.0, 0.0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0, 0.0
    for tid in tids:
        try:
            f = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        t = (int(f[11]) + int(f[12])) / tick
        if int(tid) == pid:
            main += t
        else:
            other += t
    return main, other


def _children_cpu(pid: int) -> float:
    """CPU seconds of the direct children of `pid` (the engine process), all their threads."""
    total = 0.0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            for child in Path(f"/proc/{pid}/task/{tid}/children").read_text().split():
                main, other = proc_cpu(int(child))
                total += main + other
    except OSError:
        pass
    return total


def run_server(model: str, prompts: list[list[int]], output_len: int, kv: int, threads: int | None,
               extra: tuple[str, ...] = ()) -> dict:
    from quanta.serve.bench_serve import Prompt, run_benchmark
    from quanta.serve.testing import ServerProcess

    with ServerProcess(model, "--kv-cache-max-tokens", str(kv), "--max-queued-requests", "100000", *extra,
                       env=_env(threads)) as srv:
        warm = [Prompt(prompts[0], output_len)]
        asyncio.run(run_benchmark(srv.url, warm, model=model))
        c0, e0 = proc_cpu(srv.proc.pid), _children_cpu(srv.proc.pid)
        summary, results = asyncio.run(run_benchmark(srv.url, [Prompt(p, output_len) for p in prompts],
                                                     model=model))
        c1, e1 = proc_cpu(srv.proc.pid), _children_cpu(srv.proc.pid)
    assert summary["failed"] == 0, summary["errors"]
    # engine CPU: the engine process (all of it) or, in-process, the HTTP process's other threads
    return summarize([r.tpot for r in results], [r.ttft for r in results], summary["output_tokens"],
                     summary["duration_s"], (c1[0] - c0[0], c1[1] - c0[1] + e1 - e0))


def run_inproc(model: str, prompts: list[list[int]], output_len: int, kv: int, threads: int | None) -> dict:
    return run_server(model, prompts, output_len, kv, threads, ("--no-engine-process",))


def summarize(tpots: list, ttfts: list, tokens: int, wall: float, cpu: tuple[float, float]) -> dict:
    """cpu: CPU seconds of the engine's process during the run: (main thread = the consumer / HTTP server,
    other threads = the engine loop and torch's workers)."""
    tpots = [t for t in tpots if t is not None]
    return {"tpot_ms_mean": 1e3 * statistics.mean(tpots), "tpot_ms_p50": 1e3 * statistics.median(tpots),
            "ttft_ms_mean": 1e3 * statistics.mean(ttfts), "output_tok_s": tokens / wall, "wall_s": wall,
            "main_thread_cpu_us_per_token": 1e6 * cpu[0] / tokens, "engine_cpu_us_per_token": 1e6 * cpu[1] / tokens}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(STORIES) if STORIES.is_dir() else
                    str(ROOT / "src" / "quanta" / "assets" / "quanta-tiny"))
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kv-cache-max-tokens", type=int, default=65536)
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of both engine processes "
                    "(default: inherited)")
    ap.add_argument("--sides", default="api,server,inproc", help="what to run, in turn: api (the Python API), "
                    "server (quanta serve, engine process), inproc (quanta serve --no-engine-process)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from quanta.serve.bench_serve import random_prompts

    cfg = json.loads((Path(args.model) / "config.json").read_text())
    prompts = [p.prompt for p in random_prompts(args.concurrency, args.input_len, args.output_len,
                                                cfg["vocab_size"], 0.0, seed=0)]
    runs = []
    for i in range(args.repeats):
        fns = {"api": run_api, "server": run_server, "inproc": run_inproc}
        for side in args.sides.split(","):
            fn = fns[side]
            r = fn(args.model, prompts, args.output_len, args.kv_cache_max_tokens, args.threads)
            r.update(side=side, repeat=i)
            runs.append(r)
            print(json.dumps(r), flush=True)
    sides = args.sides.split(",")

    def med(side: str, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["side"] == side)

    keys = ("tpot_ms_mean", "ttft_ms_mean", "output_tok_s", "main_thread_cpu_us_per_token", "engine_cpu_us_per_token")
    summary = {"model": args.model, "concurrency": args.concurrency, "input_len": args.input_len,
               "output_len": args.output_len, "repeats": args.repeats, "threads": args.threads,
               "date": time.strftime("%Y-%m-%d"), **{f"{side}_{k}": med(side, k) for side in sides for k in keys}}
    print(f"\n{args.concurrency} concurrent streams, {Path(args.model).name}, {args.input_len} in / "
          f"{args.output_len} out, medians of {args.repeats}:")
    for side in sides:
        ratio = f"  TPOT ratio to api {med(side, 'tpot_ms_mean') / med('api', 'tpot_ms_mean'):.3f}" \
            if "api" in sides and side != "api" else ""
        summary[f"{side}_tpot_ratio"] = med(side, "tpot_ms_mean") / med("api", "tpot_ms_mean") if "api" in sides \
            else None
        print(f"  {side:<7} TPOT {med(side, 'tpot_ms_mean'):7.2f} ms  TTFT {med(side, 'ttft_ms_mean'):7.1f} ms  "
              f"{med(side, 'output_tok_s'):7.0f} tok/s  CPU/token: consumer or HTTP thread "
              f"{med(side, 'main_thread_cpu_us_per_token'):4.0f} us, engine {med(side, 'engine_cpu_us_per_token'):4.0f} us"
              + ratio)
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
