"""`quanta quantize MODEL --algo ALGO --out DIR`: quantize a float checkpoint once, save it, load it later
with `LLM(DIR)` (no calibration at load)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path


def register(sub) -> dict[str, Callable]:
    p = sub.add_parser("quantize", help="quantize a checkpoint and save it (loads later without calibration)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help="float checkpoint folder or Hub id")
    p.add_argument("--algo", default="W4A16_AWQ", help="QuantAlgo, e.g. W4A16_AWQ, W4A16_GPTQ, W8A16, "
                   "W8A8_SQ_PER_CHANNEL, FP8, FP8_PER_CHANNEL_PER_TOKEN, or NO_QUANT (KV cache only)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--zero-point", action="store_true", help="asymmetric int weights (has_zero_point)")
    p.add_argument("--smoothquant-alpha", type=float, default=0.5)
    p.add_argument("--pre-quant-scale", action="store_true", help="keep AWQ/SmoothQuant scales as a runtime "
                   "activation scale instead of folding them into the previous op")
    p.add_argument("--kv-cache", choices=["INT8", "FP8"], default=None, help="also quantize the KV cache")
    p.add_argument("--exclude", action="append", default=None, metavar="PATTERN",
                   help="fnmatch pattern of modules to keep in high precision (repeatable)")
    c = p.add_argument_group("calibration")
    c.add_argument("--calib-dataset", default="cnn_dailymail", help="local .txt/.jsonl file, 'random', or a "
                   "Hugging Face dataset (needs the Hub)")
    c.add_argument("--calib-batches", type=int, default=512)
    c.add_argument("--calib-batch-size", type=int, default=1)
    c.add_argument("--calib-seq-len", type=int, default=512)
    c.add_argument("--seed", type=int, default=1234)
    e = p.add_argument_group("engine")
    e.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    e.add_argument("--dtype", default="auto")
    return {"quantize": run_quantize}


def run_quantize(args) -> int:
    import torch

    from quanta.config import CalibConfig, QuantConfig
    from quanta.llmapi.llm_args import resolve_dtype
    from quanta.models.loader import build_model, load_hf_config, resolve_model_path
    from quanta.quantization import quantize_model
    from quanta.quantization.checkpoint import save_quantized
    from quanta.tokenizer import load_tokenizer

    qc = QuantConfig(quant_algo=args.algo, kv_cache_quant_algo=args.kv_cache, group_size=args.group_size,
                     smoothquant_val=args.smoothquant_alpha, has_zero_point=args.zero_point,
                     pre_quant_scale=args.pre_quant_scale, exclude_modules=args.exclude)
    calib = CalibConfig(calib_dataset=args.calib_dataset, calib_batches=args.calib_batches,
                        calib_batch_size=args.calib_batch_size, calib_max_seq_length=args.calib_seq_len,
                        random_seed=args.seed)
    path = resolve_model_path(args.model)
    hf_config = load_hf_config(path)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = build_model(hf_config, path, resolve_dtype(args.dtype, hf_config, device), device)
    tokenizer = load_tokenizer(path, "auto", False, None) if args.calib_dataset != "random" else None
    quantize_model(model, qc, calib, tokenizer)
    out = Path(args.out)
    save_quantized(model, hf_config, out, path)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    print(f"quanta: wrote {qc.quant_algo} model to {out}")
    return 0
