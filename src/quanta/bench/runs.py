"""The measurements: batch-1 latency (TTFT, TPOT) and all-at-once throughput, for quanta and a peer."""

from __future__ import annotations

import statistics
import time

import torch


def random_prompts(num: int, input_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab - 10, (num, input_len), generator=g).tolist()


def quanta_latency(llm, input_len: int, output_len: int, iters: int = 3) -> dict:
    from quanta import SamplingParams

    vocab = llm._built.hf_config.vocab_size
    params = SamplingParams(max_tokens=output_len, ignore_eos=True)
    runs = []
    for i in range(iters + 1):  # first run warms up
        prompt = random_prompts(1, input_len, vocab, seed=i)[0]
        t0 = time.perf_counter()
        ttft = None
        for _ in llm.generate_async(prompt, params, streaming=True):
            if ttft is None:
                ttft = time.perf_counter() - t0
        runs.append((ttft, time.perf_counter() - t0))
    ttft = statistics.median(r[0] for r in runs[1:])
    lat = statistics.median(r[1] for r in runs[1:])
    tpot = (lat - ttft) / max(output_len - 1, 1)
    return {"ttft_s": ttft, "latency_s": lat, "tpot_s": tpot, "decode_tok_s": 1.0 / tpot}


def quanta_throughput(llm, num_requests: int, input_len: int, output_len: int) -> dict:
    from quanta import SamplingParams

    vocab = llm._built.hf_config.vocab_size
    params = SamplingParams(max_tokens=output_len, ignore_eos=True)
    llm.generate(random_prompts(min(num_requests, 8), input_len, vocab, seed=99), params, use_tqdm=False)
    prompts = random_prompts(num_requests, input_len, vocab)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"wall_s": wall, "output_tok_s": out_tokens / wall,
            "total_tok_s": (out_tokens + num_requests * input_len) / wall, "requests_s": num_requests / wall}


def quanta_decode_batch(llm, batch: int, input_len: int, output_len: int) -> dict:
    """Output tokens/s of `batch` requests decoding together, prefill taken out: (T(out=N) - T(out=1))."""
    from quanta import SamplingParams

    prompts = random_prompts(batch, input_len, llm._built.hf_config.vocab_size, seed=7)

    def run(n: int) -> float:
        t0 = time.perf_counter()
        llm.generate(prompts, SamplingParams(max_tokens=n, ignore_eos=True), use_tqdm=False)
        return time.perf_counter() - t0

    run(4)  # warm-up
    secs = max(run(output_len) - run(1), 1e-9)
    return {"batch": batch, "decode_tok_s": batch * (output_len - 1) / secs}


def quanta_prefill(llm, prompt_len: int, num_prompts: int, flops_per_token: float, attn_flops: float) -> dict:
    """Prefill speed: `num_prompts` prompts of `prompt_len` tokens, one output token each. Achieved FLOP/s counts
    the linear layers (2 x params per token) and causal attention (`attn_flops` per prompt)."""
    from quanta import SamplingParams

    vocab = llm._built.hf_config.vocab_size
    params = SamplingParams(max_tokens=1, ignore_eos=True)
    llm.generate(random_prompts(2, prompt_len, vocab, seed=5), params, use_tqdm=False)
    prompts = random_prompts(num_prompts, prompt_len, vocab, seed=6)
    t0 = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    tokens = num_prompts * prompt_len
    flops = tokens * flops_per_token + num_prompts * attn_flops
    return {"prompt_len": prompt_len, "num_prompts": num_prompts, "wall_s": wall, "tok_s": tokens / wall,
            "achieved_TFLOPs": flops / wall / 1e12}


def hf_generate(model, prompts: list[list[int]], output_len: int) -> float:
    """Seconds for transformers' generate over a padded batch (greedy, fixed output length)."""
    device = next(model.parameters()).device
    ids = torch.tensor(prompts, device=device)
    kw = dict(max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False, pad_token_id=0,
              attention_mask=torch.ones_like(ids))
    model.generate(ids[:, :8], **{**kw, "max_new_tokens": 4, "min_new_tokens": 4,
                                  "attention_mask": torch.ones_like(ids[:, :8])})
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(ids, **kw)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def hf_peer(model, vocab: int, input_len: int, output_len: int, batch_sizes: list[int]) -> dict:
    out = {}
    for bs in batch_sizes:
        t = hf_generate(model, random_prompts(bs, input_len, vocab, seed=bs), output_len)
        out[bs] = {"wall_s": t, "output_tok_s": bs * output_len / t}
    return out
