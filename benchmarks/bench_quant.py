"""Quantized vs bf16 on one GPU, Llama-3.1-8B shape with dummy weights (issue 6's speed targets):

  W4A16_AWQ batch-1 decode   >= 2.5x bf16     W4A16_AWQ batch-16 decode   >= 2x bf16
  FP8 throughput 128/128     >= 1.4x bf16     AWQ calibration + quantization <= 3 minutes

    python benchmarks/bench_quant.py [--config ../shared/configs/llama-3.1-8b.json] [--parts bf16,awq,fp8]
           [--json benchmarks/results/bench_quant.json]

Every number comes from one run on one card (baseline included); the card is printed. Calibration uses
random tokens (dummy weights): the time is what matters here, not the quality.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path

import torch

from quanta import LLM, SamplingParams
from quanta.bench.runs import quanta_latency, quanta_throughput, random_prompts
from quanta.config import CalibConfig, QuantConfig

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("QUANTA_SHARED", ROOT.parent / "shared"))


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _empty_cache() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def decode_tok_s(llm, batch: int, input_len: int = 128, output_len: int = 256) -> float:
    """Output tokens per second of `batch` requests decoding together: (T(out=N) - T(out=1)) takes the
    prefill out."""
    vocab = llm._built.hf_config.vocab_size
    prompts = random_prompts(batch, input_len, vocab, seed=8)

    def run(n: int) -> float:
        t0 = time.perf_counter()
        llm.generate(prompts, SamplingParams(max_tokens=n, ignore_eos=True), use_tqdm=False)
        return time.perf_counter() - t0

    run(8)  # warm up
    return batch * (output_len - 1) / max(run(output_len) - run(1), 1e-9)


def measure(name: str, config: str, args, **kw) -> dict:
    t0 = time.perf_counter()
    llm = LLM(config, load_format="dummy", skip_tokenizer_init=True, max_batch_size=max(args.num_requests, 16),
              **kw)
    _sync()
    res: dict = {"build_s": time.perf_counter() - t0}
    if "quant_config" in kw:
        res["quantize_s"] = getattr(llm._built.engine.runner.model, "quantize_seconds", None)
    which = args.measures.split(",")
    if "batch1" in which:
        res["batch1"] = quanta_latency(llm, 128, 128)
    if "batch16" in which:
        res["batch16_decode_tok_s"] = decode_tok_s(llm, 16)
    if "batch4" in which:
        res["batch4_decode_tok_s"] = decode_tok_s(llm, 4)
    if "throughput" in which:
        res["throughput_128_128"] = quanta_throughput(llm, args.num_requests, 128, 128)
    res["weight_gib"] = sum(p.numel() * p.element_size() for p in llm._built.engine.runner.model.parameters()) / 2**30
    print(f"{name}: {json.dumps(res, default=float)}", flush=True)
    llm.shutdown()
    del llm
    _empty_cache()
    return res


def time_awq(config: str, calib: CalibConfig) -> float:
    """Seconds for AWQ calibration + quantization alone (model load excluded)."""
    from quanta.builder import load_config_only
    from quanta.models.loader import build_model
    from quanta.quantization import quantize_model

    hf_config, _ = load_config_only(config, None, False)
    cuda = torch.cuda.is_available()
    model = build_model(hf_config, None, torch.bfloat16 if cuda else torch.float32,
                        torch.device("cuda" if cuda else "cpu"), "dummy")
    _sync()
    t0 = time.perf_counter()
    quantize_model(model, QuantConfig(quant_algo="W4A16_AWQ"), calib)
    _sync()
    secs = time.perf_counter() - t0
    del model
    _empty_cache()
    return secs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(SHARED / "configs" / "llama-3.1-8b.json"))
    ap.add_argument("--parts", default="bf16,awq,fp8,awq_time")
    ap.add_argument("--num-requests", type=int, default=512, help="requests in the 128/128 throughput run")
    ap.add_argument("--measures", default="batch1,batch16,throughput", help="which of the runs (also: batch4)")
    ap.add_argument("--calib-batches", type=int, default=128, help="AWQ calibration sequences (x 512 tokens)")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "bench_quant.json"))
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    calib = CalibConfig(calib_dataset="random", calib_batches=args.calib_batches // 8, calib_batch_size=8,
                        calib_max_seq_length=512)
    out: dict = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "config": args.config, "date": time.strftime("%Y-%m-%d"),
                 "calib_sequences": calib.calib_batches * calib.calib_batch_size}
    if "bf16" in parts:
        out["bf16"] = measure("bf16", args.config, args)
    if "awq" in parts:
        out["w4a16_awq"] = measure("W4A16_AWQ", args.config, args, quant_config=QuantConfig(quant_algo="W4A16_AWQ"),
                                   calib_config=calib)
    if "awq_tg" in parts:  # W4A16_AWQ with PyTorch's int4 GEMM (w_int_tinygemm.py) for linears of <= 16 rows
        from quanta.quantization import w_int_tinygemm

        w_int_tinygemm.MAX_ROWS = 16
        out["w4a16_awq_tinygemm"] = measure("W4A16_AWQ+tinygemm", args.config, args,
                                            quant_config=QuantConfig(quant_algo="W4A16_AWQ"), calib_config=calib)
    if "awq_bytes" in parts:  # W4A16_AWQ with the byte GEMV at one row (the inline-PTX one, w_int_gemv_asm.py, off)
        from quanta.quantization import w_int_gemv_asm, w_int_tinygemm

        w_int_tinygemm.MAX_ROWS, w_int_gemv_asm.ASM_ENABLED = 0, False
        out["w4a16_awq_bytes"] = measure("W4A16_AWQ+bytes", args.config, args,
                                         quant_config=QuantConfig(quant_algo="W4A16_AWQ"), calib_config=calib)
        w_int_gemv_asm.ASM_ENABLED = True
    if "fp8" in parts:
        out["fp8"] = measure("FP8", args.config, args, quant_config=QuantConfig(quant_algo="FP8"),
                             calib_config=CalibConfig(calib_dataset="random", calib_batches=8, calib_batch_size=8,
                                                      calib_max_seq_length=512))
    if "awq_time" in parts:
        out["awq_calib_quant_s"] = time_awq(args.config, calib)
    b = out.get("bf16")
    summary = []
    for key in ("w4a16_awq", "w4a16_awq_tinygemm", "w4a16_awq_bytes"):
        if b and key in out and all(m in b and m in out[key] for m in ("batch1", "batch16_decode_tok_s",
                                                                          "throughput_128_128")):
            a, name = out[key], key.upper().replace("W4A16_AWQ_", "W4A16_AWQ+")
            summary.append(f"{name} batch-1 decode {a['batch1']['decode_tok_s']:.1f} tok/s = "
                           f"{a['batch1']['decode_tok_s'] / b['batch1']['decode_tok_s']:.2f}x bf16 (target >= 2.5x)")
            summary.append(f"{name} batch-16 decode {a['batch16_decode_tok_s']:.0f} tok/s = "
                           f"{a['batch16_decode_tok_s'] / b['batch16_decode_tok_s']:.2f}x bf16 (target >= 2x)")
            summary.append(f"{name} throughput 128/128 {a['throughput_128_128']['output_tok_s']:.0f} out tok/s = "
                           f"{a['throughput_128_128']['output_tok_s'] / b['throughput_128_128']['output_tok_s']:.2f}x bf16")
    if b and "fp8" in out and "throughput_128_128" in b and "throughput_128_128" in out["fp8"]:
        f = out["fp8"]
        summary.append(f"FP8 throughput 128/128 {f['throughput_128_128']['output_tok_s']:.0f} out tok/s = "
                       f"{f['throughput_128_128']['output_tok_s'] / b['throughput_128_128']['output_tok_s']:.2f}x "
                       "bf16 (target >= 1.4x)")
    if "awq_calib_quant_s" in out:
        summary.append(f"AWQ calibration + quantization: {out['awq_calib_quant_s']:.0f} s for "
                       f"{out['calib_sequences']} x 512 tokens (target <= 180 s)")
    out["summary"] = summary
    print(f"\n{out['device']}")
    print("\n".join(summary))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
