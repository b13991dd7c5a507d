"""Beam search, data plane: the top continuations of every beam row, computed on the device in one pass.

A beam row does not sample a token: it hands the control plane (engine/beam_search.py) its best
`num_candidates` next tokens with their log-probabilities, and the control plane picks the k best
continuations over all beams of the request. Only [rows, C] tensors (C = max(2, 1 + #stop ids) * k)
cross to the host, never [rows, vocab].

Logits are processed as the sampler processes them (logits processors, embedding bias, bans incl.
min_tokens, penalties, then temperature), then log-softmaxed: beam scores add these 'processed'
log-probabilities, as TensorRT-LLM and Hugging Face do. top_k / top_p / min_p play no part in beam search.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quanta.outputs import Logprob
from quanta.sampling.batch import build_batch
from quanta.sampling.sampler import Sampler
from quanta.sampling.types import SamplingRow


@dataclass
class BeamRowOutput:
    """One beam row's candidates, on the host (what RunnerOutput.beam_rows carries per beam)."""

    seq: object  # the engine Sequence (a live beam)
    token_ids: list[int]  # [C] candidate ids, best first
    logprobs: list[float]  # [C] their processed log-probabilities (what beam scores add)
    logprob_dicts: list[dict] | None = None  # [C] per candidate: {id: Logprob} as `logprobs=K` asks
    generation_logits: torch.Tensor | None = None  # [vocab] cpu, when return_generation_logits


class PendingBeamRows:
    """Device results of `beam_candidates`, copied to the host without blocking; `rows()` waits for them.

    The copy is issued inside the runner's step and read by the engine after the step, so it costs no
    extra synchronization when the step syncs anyway (sampled rows); otherwise `rows()` is the step's sync.
    """

    def __init__(self, seqs: list, rows: list[SamplingRow], tensors: dict[str, torch.Tensor | None]):
        self.seqs = seqs
        self.params = [r.params for r in rows]
        self.event = None
        cuda = next(iter(t for t in tensors.values() if t is not None)).device.type == "cuda"
        self.host = {k: None if t is None else t.to("cpu", non_blocking=cuda) for k, t in tensors.items()}
        if cuda:
            self.event = torch.cuda.Event()
            self.event.record()

    def rows(self) -> list[BeamRowOutput]:
        if self.event is not None:
            self.event.synchronize()
        h = self.host
        ids, lps = h["ids"].tolist(), h["logprobs"].tolist()
        dicts = _logprob_dicts(self.params, ids, h) if h["src_logprobs"] is not None else None
        gen = h["generation_logits"]
        out = []
        for i, seq in enumerate(self.seqs):
            want_gen = gen is not None and self.params[i].return_generation_logits
            out.append(BeamRowOutput(seq, ids[i], lps[i], None if dicts is None else dicts[i],
                                     gen[i] if want_gen else None))
        return out


def _logprob_dicts(params, ids: list[list[int]], h: dict) -> list[list[dict] | None]:
    """Per row, per candidate: {candidate: Logprob(lp, rank)} first, then the row's top K (K = logprobs)."""
    src, ranks = h["src_logprobs"].tolist(), h["ranks"].tolist()
    top_ids, top_lps = h["topk_ids"].tolist(), h["topk_logprobs"].tolist()
    out: list[list[dict] | None] = []
    for r, p in enumerate(params):
        if p.logprobs is None:
            out.append(None)
            continue
        k = p.logprobs
        top = {t: Logprob(lp, j + 1) for j, (t, lp) in enumerate(zip(top_ids[r][:k], top_lps[r][:k]))}
        row = []
        for c, tok in enumerate(ids[r]):
            d = {tok: top[tok] if tok in top else Logprob(src[r][c], int(ranks[r][c]))}
            d.update((t, v) for t, v in top.items() if t != tok)
            row.append(d)
        out.append(row)
    return out


@torch.inference_mode()
def beam_candidates(logits: torch.Tensor, seqs: list, rows: list[SamplingRow], num_candidates: int) -> PendingBeamRows:
    """logits: [R, vocab] of the beam rows -> their top `num_candidates` processed log-probs (async to host)."""
    vocab = logits.shape[1]
    batch = build_batch(rows, vocab, logits.device)
    raw = logits.float()
    x = raw
    if batch.needs_logit_edits:
        x = raw.clone()  # raw stays as given for 'raw' logprobs
        Sampler._edit_logits(x, rows, batch)
    if batch.has_temperature:
        x = x / batch.temperature.unsqueeze(1)
    processed = torch.log_softmax(x, dim=-1)  # [R, vocab]
    lps, ids = processed.topk(min(num_candidates, vocab), dim=-1)  # [R, C], best first
    tensors: dict[str, torch.Tensor | None] = dict(ids=ids, logprobs=lps, src_logprobs=None, ranks=None,
                                                   topk_ids=None, topk_logprobs=None, generation_logits=None)
    if batch.logprobs_k is not None:  # per-token logprobs asked (rare): the source's values and ranks
        source = processed
        if not batch.all_processed:
            raw_lp = torch.log_softmax(raw, dim=-1)
            source = torch.where(batch.processed.unsqueeze(1), processed, raw_lp) if batch.any_processed else raw_lp
        src = source.gather(1, ids)  # [R, C]
        ascending = source.sort(dim=-1).values  # [R, vocab]
        # rank = 1 + #tokens strictly more likely
        tensors["ranks"] = vocab - torch.searchsorted(ascending, src.contiguous(), right=True) + 1
        tensors["src_logprobs"] = src
        k = max(batch.logprobs_k, 1)
        tensors["topk_logprobs"], tensors["topk_ids"] = source.topk(min(k, vocab), dim=-1)
    if any(r.params.return_generation_logits for r in rows):
        tensors["generation_logits"] = raw
    return PendingBeamRows(seqs, rows, tensors)
