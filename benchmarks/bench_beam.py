"""Beam search vs greedy throughput at the same batch of requests (issue 4's speed check).

    python benchmarks/bench_beam.py ../shared/configs/llama-3.2-1b.json --batch 16 --beam 4 --json out.json
    python benchmarks/bench_beam.py MODEL_DIR --batch 1,16,64

A config.json runs with dummy weights (as `quanta bench` does). Every request generates exactly
--output-len tokens (greedy: ignore_eos; beams: end_id=-1, so every beam runs to max_tokens and the
search never stops early). Reported per batch size B:
- greedy B: B requests, output tokens/s;
- beam k B: B requests of k beams each, output tokens/s of the returned (best) beams, and of all beams
  (B * k sequences decode per step);
- greedy B*k: as many sequences as the beam run decodes, for the cost of the beams themselves;
- ratio = beam k B / greedy B (the issue's number), and the host time spent in beam bookkeeping
  (engine/beam_search.py) and in the runner's candidate step (sampling/beam.py).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from quanta import LLM, SamplingParams
from quanta.bench.runs import random_prompts


def _timed(obj, name: str, acc: dict) -> None:
    fn = getattr(obj, name)

    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            acc[name] = acc.get(name, 0.0) + time.perf_counter() - t

    setattr(obj, name, wrapper)


def _run(llm, prompts, params, repeat: int) -> tuple[float, list]:
    best, outs = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        best = min(best, time.perf_counter() - t0)
    return best, outs


def bench(llm, batch: int, beam: int, input_len: int, output_len: int, repeat: int) -> dict:
    vocab = llm._built.hf_config.vocab_size
    prompts = random_prompts(batch, input_len, vocab, seed=batch)
    greedy = SamplingParams(max_tokens=output_len, ignore_eos=True)
    beams = SamplingParams(beam_width=beam, max_tokens=output_len, end_id=-1)
    # warm up both paths (CUDA graphs, allocator, Triton autotune) on a small batch
    llm.generate(prompts[:2], greedy, use_tqdm=False)
    llm.generate(prompts[:2], beams, use_tqdm=False)
    res: dict = {"batch": batch, "beam": beam}
    wall, outs = _run(llm, prompts, greedy, repeat)
    res["greedy_s"], res["greedy_tok_s"] = wall, sum(len(o.outputs[0].token_ids) for o in outs) / wall
    wide = random_prompts(batch * beam, input_len, vocab, seed=batch + 1)
    wall, outs = _run(llm, wide, greedy, repeat)
    res["greedy_x_beam_s"], res["greedy_x_beam_tok_s"] = wall, sum(len(o.outputs[0].token_ids) for o in outs) / wall
    acc: dict = {}
    eng = llm.engine
    _timed(eng.beams, "process", acc)
    _timed(eng.runner, "_beam_rows", acc)
    wall, outs = _run(llm, prompts, beams, repeat)
    del eng.beams.process, eng.runner._beam_rows  # unwrap (the class methods show through again)
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    res["beam_s"], res["beam_tok_s"] = wall, out_tokens / wall
    res["beam_all_beams_tok_s"] = out_tokens * beam / wall
    res["ratio_beam_vs_greedy"] = res["beam_tok_s"] / res["greedy_tok_s"]
    res["beam_bookkeeping_s_per_run"] = acc.get("process", 0.0) / repeat
    res["beam_candidates_s_per_run"] = acc.get("_beam_rows", 0.0) / repeat
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="model folder, Hub id, or a config.json (dummy weights)")
    ap.add_argument("--batch", default="16", help="requests per run, comma-separated list")
    ap.add_argument("--beam", type=int, default=4)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=2, help="runs per measurement (best is kept)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default=None)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--json", default=None, help="write the results here")
    a = ap.parse_args()
    batches = [int(b) for b in a.batch.split(",")]
    dummy = a.model.endswith(".json")
    max_bs = max(batches) * a.beam
    llm = LLM(a.model, dtype=a.dtype, device=a.device, enforce_eager=a.enforce_eager, skip_tokenizer_init=dummy,
              load_format="dummy" if dummy else "auto", max_beam_width=a.beam, max_batch_size=max(max_bs, 8),
              max_seq_len=a.input_len + a.output_len + 8)
    device = llm._built.device
    result = {"model": a.model, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "date": time.strftime("%Y-%m-%d"), "input_len": a.input_len, "output_len": a.output_len, "runs": []}
    print(f"== beam {a.beam} vs greedy: {a.model} on {result['device']}, {a.input_len} in / {a.output_len} out ==")
    print(f"{'batch':>6} {'greedy tok/s':>13} {'beam tok/s':>11} {'ratio':>6} {'all beams tok/s':>16} "
          f"{'greedy Bxk tok/s':>17} {'bookkeeping s':>14} {'candidates s':>13}")
    for b in batches:
        r = bench(llm, b, a.beam, a.input_len, a.output_len, a.repeat)
        result["runs"].append(r)
        print(f"{b:>6} {r['greedy_tok_s']:>13.1f} {r['beam_tok_s']:>11.1f} {r['ratio_beam_vs_greedy']:>6.3f} "
              f"{r['beam_all_beams_tok_s']:>16.1f} {r['greedy_x_beam_tok_s']:>17.1f} "
              f"{r['beam_bookkeeping_s_per_run']:>14.3f} {r['beam_candidates_s_per_run']:>13.3f}")
    llm.shutdown()
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
