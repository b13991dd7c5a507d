"""Sampler: logprobs (raw / processed, ranks, zero) and no host or device syncs; CPU, small vocab (helpers from
tests/test_sampler.py)."""

from __future__ import annotations

import pytest
import torch

from quanta.sampling.sampler import Sampler, make_generator
from quanta.sampling_params import SamplingParams
from tests.test_sampler import LOGITS, VOCAB, batch_logits, make_row

# ---- logprobs ----


def test_logprobs_raw_vs_processed_with_ranks():
    bias = torch.zeros(VOCAB)
    bias[4] = 5.0  # token 4 is the 6th most likely raw token, the most likely processed one
    raw_lp = LOGITS.log_softmax(0)
    raw = Sampler()(LOGITS.unsqueeze(0), [make_row(SamplingParams(embedding_bias=bias, logprobs=3))])
    assert int(raw.token_ids[0]) == 4
    assert int(raw.sampled_ranks[0]) == 6
    assert raw.sampled_logprobs[0] == pytest.approx(float(raw_lp[4]), abs=1e-5)
    assert raw.topk_ids[0].tolist() == [0, 1, 2]
    assert torch.allclose(raw.topk_logprobs[0], raw_lp[[0, 1, 2]])

    params = SamplingParams(embedding_bias=bias, logprobs=3, logprobs_mode="processed")
    proc = Sampler()(LOGITS.unsqueeze(0), [make_row(params)])
    proc_lp = (LOGITS + bias).log_softmax(0)
    assert int(proc.sampled_ranks[0]) == 1
    assert proc.sampled_logprobs[0] == pytest.approx(float(proc_lp[4]), abs=1e-5)
    assert proc.topk_ids[0].tolist() == [4, 0, 1]


def test_processed_logprobs_include_temperature_and_rows_mix():
    torch.manual_seed(0)
    raw_row = make_row(SamplingParams(temperature=0.5, logprobs=2))
    proc_row = make_row(SamplingParams(temperature=0.5, logprobs=4, logprobs_mode="processed"))
    out = Sampler()(batch_logits(2), [raw_row, proc_row])
    assert out.topk_ids.shape == (2, 4)  # K = max asked
    assert torch.allclose(out.topk_logprobs[0], LOGITS.log_softmax(0).topk(4).values)
    assert torch.allclose(out.topk_logprobs[1], (LOGITS / 0.5).log_softmax(0).topk(4).values)
    for i, source in enumerate([LOGITS, LOGITS / 0.5]):
        token = int(out.token_ids[i])
        assert out.sampled_logprobs[i] == pytest.approx(float(source.log_softmax(0)[token]), abs=1e-5)
        assert int(out.sampled_ranks[i]) == int((source > source[token]).sum()) + 1


def test_logprobs_zero_returns_sampled_and_rank_only():
    out = Sampler()(LOGITS.unsqueeze(0), [make_row(SamplingParams(logprobs=0))])
    assert out.topk_ids.shape == (1, 0) and out.topk_logprobs.shape == (1, 0)
    assert int(out.sampled_ranks[0]) == 1


def test_raw_logprobs_ignore_processors():
    def push_three(req_id, logits, token_ids, stream_ptr, client_id):
        logits[..., 3] += 50.0

    params = SamplingParams(logits_processor=push_three, logprobs=1)
    out = Sampler()(LOGITS.unsqueeze(0), [make_row(params)])
    assert int(out.token_ids[0]) == 3
    assert out.sampled_logprobs[0] == pytest.approx(float(LOGITS.log_softmax(0)[3]), abs=1e-5)
    assert out.topk_ids[0].tolist() == [0]


# ---- no host sync ----


def _busy_params(**more) -> SamplingParams:
    """Many processing knobs at once (the sync tests: every path of the sampler runs)."""
    return SamplingParams(temperature=0.8, top_k=3, top_p=0.9, min_p=0.05, logprobs=2, repetition_penalty=1.3,
                          no_repeat_ngram_size=2, seed=3, **more)


def test_no_host_sync_calls(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("host sync inside the sampler")

    params = [
        _busy_params(
            presence_penalty=0.2,
            frequency_penalty=0.1,
            prompt_ignore_length=1,
            min_tokens=4,
            bad_token_ids=[6],
            embedding_bias=torch.ones(VOCAB),
            top_p_decay=0.9,
            logprobs_mode="processed",
        ),
        SamplingParams(),
        SamplingParams(top_k=2),
    ]
    rows = [
        make_row(p, prompt=[1, 2, 1], output=[2], bad_words_ids=[[2, 3]], generator=make_generator(p.seed, "cpu"))
        for p in params
    ]
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    out = Sampler()(batch_logits(3), rows)
    monkeypatch.undo()
    assert out.token_ids.shape == (3,)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_device_sync_on_cuda():
    params = _busy_params()
    rows = [make_row(params, prompt=[1, 2, 1], output=[2], generator=make_generator(3, "cuda"))]
    logits = batch_logits(1).cuda()
    Sampler()(logits, rows)  # warm-up (lazy init may sync)
    torch.cuda.set_sync_debug_mode("error")
    try:
        Sampler()(logits, rows)
    finally:
        torch.cuda.set_sync_debug_mode("default")
