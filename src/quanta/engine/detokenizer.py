"""Incremental detokenization with stop strings.

`text` always equals `tokenizer.decode(output_ids)` up to the point emitted so far: each step decodes a
short window (the previous token(s) + new ones) and keeps the difference, holding back text that ends in
an incomplete UTF-8 sequence. When stop strings are set, the last `max_stop_len - 1` characters are held
back from streaming, so deltas never have to be taken back.

Stop strings are matched on the decoded text, so a request with stop strings is decoded even when
`detokenize=False` (its visible text is then ''). With `exclude_input_from_output=False` the prompt is
decoded first (`prime`), as TensorRT-LLM's output then holds prompt + generated tokens; stop strings are
only searched in the generated part.
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, params):
        self.tokenizer = tokenizer
        self.skip_special = params.skip_special_tokens
        self.spaces_between = params.spaces_between_special_tokens
        self.stop = list(params.stop or [])
        self.show_text = params.detokenize and tokenizer is not None
        self.enabled = tokenizer is not None and (params.detokenize or bool(self.stop))
        self.include_stop = params.include_stop_str_in_output
        self.holdback = max((len(s) for s in self.stop), default=1) - 1 if not self.include_stop else 0
        self.text = ""
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._stop_search_start = 0  # stop strings are never searched before this (the primed prompt)
        self.stopped_on: str | None = None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(
            ids,
            skip_special_tokens=self.skip_special,
            spaces_between_special_tokens=self.spaces_between,
        )

    def prime(self, prompt_ids: list[int]) -> None:
        """Start the text with the prompt (exclude_input_from_output=False); call before add_tokens."""
        self._ids = list(prompt_ids)
        if not self.enabled:
            return
        self.text = self._decode(self._ids)
        # the next window starts a few tokens back, so spacing and multi-byte characters join up
        self._read_offset = len(self._ids)
        self._prefix_offset = max(0, self._read_offset - 5)
        self._stop_search_start = len(self.text)

    def add_tokens(self, new_ids: list[int], check_stop: bool = True) -> str | None:
        """Feed new token ids; returns the matched stop string if one appeared (text is then cut).

        `check_stop=False` (under min_tokens) skips the stop-string search for these tokens.
        """
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
        if not check_stop:
            # text seen under min_tokens can no longer stop the request
            self._stop_search_start = len(self.text)
            return None
        return self._check_stop(start) if self.stop else None

    def _check_stop(self, start: int) -> str | None:
        # only the new text (plus an overlap for stops spanning the boundary) can hold a new match
        search_from = max(self._stop_search_start, start - max(len(s) for s in self.stop) + 1)
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
        if not self.show_text:
            return ""
        if finished or self.holdback == 0:
            return self.text
        return self.text[: max(0, len(self.text) - self.holdback)]
