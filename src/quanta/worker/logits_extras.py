"""Rare per-request logits outputs: logprob dicts, prompt logprobs, context logits (kept off the hot path)."""

from __future__ import annotations

import torch

from quanta.outputs import Logprob


def topk_to_dicts(rows, token_ids, sampled_lps, topk_ids, topk_lps, ranks) -> list[dict | None]:
    """One {token_id: Logprob} per row that asked for logprobs: its top-K plus the sampled token."""
    out: list[dict | None] = []
    ids_l, lps_l, ranks_l = topk_ids.tolist(), topk_lps.tolist(), ranks.tolist()
    for r, row in enumerate(rows):
        k = row.params.logprobs_k
        if k is None:
            out.append(None)
            continue
        d = {tid: Logprob(lp, rank + 1) for rank, (tid, lp) in enumerate(zip(ids_l[r][:k], lps_l[r][:k]))}
        if token_ids[r] not in d:
            d[token_ids[r]] = Logprob(sampled_lps[r], int(ranks_l[r]))
        # sampled token first, as TensorRT-LLM and vLLM list it
        out.append({token_ids[r]: d.pop(token_ids[r]), **d})
    return out


def prompt_logits_outputs(req, seq, start: int, logits: torch.Tensor):
    """logits: [n, vocab] for prompt positions start..start+n-1 (position p predicts token p+1)."""
    params = req.params
    ctx = logits if params.return_context_logits else None
    if params.prompt_logprobs is None:
        return None, ctx
    k = int(params.prompt_logprobs)
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    entries: list[dict | None] = [None] if start == 0 else []  # the first prompt token has no logprob
    prompt = req.prompt_token_ids
    for j in range(logits.shape[0]):
        target_pos = start + j + 1
        if target_pos >= len(prompt):
            break
        row = logprobs[j]
        tid = prompt[target_pos]
        lp = float(row[tid])
        rank = int((row > lp).sum()) + 1
        d = {tid: Logprob(lp, rank)}
        if k > 0:
            vals, ids = row.topk(k)
            for r, (t, v) in enumerate(zip(ids.tolist(), vals.tolist())):
                d.setdefault(t, Logprob(v, r + 1))
        entries.append(d)
    return entries, ctx
