"""worker/input_batch.py: the packed step inputs (QUANTA_PACKED_INPUTS) give the engine the same tokens as one
buffer per input; their layout is what CUDA graphs read; the block table is re-sent only when it changed."""

from __future__ import annotations

import pytest
import torch

from quanta import LLM, SamplingParams
from quanta.worker.input_batch import InputBuffers

from .test_overlap import PROMPTS, STORY_STARTS


def test_packed_views_layout() -> None:
    b = InputBuffers(64, 8, 16, torch.device("cpu"), packed=True)
    n, s, r = 5, 3, 2
    ids, pos, slots, logits, lens, qsl = b.views(n, s, r)
    assert [t.numel() for t in (ids, pos, slots, logits, lens, qsl)] == [n, n, n, r, s, s + 1]
    starts = [t.data_ptr() for t in (ids, pos, slots, logits)]
    assert starts == [b.flat.data_ptr() + 8 * k * n for k in range(4)]  # back to back, n int64 each
    assert lens.data_ptr() == b.flat.data_ptr() + 8 * (3 * n + s)  # int32 after n * 3 + s int64 words: one copy
    assert qsl.data_ptr() == lens.data_ptr() + 4 * s
    top = b.flat.data_ptr() + 8 * b.flat.numel()
    assert b.views(64, 8, 8)[5].data_ptr() + 4 * 9 <= top  # the largest step fits
    # a CUDA graph of batch size bs reads views(bs, bs): the same storage as a padded step of bs sequences
    bs = 4
    graph = b.views(bs, bs)
    step = b.views(bs, bs, 3)
    assert all(g.data_ptr() == t.data_ptr() and g.numel() == t.numel() for g, t in zip(graph[:3] + graph[4:],
                                                                                        step[:3] + step[4:]))
    b.fill_dummy(bs)
    assert graph[2].tolist() == [-1] * bs and graph[4].tolist() == [1] * bs and graph[5].tolist() == list(range(5))
    plain = InputBuffers(64, 8, 16, torch.device("cpu"), packed=False)
    assert plain.views(n, s, r)[0].data_ptr() == plain.input_ids.data_ptr()


def test_stale_tables() -> None:
    b = InputBuffers(64, 8, 16, torch.device("cpu"), packed=True)
    b.fill_dummy(8)
    assert not b.stale_tables(2, 3)  # zeros on both sides
    b.h_tables[1, 2] = 7
    assert b.stale_tables(2, 3) and not b.stale_tables(2, 3)
    assert not b.stale_tables(1, 3)
    b.h_tables[0, 3] = 9  # past max_blocks: not live
    assert not b.stale_tables(2, 3)
    assert b.stale_tables(2, 4)
    b.fill_dummy(8)  # the device table zeroed again (on a CPU the host's too: one tensor)
    b.h_tables[1, 2] = 7
    assert b.stale_tables(2, 3)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("overlap", [True, False])
def test_packed_inputs_same_tokens(monkeypatch, stories_path, overlap) -> None:
    params = [SamplingParams(max_tokens=1 + (i * 7) % 23, ignore_eos=True) for i in range(len(PROMPTS))]
    stops = SamplingParams(max_tokens=40, stop=["."])
    res = {}
    for packed in ("0", "1"):
        monkeypatch.setenv("QUANTA_PACKED_INPUTS", packed)
        with LLM(str(stories_path), disable_overlap_scheduler=not overlap, max_num_tokens=64) as llm:
            assert llm.engine.runner.buffers.packed == (packed == "1")
            outs = llm.generate(PROMPTS, params, use_tqdm=False) + llm.generate(STORY_STARTS, stops, use_tqdm=False)
            res[packed] = [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in outs]
    assert res["0"] == res["1"]


def test_joint_greedy_copy() -> None:
    """The fused greedy kernel's ids and logprobs share one int64 buffer; the host ring copies it once and reads
    both back at their offsets (graph outputs are sliced to the sampling rows)."""
    from quanta.worker.pending import HostRing, joint_base

    r, n = 4, 3
    both = torch.zeros(2 * r, dtype=torch.int64)
    ids, lps = both[:r], both[r:].view(torch.float32)[:r]
    ids.copy_(torch.tensor([5, 7, 11, 13]))
    lps.copy_(torch.tensor([-0.5, -1.25, -2.0, -3.5]))
    base = joint_base(ids[:n], lps[:n])
    assert base.data_ptr() == both.data_ptr() and base.numel() == 2 * r
    assert joint_base(ids.clone(), lps) is None and joint_base(ids, lps.clone()) is None
    ring = HostRing(8, torch.device("cpu"))
    for _ in range(3):  # both buffers of the ring, then the first again
        host_ids, host_lps, event = ring.copy_out(ids[:n], lps[:n])
        assert event is None and host_ids[:n].tolist() == [5, 7, 11] and host_lps[:n].tolist() == [-0.5, -1.25, -2.0]
    host_ids, host_lps, _ = ring.copy_out(torch.tensor([1, 2]), torch.tensor([-1.0, -2.0]))  # two copies
    assert host_ids[:2].tolist() == [1, 2] and host_lps[:2].tolist() == [-1.0, -2.0]
