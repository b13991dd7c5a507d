"""The fused decode-path kernels vs their twins through Triton's interpreter (CPU), and on a GPU when present:
greedy sampling (argmax + log-probability in two kernels) and rotary embedding fused into the KV-cache write.

TRITON_INTERPRET must be set before triton is imported, so the CPU checks run in a child process."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


def greedy_check(device: str, dtype: torch.dtype, rows: int, vocab: int) -> bool:
    from quanta.kernels.greedy import greedy_sample_fused
    from quanta.sampling.sampler import greedy_sample

    g = torch.Generator().manual_seed(rows * vocab)
    logits = (torch.randn(rows, vocab, generator=g) * 4).to(dtype)
    if rows > 1:  # a tie across chunks: the first index must win, as in torch.argmax
        logits[1, 5] = logits[1, vocab - 3] = logits[1].max() + 1
    logits = logits.to(device)
    ids, lps = greedy_sample_fused(logits)
    ref_ids, ref_lps = greedy_sample(logits.float())
    return bool(torch.equal(ids, ref_ids) and torch.allclose(lps, ref_lps, atol=1e-4, rtol=1e-4))


def handoff_check(device: str, rows: int, vocab: int) -> bool:
    """The CUDA-graph token hand-over (kernels/greedy.py): three calls count 1, 2, 3 and fill slots 1, 0, 1 with
    the ids, the logprobs and the count; the ids also land in feed; the returned ids / logprobs are unchanged."""
    from quanta.kernels.greedy import greedy_sample_fused
    from quanta.sampling.sampler import greedy_sample

    pin = device == "cuda"
    count = torch.zeros(1, dtype=torch.int64, device=device)
    host_ids = torch.full((2, rows + 3), -7, dtype=torch.int64, pin_memory=pin)
    host_lps = torch.zeros(2, rows + 2, dtype=torch.float32, pin_memory=pin)
    feed = torch.full((rows + 1,), -5, dtype=torch.int64, device=device)
    ok = True
    for k in (1, 2, 3):
        g = torch.Generator().manual_seed(k)
        logits = (torch.randn(rows, vocab, generator=g) * 4).to(device)
        ids, lps = greedy_sample_fused(logits, (count, host_ids, host_lps, feed))
        if device == "cuda":
            torch.cuda.synchronize()
        ref_ids, ref_lps = greedy_sample(logits.float())
        slot = k % 2
        ok &= bool(torch.equal(ids, ref_ids) and torch.allclose(lps, ref_lps, atol=1e-4, rtol=1e-4))
        ok &= int(count[0]) == k and int(host_ids[slot, 0]) == k and int(host_ids[slot, rows + 1]) == -7
        ok &= bool(torch.equal(host_ids[slot, 1 : rows + 1], ref_ids.cpu()))
        ok &= bool(torch.allclose(host_lps[slot, :rows], ref_lps.cpu(), atol=1e-4, rtol=1e-4))
        ok &= bool(torch.equal(feed[:rows], ref_ids)) and int(feed[rows]) == -5
    try:
        greedy_sample_fused(logits, (count, host_ids[:, :rows], host_lps, feed))
        ok = False
    except ValueError as e:  # no room for the count
        ok &= "handoff" in str(e)
    return ok


def rope_cache_check(device: str, dtype: torch.dtype) -> float:
    from quanta.kernels.kv_cache_write import kv_cache_write_ref
    from quanta.kernels.rotary import apply_rotary_emb_ref, rotary_kv_cache_write
    from quanta.layers.rotary import RotaryEmbedding

    t, h, kh, d, bs, blocks = 7, 4, 2, 16, 4, 6
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(t, (h + 2 * kh) * d, generator=g).to(dtype).to(device)
    rot = RotaryEmbedding(d, 64, 10000.0, {"rope_type": "default"}).to(device)
    positions = torch.tensor([0, 3, 9, 17, 30, 31, 5], device=device)
    slots = torch.tensor([0, 5, 9, -1, 13, 22, 2], device=device)
    caches = [torch.zeros(blocks, bs, kh, d, dtype=dtype, device=device) for _ in range(4)]

    def split(x):
        q, k, v = x.split([h * d, kh * d, kh * d], dim=-1)
        return q.view(t, h, d), k.view(t, kh, d), v.view(t, kh, d)

    q, k, v = split(qkv.clone())
    rotary_kv_cache_write(q, k, v, caches[0], caches[1], slots, positions, rot.cos_cache, rot.sin_cache)
    rq, rk, rv = split(qkv.clone())
    rq, rk = apply_rotary_emb_ref(rq, rk, positions, rot.cos_cache, rot.sin_cache)
    kv_cache_write_ref(rk, rv, caches[2], caches[3], slots)
    errs = [(a.float() - b.float()).abs().max().item() for a, b in ((q, rq), (caches[0], caches[2]), (caches[1], caches[3]))]
    return max(errs)


def child_main() -> None:
    res = {
        "greedy_1x5000_fp32": greedy_check("cpu", torch.float32, 1, 5000),
        "greedy_3x9000_fp32_tie": greedy_check("cpu", torch.float32, 3, 9000),
        "greedy_2x4096_fp16": greedy_check("cpu", torch.float16, 2, 4096),
        "greedy_handoff_3x5000": handoff_check("cpu", 3, 5000),
        "rope_cache_fp32": rope_cache_check("cpu", torch.float32) < 1e-5,
    }
    print(json.dumps(res))


@pytest.fixture(scope="module")
def interpreted() -> dict:
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install -e '.[dev]')")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(HERE.parent / "src"), str(HERE)]))
    code = "import test_fused_ops_interpret as t; t.child_main()"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=HERE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", ["greedy_1x5000_fp32", "greedy_3x9000_fp32_tie", "greedy_2x4096_fp16",
                                  "greedy_handoff_3x5000", "rope_cache_fp32"])
def test_fused_ops_interpreted(interpreted, name):
    assert interpreted[name] is True


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("rows,vocab", [(1, 128256), (3, 32000), (64, 151936), (512, 128256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_fused_gpu(rows, vocab, dtype):
    assert greedy_check("cuda", dtype, rows, vocab)


@cuda
@pytest.mark.parametrize("rows,vocab", [(1, 128256), (16, 32000)])
def test_greedy_handoff_gpu(rows, vocab):
    assert handoff_check("cuda", rows, vocab)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_cache_gpu(dtype):
    assert rope_cache_check("cuda", dtype) < (1e-5 if dtype == torch.float32 else 1e-2)
