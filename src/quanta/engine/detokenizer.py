"""Incremental detokenization with stop strings.

`text` always equals `tokenizer.decode(output_ids)` up to the point emitted so far: each step decodes a
short window (the previous token(s) + new ones) and keeps the difference, holding back text that ends in
an incomplete UTF-8 sequence. When stop strings are set, the last `max_stop_len - 1` characters are held
back from streaming, so deltas never have to be taken back.
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, params):
        self.tokenizer = tokenizer
        self.skip_special = params.skip_special_tokens
        self.spaces_between = params.spaces_between_special_tokens
        self.enabled = params.detokenize and tokenizer is not None
        self.stop = list(params.stop or [])
        self.include_stop = params.include_stop_str_in_output
        self.holdback = max((len(s) for s in self.stop), default=1) - 1 if not self.include_stop else 0
        self.text = ""
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self.stopped_on: str | None = None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(
            ids,
            skip_special_tokens=self.skip_special,
            spaces_between_special_tokens=self.spaces_between,
        )

    def add_tokens(self, new_ids: list[int]) -> str | None:
        """Feed new token ids; returns the matched stop string if one appeared (text is then cut)."""
        if not self.enabled or self.stopped_on is not None:
            self._ids.extend(new_ids)
            return None
        start = len(self.text)
        for tid in new_ids:
            self._ids.append(tid)
            prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
            full = self._decode(self._ids[self._prefix_offset :])
            if len(full) > len(prefix) and not full.endswith("\ufffd"):
                self.text += full[len(prefix) :]
                self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return self._check_stop(start) if self.stop else None

    def _check_stop(self, start: int) -> str | None:
        # only the new text (plus an overlap for stops spanning the boundary) can hold a new match
        search_from = max(0, start - max(len(s) for s in self.stop) + 1)
        best: tuple[int, str] | None = None
        for s in self.stop:
            idx = self.text.find(s, search_from)
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, s)
        if best is None:
            return None
        idx, s = best
        self.text = self.text[: idx + len(s)] if self.include_stop else self.text[:idx]
        self.stopped_on = s
        return s

    def visible_text(self, finished: bool) -> str:
        if finished or self.holdback == 0:
            return self.text
        return self.text[: max(0, len(self.text) - self.holdback)]
