"""Perplexity of a quanta model on a text corpus (quality of quantization; benchmarks and tests)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from quanta.quantization.calib import model_logits


def corpus_tokens(path: str | Path, tokenizer, max_tokens: int) -> torch.Tensor:
    """The first `max_tokens` tokens of a text file (read only as far as needed), [N] int64."""
    text = Path(path).read_text(errors="replace")[: max_tokens * 12]
    try:
        ids = tokenizer.encode(text, add_special_tokens=False, verbose=False)
    except TypeError:
        ids = tokenizer.encode(text)
    return torch.tensor(list(ids)[:max_tokens], dtype=torch.long)


@torch.no_grad()
def perplexity(model: nn.Module, tokens: torch.Tensor, seq_len: int, batch_size: int = 8,
               bos_id: int | None = None) -> float:
    """exp(mean NLL) over non-overlapping windows of `seq_len` tokens (each window starts with `bos_id` when
    given, so every corpus token is predicted in context)."""
    step = seq_len - (1 if bos_id is not None else 0)
    n = (tokens.numel() - 1) // step
    windows = [tokens[i * step : (i + 1) * step] for i in range(n)]
    if bos_id is not None:
        windows = [torch.cat([torch.tensor([bos_id]), w]) for w in windows]
    nll, count = 0.0, 0
    for b0 in range(0, len(windows), batch_size):
        ids = torch.stack(windows[b0 : b0 + batch_size])  # [B, seq_len]
        logits = model_logits(model, ids)  # [B, seq_len, vocab]
        lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        target = ids[:, 1:].to(lp.device)
        nll -= lp.gather(-1, target[..., None]).sum().item()
        count += target.numel()
    return math.exp(nll / max(count, 1))


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> nn.Module:
    """A quanta model straight from a checkpoint folder (no engine, no KV cache): for quality work."""
    from quanta.models.loader import build_model, load_hf_config

    path = Path(path)
    return build_model(load_hf_config(path), path, dtype, torch.device(device))


def quantized_perplexities(path: str | Path, qc, calib, corpora: dict[str, Path], max_tokens: int = 8192,
                           seq_len: int = 256, tokenizer=None) -> tuple[dict[str, float], float]:
    """Load `path` (float32, CPU), quantize it as `qc` says (None: float), return ({corpus: perplexity},
    quantization seconds): one row of the quality table."""
    import time

    from transformers import AutoTokenizer

    from quanta.quantization.pipeline import quantize_model

    tok = tokenizer or AutoTokenizer.from_pretrained(str(path))
    model = load_model(path)
    t0 = time.perf_counter()
    if qc is not None:
        quantize_model(model, qc, calib, tok, show_progress=False)
    seconds = time.perf_counter() - t0
    ppl = {name: perplexity(model, corpus_tokens(f, tok, max_tokens), seq_len, bos_id=tok.bos_token_id)
           for name, f in corpora.items()}
    return ppl, seconds
