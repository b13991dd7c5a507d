"""Multi-LoRA throughput: a batch mixing N different adapters vs the base model alone (same run, same card).

    python benchmarks/bench_lora.py [CONFIG.json] --batch 32 --adapters 8 --rank 16 --out results/lora.json

Dummy weights of the config's shape (default: ../shared/configs/llama-3.2-1b.json), bf16 on a GPU. The
adapters (rank `--rank` on all seven projections, random weights) are written as PEFT folders to a temp
dir. Three engines are measured one after the other, each with `--batch` requests of `--input-len` prompt
tokens and `--output-len` output tokens (ignore_eos), after a warm-up:

- base: an engine without LoRA (the baseline);
- lora: LoRA on, the requests spread round-robin over `--adapters` adapters (all in one batch);
- lora_idle: LoRA on, every request on the base model (what enabling LoRA costs when unused).

Reports output tokens/s (median of --repeats) and `lora / base` (the issue's target: >= 0.75 at batch 32).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from quanta import LLM, SamplingParams
from quanta.llmapi import KvCacheConfig, LoraConfig, LoRARequest

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT.parent / "shared" / "configs" / "llama-3.2-1b.json"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_adapter(folder: Path, cfg: dict, rank: int, seed: int, dtype=torch.bfloat16) -> Path:
    """A PEFT LoRA folder for a model of `cfg`'s shape: random A and B (std 0.02) on every projection."""
    from safetensors.torch import save_file

    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or hidden // heads
    dims = {  # module -> (in, out)
        "q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv_heads * head_dim),
        "v_proj": (hidden, kv_heads * head_dim), "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden),
    }
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(cfg["num_hidden_layers"]):
        for mod, (d_in, d_out) in dims.items():
            part = "self_attn" if mod in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{layer}.{part}.{mod}"
            tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, d_in, generator=g) * 0.02).to(dtype)
            tensors[f"{key}.lora_B.weight"] = (torch.randn(d_out, rank, generator=g) * 0.02).to(dtype)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": TARGETS,
        "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
    }))
    return folder


def measure(llm: LLM, prompts, params, loras, repeats: int) -> dict:
    llm.generate(prompts, params, lora_request=loras, use_tqdm=False)  # warm-up: compile, load adapters
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        outs = llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
        times.append(time.perf_counter() - t)
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    t = statistics.median(times)
    return {"out_tok_s": tokens / t, "seconds": t, "times": times, "output_tokens": tokens}


def trace(llm: LLM, prompts, params, loras) -> None:
    """Kernel table of one generate (CUDA-graph replays show as one entry unless --eager)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=70), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config", nargs="?", default=str(DEFAULT_CONFIG))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--eager", action="store_true", help="no CUDA graphs")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--trace", action="store_true", help="print each run's top GPU kernels (torch.profiler)")
    a = ap.parse_args()
    cfg = json.loads(Path(a.config).read_text())
    vocab = cfg["vocab_size"]
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, vocab - 10, (a.input_len,), generator=g).tolist() for _ in range(a.batch)]
    params = SamplingParams(max_tokens=a.output_len, ignore_eos=True)
    common = dict(load_format="dummy", skip_tokenizer_init=True, max_batch_size=a.batch, enforce_eager=a.eager,
                  kv_cache_config=KvCacheConfig(max_tokens=a.batch * (a.input_len + a.output_len) * 2))
    results = {"config": Path(a.config).name, "batch": a.batch, "adapters": a.adapters, "rank": a.rank,
               "input_len": a.input_len, "output_len": a.output_len,
               "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    with tempfile.TemporaryDirectory() as tmp:
        paths = [write_adapter(Path(tmp) / f"a{i}", cfg, a.rank, seed=i) for i in range(a.adapters)]
        reqs = [LoRARequest(f"adapter{i}", i + 1, str(p)) for i, p in enumerate(paths)]
        runs = [
            ("base", {}, None),
            ("lora", {"lora_config": LoraConfig(max_lora_rank=a.rank, max_loras=a.adapters)},
             [reqs[i % a.adapters] for i in range(a.batch)]),
            ("lora_idle", {"lora_config": LoraConfig(max_lora_rank=a.rank, max_loras=a.adapters)}, None),
        ]
        for name, extra, loras in runs:
            llm = LLM(a.config, **common, **extra)
            results[name] = measure(llm, prompts, params, loras, a.repeats)
            if a.trace:
                trace(llm, prompts, params, loras)
            print(f"{name:10s} {results[name]['out_tok_s']:10.1f} out tok/s ({results[name]['seconds']:.3f} s)",
                  flush=True)
            llm.shutdown()
            del llm
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    base = results["base"]["out_tok_s"]
    results["lora_over_base"] = results["lora"]["out_tok_s"] / base
    results["lora_idle_over_base"] = results["lora_idle"]["out_tok_s"] / base
    print(f"{a.adapters} adapters in a batch of {a.batch}: {results['lora_over_base']:.3f} of the base "
          f"model's throughput (LoRA on but unused: {results['lora_idle_over_base']:.3f}) on {results['device']}")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
