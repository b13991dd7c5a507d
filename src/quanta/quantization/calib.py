"""Calibration data and a plain PyTorch forward for it.

Data: CalibConfig.calib_dataset is a local .txt / .jsonl / .json file, 'random' (random token ids: speed
work on dummy weights), or a Hugging Face dataset name (needs the `datasets` package and the Hub). The text
is tokenized, joined and cut into calib_batches * calib_batch_size sequences of calib_max_seq_length tokens.

Forward: `LayerwiseRunner` feeds the sequences through the decoder one layer at a time, calib_batch_size
sequences per chunk, with `CalibBackend` as the attention (causal SDPA per sequence, no KV cache), so a
pass can gather a layer's statistics, change its weights, then move on.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from quanta.attention.forward_context import forward_context
from quanta.config import CalibConfig
from quanta.quantization.base import QuantizationError

logger = logging.getLogger("quanta")

_TEXT_KEYS = ("text", "article", "content", "document", "sentence")


def calibration_tokens(calib: CalibConfig, tokenizer, vocab_size: int) -> torch.Tensor:
    """[num_seqs, seq_len] int64 token ids for calibration."""
    num_seqs = calib.calib_batches * calib.calib_batch_size
    seq_len = calib.calib_max_seq_length
    if calib.calib_dataset == "random":
        g = torch.Generator().manual_seed(calib.random_seed)
        return torch.randint(0, vocab_size, (num_seqs, seq_len), generator=g)
    if isinstance(tokenizer, (str, Path)):  # no tokenizer object (skip_tokenizer_init): the model folder's
        tokenizer = _load_tokenizer(tokenizer)
    if tokenizer is None:
        raise QuantizationError("calibration needs a tokenizer (the model folder has none, or "
                                "skip_tokenizer_init=True); pass tokenizer=..., or CalibConfig(calib_dataset='random')")
    need = num_seqs * seq_len
    stream: list[int] = []
    for doc in _documents(calib.calib_dataset):
        ids = _encode(tokenizer, doc)[: calib.tokenizer_max_seq_length]
        stream.extend(ids)
        if len(stream) >= need:
            break
    have = len(stream) // seq_len
    if have == 0:
        raise QuantizationError(f"calibration dataset {calib.calib_dataset!r} has fewer than "
                                f"calib_max_seq_length={seq_len} tokens")
    if have < num_seqs:
        logger.warning("quanta: calibration data %s gives %d sequences of %d tokens, fewer than the %d asked "
                       "(calib_batches x calib_batch_size)", calib.calib_dataset, have, seq_len, num_seqs)
    n = min(have, num_seqs)
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def _load_tokenizer(path):
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path))
    except Exception:
        return None


def _encode(tokenizer, text: str) -> list[int]:
    try:  # verbose=False: no "longer than the model's maximum" warning, the stream is cut up anyway
        ids = tokenizer.encode(text, verbose=False)
    except TypeError:
        ids = tokenizer.encode(text)
    return list(ids.ids if hasattr(ids, "ids") else ids)


def _documents(dataset: str) -> Iterator[str]:
    path = Path(dataset).expanduser()
    if path.is_file():
        yield from _file_documents(path)
        return
    if dataset.endswith((".txt", ".json", ".jsonl")) or "/" in dataset and Path(dataset).parent.exists():
        raise QuantizationError(f"calibration dataset file {dataset!r} does not exist")
    yield from _hub_documents(dataset)


def _file_documents(path: Path) -> Iterator[str]:
    if path.suffix == ".jsonl":
        with path.open() as f:
            for line in f:
                if line.strip():
                    yield _text_of(json.loads(line))
    elif path.suffix == ".json":
        data = json.loads(path.read_text())
        items = data if isinstance(data, list) else data.get("text", data.get("data", []))
        for item in items:
            yield _text_of(item)
    else:  # plain text: paragraphs (blank-line separated) are documents
        for para in path.read_text(errors="replace").split("\n\n"):
            if para.strip():
                yield para + "\n\n"


def _text_of(item) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        for k in _TEXT_KEYS:
            if isinstance(item.get(k), str):
                return item[k]
        for v in item.values():
            if isinstance(v, str):
                return v
    raise QuantizationError(f"calibration record has no text field ({', '.join(_TEXT_KEYS)}): {str(item)[:80]}")


def _hub_documents(name: str) -> Iterator[str]:
    hint = ("pass a local text or jsonl file instead, e.g. "
            "CalibConfig(calib_dataset='../shared/corpora/c4_en_head1000.jsonl'), or 'random' for speed work")
    try:
        import datasets
    except ImportError:
        raise QuantizationError(f"calibration dataset {name!r} is a Hugging Face dataset: it needs the `datasets` "
                                f"package and the Hub; {hint}") from None
    try:
        if name == "cnn_dailymail":
            ds = datasets.load_dataset("abisee/cnn_dailymail", "3.0.0", split="train", streaming=True)
        else:
            ds = datasets.load_dataset(name, split="train", streaming=True)
        for item in ds:
            yield _text_of(item)
    except QuantizationError:
        raise
    except Exception as e:
        raise QuantizationError(f"could not load calibration dataset {name!r} from the Hugging Face Hub "
                                f"(offline?): {type(e).__name__}: {e}; {hint}") from e


# ------------------------------------------------------------------ the forward
@dataclass
class CalibMeta:
    num_seqs: int
    seq_len: int
    window: int | None = None  # sliding window (set per layer by the Attention module), None = full


class CalibBackend:
    """Attention for equal-length sequences with no cache: q, k, v of the chunk, causal SDPA."""

    name = "calib"

    def forward(self, q, k, v, k_cache, v_cache, meta: CalibMeta, scale: float) -> torch.Tensor:
        b, n = meta.num_seqs, meta.seq_len  # q: [b * n, H, D]; k, v: [b * n, KH, D]
        qh, kh, vh = (t.view(b, n, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))
        gqa = qh.shape[1] != kh.shape[1]
        if meta.window is None or meta.window >= n:
            o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=gqa)
        else:
            pos = torch.arange(n, device=q.device)
            mask = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - meta.window)
            o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=gqa)
        return o.transpose(1, 2).reshape(q.shape)


class LayerwiseRunner:
    """The calibration set's hidden states, advanced through the decoder one layer at a time."""

    def __init__(self, model: nn.Module, tokens: torch.Tensor, batch_size: int):
        self.model = model
        self.device = next(model.parameters()).device
        self.num_seqs, self.seq_len = tokens.shape
        self.batch_size = batch_size
        self.backend = CalibBackend()
        with torch.no_grad():
            self.hidden = model.model.embed_tokens(tokens.to(self.device).view(-1))  # [S * L, hidden]
        self.residual: torch.Tensor | None = None

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.model.layers

    def chunks(self) -> Iterator[tuple[slice, CalibMeta, torch.Tensor]]:
        for s0 in range(0, self.num_seqs, self.batch_size):
            b = min(self.batch_size, self.num_seqs - s0)
            rows = slice(s0 * self.seq_len, (s0 + b) * self.seq_len)
            positions = torch.arange(self.seq_len, device=self.device).repeat(b)
            yield rows, CalibMeta(b, self.seq_len), positions

    @torch.no_grad()
    def run(self, layer: nn.Module, hooks: dict[nn.Module, object], advance: bool) -> None:
        """Run `layer` over every chunk; hooks: module -> object with observe(*inputs). `advance` makes the
        outputs the next layer's inputs; without it, each chunk's forward stops once every hooked module has
        seen its input (GPTQ's per-group runs need only the layer up to that group)."""
        seen: set[nn.Module] = set()

        def observe(m, args, obs):
            obs.observe(*args)
            seen.add(m)
            if not advance and len(seen) == len(hooks):
                raise _AllObserved

        handles = [m.register_forward_pre_hook(partial(observe, obs=obs)) for m, obs in hooks.items()]
        new_h = torch.empty_like(self.hidden) if advance else None
        new_r = torch.empty_like(self.hidden) if advance else None
        try:
            for rows, meta, positions in self.chunks():
                seen.clear()
                res = None if self.residual is None else self.residual[rows]
                try:
                    with forward_context(meta, self.backend):
                        h, r = layer(positions, self.hidden[rows], res)
                except _AllObserved:
                    continue
                if advance:
                    new_h[rows], new_r[rows] = h, r
        finally:
            for h in handles:
                h.remove()
        if advance:
            self.hidden, self.residual = new_h, new_r


class _AllObserved(Exception):
    """Raised from a hook to end a non-advancing forward early."""


@torch.no_grad()
def model_logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """[B, L] token ids -> [B, L, vocab] float32 logits, a plain no-cache forward (perplexity, tests)."""
    b, n = tokens.shape
    device = next(model.parameters()).device
    positions = torch.arange(n, device=device).repeat(b)
    with forward_context(CalibMeta(b, n), CalibBackend()):
        hidden = model(tokens.to(device).reshape(-1), positions)
    return model.compute_logits(hidden).view(b, n, -1)
