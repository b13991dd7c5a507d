"""`quanta bench latency|throughput|all MODEL_OR_CONFIG [--peer hf]`: tables on stdout, JSON to a file."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch


def register(sub) -> dict:
    p = sub.add_parser("bench", help="measure latency / throughput (and a transformers peer)")
    p.add_argument("mode", choices=["latency", "throughput", "prefill", "all"])
    p.add_argument("model", help="model folder, Hub id, or a config.json (dummy weights)")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--decode-batch-sizes", default="64", help="'all': decode tok/s at these batch sizes")
    p.add_argument("--prefill-len", type=int, default=2048)
    p.add_argument("--prefill-prompts", type=int, default=16)
    p.add_argument("--peer", choices=["hf"], default=None, help="also run transformers' generate")
    p.add_argument("--peer-batch-sizes", default="1,64")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default=None)
    p.add_argument("--max-batch-size", type=int, default=None)
    p.add_argument("--max-num-tokens", type=int, default=None)
    p.add_argument("--max-seq-len", type=int, default=None)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--disable-kernels", action="store_true")
    p.add_argument("--quant-algo", default=None, help="quantize at load (QuantAlgo name, e.g. W4A16_AWQ, FP8); "
                   "dummy weights calibrate on random tokens")
    p.add_argument("--json", default=None, help="write the results here")
    return {"bench": run}


def _dummy(model: str) -> bool:
    return Path(model).suffix == ".json"


def _peer(args, device) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    from quanta.bench.runs import hf_peer

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if _dummy(args.model):
        data = json.loads(Path(args.model).read_text())
        cfg = AutoConfig.for_model(data.pop("model_type"), **data)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device)
    model.eval()
    sizes = [int(b) for b in args.peer_batch_sizes.split(",")]
    res = hf_peer(model, model.config.vocab_size, args.input_len, args.output_len, sizes)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def run(args) -> int:
    from quanta import LLM
    from quanta.bench.roofline import copy_bandwidth, matmul_flops, num_params, weight_bytes
    from quanta.bench.runs import quanta_decode_batch, quanta_latency, quanta_prefill, quanta_throughput

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    result: dict = {"model": args.model, "device": torch.cuda.get_device_name(device) if device.type == "cuda"
                    else "cpu", "date": time.strftime("%Y-%m-%d"), "input_len": args.input_len,
                    "output_len": args.output_len}
    result["copy_bw_GBs"] = copy_bandwidth(device) / 1e9
    result["matmul_TFLOPs"] = matmul_flops(device) / 1e12
    if args.peer:
        result["peer_hf"] = _peer(args, device)
    kw = {k: v for k, v in dict(max_batch_size=args.max_batch_size, max_num_tokens=args.max_num_tokens,
                                max_seq_len=args.max_seq_len).items() if v is not None}
    if args.quant_algo:
        from quanta.config import CalibConfig, QuantConfig

        kw["quant_config"] = QuantConfig(quant_algo=args.quant_algo)
        if _dummy(args.model):
            kw["calib_config"] = CalibConfig(calib_dataset="random", calib_batches=16, calib_max_seq_length=512)
        result["quant_algo"] = args.quant_algo
    t0 = time.perf_counter()
    llm = LLM(args.model, dtype=args.dtype, device=args.device, enforce_eager=args.enforce_eager,
              disable_kernels=args.disable_kernels, skip_tokenizer_init=_dummy(args.model),
              load_format="dummy" if _dummy(args.model) else "auto", **kw)
    result["build_s"] = time.perf_counter() - t0
    net = llm._built.engine.runner.model
    result["params"], result["weight_bytes"] = num_params(net), weight_bytes(net)
    if args.mode in ("latency", "all"):
        lat = quanta_latency(llm, args.input_len, args.output_len)
        kv_per_tok = _kv_bytes_per_token(llm)
        avg_ctx = args.input_len + args.output_len / 2
        roof = result["copy_bw_GBs"] * 1e9 / (result["weight_bytes"] + kv_per_tok * avg_ctx)
        lat.update(roofline_tok_s=roof, fraction_of_roofline=lat["decode_tok_s"] / roof)
        result["latency"] = lat
        result["decode_batch"] = [quanta_decode_batch(llm, int(b), args.input_len, args.output_len)
                                  for b in args.decode_batch_sizes.split(",") if b and args.mode == "all"]
    if args.mode in ("throughput", "all"):
        result["throughput"] = quanta_throughput(llm, args.num_requests, args.input_len, args.output_len)
    if args.mode in ("prefill", "all"):
        pre = quanta_prefill(llm, args.prefill_len, args.prefill_prompts, *_flops(llm, args.prefill_len))
        pre["fraction_of_matmul"] = pre["achieved_TFLOPs"] / result["matmul_TFLOPs"]
        result["prefill"] = pre
    llm.shutdown()
    _print(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def _flops(llm, prompt_len: int) -> tuple[float, float]:
    """(linear FLOPs per token = 2 x non-embedding params + the lm_head on the last token only is ignored,
    causal attention FLOPs per prompt: QK^T and PV over half the square)."""
    cfg = llm._built.hf_config
    net = llm._built.engine.runner.model
    embed = cfg.vocab_size * cfg.hidden_size
    tied = getattr(cfg, "tie_word_embeddings", False)
    linear = sum(p.numel() for p in net.parameters()) - embed * (1 if tied else 2)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attn = 2 * 2 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * prompt_len * prompt_len / 2
    return 2.0 * linear, attn


def _kv_bytes_per_token(llm) -> int:
    runner = llm._built.engine.runner
    return sum(k[0, 0].numel() * k.element_size() * 2 for k, _ in runner.kv_caches)


def _print(r: dict) -> None:
    print(f"\n== quanta bench: {r['model']} on {r['device']} ({r['date']}) ==")
    print(f"copy bandwidth {r['copy_bw_GBs']:.0f} GB/s, matmul {r['matmul_TFLOPs']:.1f} TFLOP/s, "
          f"params {r['params'] / 1e6:.1f} M, weights {r['weight_bytes'] / 1e9:.3f} GB, build {r['build_s']:.1f} s")
    if "latency" in r:
        lat = r["latency"]
        print(f"batch-1 {r['input_len']} in / {r['output_len']} out: TTFT {lat['ttft_s'] * 1e3:.1f} ms, "
              f"TPOT {lat['tpot_s'] * 1e3:.2f} ms, {lat['decode_tok_s']:.1f} tok/s "
              f"({100 * lat['fraction_of_roofline']:.1f}% of roofline {lat['roofline_tok_s']:.0f} tok/s)")
    for d in r.get("decode_batch", []):
        print(f"batch-{d['batch']} decode: {d['decode_tok_s']:.1f} out tok/s")
    if "prefill" in r:
        p = r["prefill"]
        print(f"prefill {p['num_prompts']} x {p['prompt_len']} tokens: {p['tok_s']:.0f} tok/s, "
              f"{p['achieved_TFLOPs']:.1f} TFLOP/s = {100 * p['fraction_of_matmul']:.1f}% of the measured matmul rate")
    if "throughput" in r:
        t = r["throughput"]
        print(f"throughput: {t['output_tok_s']:.1f} out tok/s, {t['total_tok_s']:.1f} total tok/s, "
              f"{t['requests_s']:.2f} req/s ({t['wall_s']:.2f} s)")
    for bs, p in r.get("peer_hf", {}).items():
        print(f"transformers generate, batch {bs}: {p['output_tok_s']:.1f} out tok/s ({p['wall_s']:.2f} s)")
