"""An error in one request's detokenization / stop handling fails that request only."""

from __future__ import annotations

import pytest

from quanta import SamplingParams
from quanta.engine.detokenizer import IncrementalDetokenizer
from quanta.llmapi import RequestError


@pytest.mark.timeout(120)
def test_stop_handling_error_fails_only_its_request(stories_llm, monkeypatch):
    original = IncrementalDetokenizer.add_tokens

    def flaky(self, new_ids, **kw):
        if self.stop == ["BOOM"]:
            raise RuntimeError("stop handling exploded")
        return original(self, new_ids, **kw)

    monkeypatch.setattr(IncrementalDetokenizer, "add_tokens", flaky)
    bad = stories_llm.generate_async("Once upon a time", SamplingParams(max_tokens=8, stop=["BOOM"]))
    good = [stories_llm.generate_async("Once upon a time", SamplingParams(max_tokens=8)) for _ in range(3)]
    with pytest.raises(RequestError, match="stop handling exploded"):
        bad.result(timeout=60)
    for g in good:
        out = g.result(timeout=60)
        assert out.outputs[0].text.startswith(", there was")
    monkeypatch.undo()
    again = stories_llm.generate("Once upon a time", SamplingParams(max_tokens=8))
    assert again.outputs[0].finish_reason == "length"
