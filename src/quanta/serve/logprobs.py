"""Token logprobs in the OpenAI shapes: /v1/completions' parallel lists (tokens, token_logprobs,
top_logprobs, text_offset) and /v1/chat/completions' per-token entries with bytes."""

from __future__ import annotations

import math

_LOGPROB_FLOOR = -9999.0


def _finite_logprob(v: float) -> float:
    if v != v:  # NaN
        return _LOGPROB_FLOOR
    return max(float(v), _LOGPROB_FLOOR) if not math.isinf(v) or v < 0 else 0.0


def _rank(item) -> int:
    rank = item[1].rank
    return rank if rank is not None else 1 << 30


def _utf8(s: str) -> list[int]:
    return list(s.encode("utf-8", "surrogatepass"))


class LogprobFormatter:
    """Logprob dicts -> OpenAI JSON, with a cache of each token's text as it reads inside a sequence."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._pieces: dict[int, str] = {}
        self._anchor: list[int] | None = None

    def piece(self, tid: int) -> str:
        """A token's text as it reads inside a sequence (with its leading space)."""
        s = self._pieces.get(tid)
        if s is not None:
            return s
        tok = self.tokenizer
        try:
            if self._anchor is None:
                self._anchor = list(tok.encode("a", add_special_tokens=False))[-1:] or []
            if self._anchor:
                base = tok.decode(self._anchor)
                full = tok.decode(self._anchor + [tid])
                s = full[len(base):] if full.startswith(base) else tok.decode([tid])
            else:
                s = tok.decode([tid])
        except Exception:
            s = ""
        if len(self._pieces) < 1_000_000:
            self._pieces[tid] = s
        return s

    def completion(self, token_ids: list[int], logprobs: list[dict], offset: int,
                   prompt_ids: list[int] | None = None, prompt_logprobs: list | None = None) -> dict:
        tokens, token_lps, tops, offsets = [], [], [], []
        if prompt_ids is not None:
            plps = prompt_logprobs or []
            for i, tid in enumerate(prompt_ids):
                s = self.piece(tid)
                d = plps[i] if i < len(plps) else None
                tokens.append(s)
                offsets.append(offset)
                offset += len(s)
                lp = d.get(tid) if d else None
                token_lps.append(None if lp is None else _finite_logprob(lp.logprob))
                tops.append(None if not d else {self.piece(t): _finite_logprob(v.logprob)
                                                for t, v in sorted(d.items(), key=_rank)})
        for tid, d in zip(token_ids, logprobs):
            s = self.piece(tid)
            tokens.append(s)
            offsets.append(offset)
            offset += len(s)
            lp = d.get(tid) if d else None
            token_lps.append(None if lp is None else _finite_logprob(lp.logprob))
            tops.append({self.piece(t): _finite_logprob(v.logprob) for t, v in sorted(d.items(), key=_rank)}
                        if d else None)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    def chat(self, token_ids: list[int], logprobs: list[dict], k: int) -> list[dict]:
        out = []
        for tid, d in zip(token_ids, logprobs):
            s = self.piece(tid)
            lp = d.get(tid) if d else None
            top = []
            for t, v in sorted(d.items(), key=_rank) if d else ():
                if len(top) >= k or (v.rank is not None and v.rank > k):
                    break
                ts = self.piece(t)
                top.append({"token": ts, "logprob": _finite_logprob(v.logprob), "bytes": _utf8(ts)})
            out.append({"token": s, "logprob": _LOGPROB_FLOOR if lp is None else _finite_logprob(lp.logprob),
                        "bytes": _utf8(s), "top_logprobs": top})
        return out
