"""`quanta bench-serve`: load a running OpenAI-compatible server like vLLM's benchmark_serving.

Requests arrive at a Poisson (or gamma, `--burstiness`) rate, or all at once (`--request-rate inf`, the
default), optionally capped at `--max-concurrency` in flight. Prompts are random token ids
(`--dataset random`, `--input-len`, `--output-len`, `--range-ratio`) or come from a file (one prompt per
line, or JSONL with "prompt" or "messages" and an optional "output_len"). Every request streams, so TTFT,
TPOT (time per output token after the first), ITL (gaps between chunks) and end-to-end latency are measured
per request; the summary gives mean / p50 / p99 and throughput. Works against any OpenAI-compatible server.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def register(sub) -> dict:
    p = sub.add_parser("bench-serve", help="benchmark a running OpenAI-compatible server (TTFT, TPOT, ITL, "
                       "throughput)", description=__doc__.split("\n\n")[1] if __doc__ else None)
    t = p.add_argument_group("target")
    t.add_argument("--base-url", default="http://127.0.0.1:8000", help="server URL (default: %(default)s)")
    t.add_argument("--model", default=None, help="model name (default: the first of /v1/models)")
    t.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    t.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    d = p.add_argument_group("prompts")
    d.add_argument("--dataset", default="random", help="'random' or a prompt file (.txt: one per line; .jsonl)")
    d.add_argument("--num-prompts", type=int, default=100)
    d.add_argument("--input-len", type=int, default=128, help="random prompts: tokens per prompt")
    d.add_argument("--output-len", type=int, default=128, help="max_tokens of each request")
    d.add_argument("--range-ratio", type=float, default=0.0, help="random lengths vary by +- this fraction")
    d.add_argument("--ignore-eos", action=__import__("argparse").BooleanOptionalAction, default=True,
                   help="generate exactly --output-len tokens (default: on)")
    d.add_argument("--temperature", type=float, default=0.0)
    d.add_argument("--seed", type=int, default=0)
    lo = p.add_argument_group("load")
    lo.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (default: inf = all "
                    "at once)")
    lo.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the arrivals (1 = Poisson)")
    lo.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight")
    lo.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    o = p.add_argument_group("output")
    o.add_argument("--json", default=None, help="write the results (and per-request numbers) here")
    o.add_argument("--no-progress", action="store_true")
    return {"bench-serve": run}


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    text: str = ""

    @property
    def tpot(self) -> float | None:
        if self.output_tokens <= 1:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


@dataclass
class Prompt:
    prompt: Any  # str | list[int] (completions) or messages (chat)
    output_len: int


# --- prompts -------------------------------------------------------------------------------------------


def random_prompts(num: int, input_len: int, output_len: int, vocab_size: int, range_ratio: float,
                   seed: int) -> list[Prompt]:
    rng = random.Random(seed)
    low = min(10, vocab_size - 1)

    def length(n: int) -> int:
        if range_ratio <= 0:
            return n
        return max(1, rng.randint(int(n * (1 - range_ratio)), int(n * (1 + range_ratio))))

    return [Prompt([rng.randrange(low, vocab_size) for _ in range(length(input_len))], length(output_len))
            for _ in range(num)]


def file_prompts(path: str, num: int, output_len: int) -> list[Prompt]:
    p = Path(path)
    lines = [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    out: list[Prompt] = []
    for ln in lines:
        if p.suffix == ".jsonl":
            row = json.loads(ln)
            prompt = row.get("messages") or row.get("prompt")
            out.append(Prompt(prompt, int(row.get("output_len", output_len))))
        else:
            out.append(Prompt(ln, output_len))
    if not out:
        raise ValueError(f"no prompts in {path}")
    while len(out) < num:
        out.extend(out[: num - len(out)])
    return out[:num]


# --- one request ---------------------------------------------------------------------------------------


async def send_request(client, url: str, model: str, endpoint: str, prompt: Prompt, temperature: float,
                       ignore_eos: bool, headers: dict, timeout: float) -> RequestResult:
    payload: dict[str, Any] = {"model": model, "max_tokens": prompt.output_len, "temperature": temperature,
                               "stream": True, "stream_options": {"include_usage": True}}
    if ignore_eos:
        payload["ignore_eos"] = True
    if endpoint == "chat":
        msgs = prompt.prompt if isinstance(prompt.prompt, list) and prompt.prompt and isinstance(
            prompt.prompt[0], dict) else [{"role": "user", "content": str(prompt.prompt)}]
        payload["messages"] = msgs
        path = "/v1/chat/completions"
    else:
        payload["prompt"] = prompt.prompt
        path = "/v1/completions"
    res = RequestResult()
    start = time.perf_counter()
    last = None
    chunks = 0
    texts: list[str] = []
    try:
        async with client.stream("POST", url + path, json=payload, headers=headers, timeout=timeout) as r:
            if r.status_code != 200:
                body = await r.aread()
                res.error = f"HTTP {r.status_code}: {body[:200].decode(errors='replace')}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data.strip() == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = str(chunk["error"].get("message"))
                    return res
                now = time.perf_counter()
                if chunk.get("usage"):
                    res.output_tokens = chunk["usage"]["completion_tokens"]
                    res.prompt_tokens = chunk["usage"]["prompt_tokens"]
                for c in chunk.get("choices") or []:
                    piece = c.get("text") if "text" in c else (c.get("delta") or {}).get("content")
                    if piece is None or (piece == "" and c.get("finish_reason") is None and "delta" in c):
                        continue  # the role chunk
                    texts.append(piece)
                    chunks += 1
                    if last is None:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
        res.e2e = time.perf_counter() - start
        res.text = "".join(texts)
        if not res.output_tokens:
            res.output_tokens = chunks
        res.ok = True
    except Exception as e:  # network errors, timeouts
        res.error = f"{type(e).__name__}: {e}"
    return res


# --- the run -------------------------------------------------------------------------------------------


async def _arrivals(n: int, rate: float, burstiness: float, seed: int):
    rng = random.Random(seed + 1)
    for i in range(n):
        yield i
        if rate != float("inf") and i < n - 1:
            theta = 1.0 / (rate * burstiness)
            await asyncio.sleep(rng.gammavariate(burstiness, theta))


async def run_benchmark(base_url: str, prompts: list[Prompt], *, model: str, endpoint: str = "completions",
                        api_key: str | None = None, request_rate: float = float("inf"), burstiness: float = 1.0,
                        max_concurrency: int | None = None, temperature: float = 0.0, ignore_eos: bool = True,
                        seed: int = 0, timeout: float = 600.0, progress: bool = False) -> tuple[dict, list]:
    """Send `prompts` to the server; returns (summary, per-request results)."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=max(len(prompts), 1), max_keepalive_connections=max(len(prompts), 1))
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(prompts), desc="requests", dynamic_ncols=True)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        async def one(p: Prompt) -> RequestResult:
            if sem is None:
                r = await send_request(client, base_url, model, endpoint, p, temperature, ignore_eos, headers,
                                       timeout)
            else:
                async with sem:
                    r = await send_request(client, base_url, model, endpoint, p, temperature, ignore_eos, headers,
                                           timeout)
            if bar is not None:
                bar.update(1)
            return r

        start = time.perf_counter()
        tasks = []
        async for i in _arrivals(len(prompts), request_rate, burstiness, seed):
            tasks.append(asyncio.ensure_future(one(prompts[i])))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    if bar is not None:
        bar.close()
    return summarize(results, duration), results


def _stats(values: list[float], scale: float = 1e3) -> dict:
    import numpy as np

    if not values:
        return {"mean": None, "p50": None, "p99": None}
    a = np.asarray(values) * scale
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99))}


def summarize(results: list[RequestResult], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    return {
        "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
        "input_tokens": in_tokens, "output_tokens": out_tokens,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "output_throughput": out_tokens / duration if duration else 0.0,
        "total_token_throughput": (in_tokens + out_tokens) / duration if duration else 0.0,
        "ttft_ms": _stats([r.ttft for r in ok]),
        "tpot_ms": _stats([t for r in ok if (t := r.tpot) is not None]),
        "itl_ms": _stats([x for r in ok for x in r.itl]),
        "e2e_ms": _stats([r.e2e for r in ok]),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
    }


def print_summary(s: dict, title: str = "quanta bench-serve") -> None:
    print(f"\n============ {title} ============")
    print(f"{'successful requests':<32}{s['completed']:>12}")
    print(f"{'failed requests':<32}{s['failed']:>12}")
    print(f"{'duration (s)':<32}{s['duration_s']:>12.2f}")
    print(f"{'input tokens':<32}{s['input_tokens']:>12}")
    print(f"{'output tokens':<32}{s['output_tokens']:>12}")
    print(f"{'request throughput (req/s)':<32}{s['request_throughput']:>12.2f}")
    print(f"{'output throughput (tok/s)':<32}{s['output_throughput']:>12.2f}")
    print(f"{'total throughput (tok/s)':<32}{s['total_token_throughput']:>12.2f}")
    for key, name in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E latency")):
        st = s[key]
        if st["mean"] is None:
            continue
        print(f"{name + ' (ms) mean / p50 / p99':<32}{st['mean']:>10.2f} {st['p50']:>10.2f} {st['p99']:>10.2f}")
    for e in s["errors"]:
        print(f"error: {e}")


def run(args) -> int:
    import sys

    try:
        import httpx
    except ImportError:
        print("quanta bench-serve: error: needs httpx: pip install 'quanta[server]'", file=sys.stderr)
        return 1
    base = args.base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        r = httpx.get(base + "/v1/models", headers=headers, timeout=30)
        r.raise_for_status()
        card = r.json()["data"][0]
    except Exception as e:
        print(f"quanta bench-serve: error: cannot reach {base}/v1/models: {e}", file=sys.stderr)
        return 1
    model = args.model or card["id"]
    if args.dataset == "random":
        vocab = int(card.get("vocab_size") or 32000)
        prompts = random_prompts(args.num_prompts, args.input_len, args.output_len, vocab, args.range_ratio,
                                 args.seed)
        if args.endpoint == "chat":  # chat needs text: decode the random ids
            for p in prompts:
                d = httpx.post(base + "/detokenize", json={"tokens": p.prompt}, headers=headers, timeout=30)
                p.prompt = d.json().get("prompt", "") if d.status_code == 200 else "Hello"
    else:
        try:
            prompts = file_prompts(args.dataset, args.num_prompts, args.output_len)
        except (OSError, ValueError) as e:
            print(f"quanta bench-serve: error: {e}", file=sys.stderr)
            return 1
    summary, results = asyncio.run(run_benchmark(
        base, prompts, model=model, endpoint=args.endpoint, api_key=args.api_key, request_rate=args.request_rate,
        burstiness=args.burstiness, max_concurrency=args.max_concurrency, temperature=args.temperature,
        ignore_eos=args.ignore_eos, seed=args.seed, timeout=args.timeout, progress=not args.no_progress))
    summary.update(model=model, base_url=base, endpoint=args.endpoint, request_rate=args.request_rate,
                   max_concurrency=args.max_concurrency, num_prompts=len(prompts))
    print_summary(summary)
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "requests": [
            {"ok": r.ok, "error": r.error, "prompt_tokens": r.prompt_tokens, "output_tokens": r.output_tokens,
             "ttft_s": r.ttft, "e2e_s": r.e2e, "tpot_s": r.tpot} for r in results]}, indent=2))
    return 0 if summary["failed"] == 0 else 1
