"""Quantization quality on real weights (CPU): perplexity of every algorithm on stories260K and quanta-tiny.

    python benchmarks/quant_quality.py [--tokens 8192] [--write benchmarks/RESULTS.md]

Perplexity on the first N tokens of ../shared's wikitext-2 test and TinyStories sample (windows of 256, each
starting with BOS), calibrated on C4 (AWQ, GPTQ: 64 x 256 tokens; the others: 16 x 256). Prints the table;
--write puts it in RESULTS.md under "## Quantization quality (CPU, real weights)" (replacing that section only).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import time
from pathlib import Path

import torch

from quanta.assets import ASSETS
from quanta.config import CalibConfig, QuantAlgo, QuantConfig
from quanta.quantization.eval import quantized_perplexities

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("QUANTA_SHARED", ROOT.parent / "shared"))
CORPORA = {"wikitext2": SHARED / "corpora" / "wikitext2_test.txt",
           "tinystories": SHARED / "corpora" / "tinystories_valid_head.txt"}
HEADING = "## Quantization quality (CPU, real weights)"

W4 = ["W4A16", "W4A16_AWQ", "W4A16_GPTQ"]
OTHERS = ["W8A16", "W8A16_GPTQ", "W8A8_SQ_PER_CHANNEL", "W8A8_SQ_PER_TENSOR_PLUGIN", "FP8",
          "FP8_PER_CHANNEL_PER_TOKEN", "W4A8_AWQ"]


def rows_for(model: str) -> list[tuple[str | None, int, bool, str | None]]:
    """(algo, group size, zero point, kv cache algo) rows of one model."""
    groups = [32] if model == "stories260K" else [128, 64]
    rows: list = [(None, 0, False, None)]
    for g in groups:
        for zp in (False, True):
            rows += [(a, g, zp, None) for a in W4]
    rows += [(a, groups[0], False, None) for a in OTHERS]
    rows += [(None, 0, False, "INT8"), (None, 0, False, "FP8")]
    return rows


def searches(algo: str | None) -> bool:
    """AWQ and GPTQ fit the weights to the calibration data (GPTQ's Hessian is in x in: 16 x 256 tokens are
    ~5 per input of quanta-tiny's 768-wide down_proj), the others take only max statistics from it."""
    return algo is not None and ("AWQ" in algo or "GPTQ" in algo)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--calib-batches", type=int, default=64, help="AWQ / GPTQ calibration: sequences of 256 tokens")
    ap.add_argument("--amax-calib-batches", type=int, default=16,
                    help="the same for max statistics only (SmoothQuant, static FP8 and KV-cache scales)")
    ap.add_argument("--write", default=None, help="RESULTS.md to update")
    a = ap.parse_args()
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    cal = {n: CalibConfig(calib_dataset=str(SHARED / "corpora" / "c4_en_head1000.jsonl"), calib_batches=n,
                          calib_max_seq_length=256) for n in (a.calib_batches, a.amax_calib_batches)}
    paths = {"stories260K": SHARED / "models" / "stories260K", "quanta-tiny": ASSETS / "quanta-tiny"}
    lines = ["| model | algorithm | group | zero point | wikitext-2 ppl | TinyStories ppl | geo-mean vs float "
             "| quantize s |", "|---|---|---|---|---|---|---|---|"]
    for model, path in paths.items():
        base = None
        for algo, group, zp, kv in rows_for(model):
            qc = None
            if algo or kv:
                qc = QuantConfig(quant_algo=algo, group_size=group or 128, has_zero_point=zp,
                                 kv_cache_quant_algo=QuantAlgo(kv) if kv else None)
            batches = a.calib_batches if searches(algo) else a.amax_calib_batches
            ppl, secs = quantized_perplexities(path, qc, cal[batches], CORPORA, a.tokens)
            geo = math.exp(sum(math.log(v) for v in ppl.values()) / len(ppl))
            base = base or geo
            name = algo or ("float" if kv is None else "float weights")
            name += f" + KV {kv}" if kv else ""
            shown = group if algo in W4 + ["W8A16_GPTQ", "W4A8_AWQ"] else "channel" if algo == "W8A16" else "-"
            line = (f"| {model} | {name} | {shown} | {'yes' if zp else '-'} | {ppl['wikitext2']:.3f} | "
                    f"{ppl['tinystories']:.4f} | {100 * (geo / base - 1):+.2f}% | {secs:.1f} |")
            print(line, flush=True)
            lines.append(line)
    table = "\n".join(lines)
    print(table)
    if a.write:
        write_section(Path(a.write), table, a.tokens, a.calib_batches, a.amax_calib_batches)


def write_section(path: Path, table: str, tokens: int, calib_batches: int, amax_batches: int) -> None:
    note = (f"Perplexity on the first {tokens} tokens of wikitext-2 (test) and the TinyStories sample in ../shared "
            f"(windows of 256 tokens starting with BOS), float32 on the CPU, calibration on C4: {calib_batches} x 256 "
            f"tokens for AWQ and GPTQ, {amax_batches} x 256 for the max statistics of SmoothQuant and the static FP8 "
            "and KV-cache scales. stories260K uses group size 32 (its dims are 64 and 172: the last group of 172 is 12 wide); "
            "quanta-tiny 128 and 64. 'geo-mean vs float' = geometric mean of the two perplexities against the "
            "float model's. Generated by `python benchmarks/quant_quality.py --write benchmarks/RESULTS.md` "
            f"({time.strftime('%Y-%m-%d')}).")
    reading = (
        "Reading: on stories260K, AWQ and GPTQ recover most of round-to-nearest's loss on both corpora, with and "
        "without zero points. quanta-tiny barely suffers from 4-bit RTN (about 1-2%) and has no activation outlier "
        "channels (per-channel mean |x| spreads ~1.5-2.6x, not the ~100x of large LLMs) for AWQ's scales to "
        "protect: what AWQ and GPTQ gain there comes from the rounding. Both search each (row, group)'s range "
        "against its output error e H e^T (GPTQ on its Hessian, AWQ on its 1024 sampled tokens), which lets "
        "symmetric groups use the level -8 that RTN's max|w| / 7 leaves unused, and GPTQ feeds the rounding "
        "error forward. With zero points at group 128 and 64, and symmetric at group 64, AWQ and GPTQ beat RTN "
        "on the geometric mean. Symmetric at group 128 they win no reliable margin on perplexity (here GPTQ is "
        "ahead and AWQ behind; on 32k tokens per corpus, one thread, both are behind: +1.48% and +0.83% against "
        "+0.67%) although both stay closer to the float model (KL to it on wikitext-2 -28% and -47%): quanta-tiny "
        "is over-confident on wikitext-2 (its logits / 1.05 score 7% better there), so RTN's larger error, which "
        "flattens its predictions, brings that perplexity down to the float model's. Changed since the last "
        "table: AWQ's clip search chooses the group range instead of clamping the weights for RTN (symmetric "
        "groups could not reach -8), GPTQ searches its group ranges (it took max|w|), and AWQ and GPTQ calibrate "
        "on 64 x 256 tokens (16 x 256 left GPTQ's 768 x 768 down_proj Hessian ~5 tokens per input). 8-bit "
        "weights, SmoothQuant per-channel/per-token and both FP8 modes stay within 1% of float on quanta-tiny; on "
        "stories260K FP8 per-token is +1.5% on TinyStories (a 3-bit mantissa on a 260K-parameter model). "
        "Per-tensor SmoothQuant and an FP8 KV cache hurt stories260K (head_dim 8, tiny layers) and not "
        "quanta-tiny. Asserted by tests/test_quantization_quality.py.")
    section = f"{HEADING}\n\n{note}\n\n{table}\n\n{reading}\n"
    text = path.read_text() if path.is_file() else "# quanta benchmark results\n"
    pattern = re.compile(rf"^{re.escape(HEADING)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(section + "\n", text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


if __name__ == "__main__":
    main()
