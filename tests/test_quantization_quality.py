"""Quantization quality on real weights: perplexity on ../shared corpora (8k tokens each, windows of 256) of
stories260K (group size 32: its dims are 64 / 172) and of the embedded quanta-tiny (group sizes 128 and 64),
calibrated on C4 (AWQ, GPTQ: 64 x 256 tokens; the others: 16 x 256). The full table:
benchmarks/quant_quality.py -> benchmarks/RESULTS.md.

Claims (PERFORMANCE.md: fp <= AWQ < RTN; 8-bit and FP8 cost well under 1%):
- AWQ and GPTQ beat round-to-nearest at the same bits, group size and zero-point setting, with zero points
  (asymmetric: the AutoAWQ / AutoGPTQ default) and symmetric. On stories260K on each corpus; on quanta-tiny on
  the geometric mean over both corpora, because its per-corpus differences are a fraction of a percent
  (quanta-tiny has no activation outlier channels, the thing AWQ protects: its per-channel mean |x| spreads
  only ~1.5-2.6x, against 100x in large LLMs), so one corpus alone flips with rounding luck.
  Not claimed: quanta-tiny symmetric at group 128, where round-to-nearest's larger error brings wikitext-2
  perplexity down to the float model's (the model is over-confident on wikitext: its logits / 1.05 score 7%
  better), so AWQ and GPTQ, closer to the float model, do not reliably win there (RESULTS.md's reading).
- W8A16, W8A8 SmoothQuant and FP8 stay within 1% of float on quanta-tiny. On stories260K (260K parameters,
  64-wide layers) FP8's 3-bit mantissa (up to 6% error per weight) does not average out: bound 2% there.
"""

from __future__ import annotations

import math

import pytest
import torch

from quanta.config import CalibConfig, QuantConfig

from .conftest import SHARED

CORPORA = {"wikitext2": SHARED / "corpora" / "wikitext2_test.txt",
           "tinystories": SHARED / "corpora" / "tinystories_valid_head.txt"}
C4 = SHARED / "corpora" / "c4_en_head1000.jsonl"


@pytest.fixture(scope="module")
def table():
    """(model, algo, group size, zero point) -> {corpus: perplexity}, computed on first use."""
    from quanta.assets import ASSETS
    from quanta.quantization.eval import quantized_perplexities

    if not C4.is_file() or not all(f.is_file() for f in CORPORA.values()):
        pytest.skip("../shared corpora absent")
    paths = {"stories260K": SHARED / "models" / "stories260K", "quanta-tiny": ASSETS / "quanta-tiny"}
    cal = {n: CalibConfig(calib_dataset=str(C4), calib_batches=n, calib_max_seq_length=256) for n in (16, 64)}
    cache: dict = {}
    # NOTE: one intra-op thread: these small GEMMs gain little from two, and when the CPU is shared (tests run
    # side by side) OpenMP's spinning threads slow them several-fold.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def get(model: str, algo: str | None, group: int = 128, zp: bool = False) -> dict[str, float]:
        key = (model, algo, group, zp)
        if key not in cache:
            qc = None if algo is None else QuantConfig(quant_algo=algo, group_size=group, has_zero_point=zp)
            searches = algo is not None and ("AWQ" in algo or "GPTQ" in algo)  # as benchmarks/quant_quality.py
            cache[key] = quantized_perplexities(paths[model], qc, cal[64 if searches else 16], CORPORA)[0]
        return cache[key]

    yield get
    torch.set_num_threads(threads)


def _geo(ppl: dict[str, float]) -> float:
    return math.exp(sum(math.log(v) for v in ppl.values()) / len(ppl))


def test_float_baselines(table):
    assert table("stories260K", None)["tinystories"] < 5.0  # shared/README: ~4.25 on TinyStories
    assert table("quanta-tiny", None)["tinystories"] < 10.0


@pytest.mark.parametrize("algo", ["W4A16_AWQ", "W4A16_GPTQ"])
def test_stories260k_awq_gptq_beat_rtn_on_each_corpus(table, algo):
    for zp in (False, True):
        rtn, better = table("stories260K", "W4A16", 32, zp), table("stories260K", algo, 32, zp)
        for corpus in CORPORA:
            assert better[corpus] < rtn[corpus], (zp, corpus, better, rtn)


@pytest.mark.parametrize(("group", "zp"), [(128, True), (64, True), (64, False)])
@pytest.mark.parametrize("algo", ["W4A16_AWQ", "W4A16_GPTQ"])
def test_quanta_tiny_awq_gptq_beat_rtn(table, algo, group, zp):
    rtn, better = table("quanta-tiny", "W4A16", group, zp), table("quanta-tiny", algo, group, zp)
    assert _geo(better) < _geo(rtn), (better, rtn)
    for corpus in CORPORA:  # and never clearly worse on one corpus
        assert better[corpus] < rtn[corpus] * 1.01, (corpus, better, rtn)


@pytest.mark.parametrize("algo", ["W8A16", "W8A16_GPTQ", "W8A8_SQ_PER_CHANNEL", "FP8", "FP8_PER_CHANNEL_PER_TOKEN"])
@pytest.mark.parametrize("model", ["quanta-tiny", "stories260K"])
def test_8bit_and_fp8_within_one_percent_of_float(table, model, algo):
    bound = 1.02 if model == "stories260K" and algo.startswith("FP8") else 1.01
    fp, q = table(model, None), table(model, algo, 32 if model == "stories260K" else 128)
    for corpus in CORPORA:
        assert q[corpus] < fp[corpus] * bound, (corpus, q, fp)
