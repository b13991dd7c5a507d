"""kernels/gemv.py gemv_residual_norm (QUANTA_GEMV_ADD_NORM: the skinny GEMV ends with h = y + residual and its last
program writes RMSNorm(h)) against its twin (GEMV, then fused_add_rms_norm) on the GPU, under PDL as the engine runs
it, and the engine's next-token distributions with it on and off."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def _close(got, want, rel=1e-2):
    err = (got.float() - want.float()).norm() / want.float().norm()
    assert err <= rel, (err, got, want)


@pytest.mark.parametrize("n,k,bias,dtype", [(2048, 2048, False, torch.bfloat16), (4096, 4096, False, torch.bfloat16),
                                            (3000, 1024, True, torch.float16), (2048, 8192, False, torch.bfloat16)])
def test_residual_norm_equals_ref(n, k, bias, dtype):
    from quanta.kernels.gemv import gemv_residual_norm, gemv_residual_norm_ref

    g = torch.Generator().manual_seed(n + k)
    x = torch.randn(1, k, generator=g).to(dtype).cuda()
    w = (torch.randn(n, k, generator=g) * 0.02).to(dtype).cuda()
    r = torch.randn(1, n, generator=g).to(dtype).cuda()
    nw = (1 + 0.1 * torch.randn(n, generator=g)).to(dtype).cuda()
    b = torch.randn(n, generator=g).to(dtype).cuda() if bias else None
    want_xw, want_h = gemv_residual_norm_ref(x, w, r, nw, 1e-5, b)
    for _ in range(3):  # the counter is back at 0 after each launch
        xw, h = gemv_residual_norm(x, w, r, nw, 1e-5, b)
        torch.cuda.synchronize()
        _close(h, want_h, 2e-3)
        _close(xw, want_xw)


def test_engine_add_norm_same_distributions(tmp_path, monkeypatch):
    """A bf16 engine at batch 1 (CUDA graphs, PDL) with o_proj's GEMV doing the add + norm gives the same next-token
    distributions as with the norm launch (top-8 logprobs while the greedy tokens agree)."""
    from dist_compare import compare_steps, count_inits, tiny_llama

    from quanta.layers import fast_ops
    from quanta.llmapi import LLM, SamplingParams

    path = tiny_llama(tmp_path)
    params = SamplingParams(max_tokens=12, ignore_eos=True, logprobs=8)
    monkeypatch.setattr(fast_ops, "FUSED_NORM_MAX_BYTES", 0)  # gate_up after an unfused norm, as the 1B's
    monkeypatch.setattr(fast_ops, "GEMV_LINEAR_MAX_BYTES", 48 << 20)  # o_proj on the skinny GEMV with PDL or not
    calls = count_inits(monkeypatch, fast_ops.Normed)
    runs = []
    for on in (True, False):
        monkeypatch.setattr(fast_ops, "GEMV_ADD_NORM", on)
        with LLM(path, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16") as llm:
            runs.append(llm.generate([1, 17, 42, 99, 7], params).outputs[0])
        if on:
            assert calls, "the GEMV's add + norm never ran"
    steps, worst = compare_steps(*runs)
    assert steps >= 5 and worst < 0.05, (steps, worst)
