"""API.md's seed snippets, run as written with `tensorrt_llm` swapped for `quanta`.

The quantization snippet needs calibration data: offline, its default Hub dataset gives a clear error naming
a local file; with one it quantizes at load (more in test_quantization*.py).
"""

from __future__ import annotations

import asyncio
import re

import pytest

from quanta.llmapi import (  # the seed's import line, plus the rest of API.md's import paths
    LLM,
    BuildConfig,
    CalibConfig,
    CapacitySchedulerPolicy,
    CompletionOutput,
    KvCacheConfig,
    QuantAlgo,
    QuantConfig,
    RequestOutput,
    SamplingParams,
    SchedulerConfig,
)

PROMPT = "Once upon a time"
REPR = re.compile(
    r"RequestOutput\(request_id=\d+, prompt=None, prompt_token_ids=\[32, 12\], "
    r"outputs=\[CompletionOutput\(index=0, text='', token_ids=\[\d+(, \d+)*\], cumulative_logprob=None, "
    r"logprobs=\[\]\)\], finished=True\)"
)


@pytest.fixture(scope="module")
def model_dir(stories_path):
    return str(stories_path)


@pytest.fixture(scope="module")
def reference(stories_llm):
    """Greedy outputs of the default LLM, to compare the customized ones against."""
    sp = SamplingParams(max_tokens=8)
    text = stories_llm.generate(PROMPT, sp, use_tqdm=False).outputs[0]
    ids = stories_llm.generate([32, 12], sp, use_tqdm=False).outputs[0]
    return {"text": text.text, "text_ids": text.token_ids, "ids": ids.token_ids}


def test_imports():
    import quanta
    from quanta import LLM as TopLLM
    from quanta import SamplingParams as TopSamplingParams

    assert TopLLM is LLM and TopSamplingParams is SamplingParams and quanta.__version__
    assert {CalibConfig, CapacitySchedulerPolicy, RequestOutput, CompletionOutput, SchedulerConfig}


# --- features of later issues: a clear "not supported yet" --------------------------------------------


def test_quantization_snippet(model_dir, monkeypatch):
    import sys

    from .conftest import SHARED

    # Offline (no `datasets` package or no Hub) the default calibration set, cnn_dailymail, cannot load: a clear
    # error that names the way out (a local file); with one, the snippet quantizes at load.
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ValueError, match=r"cnn_dailymail.*local text or jsonl file"):
        LLM(model_dir, quant_config=QuantConfig(quant_algo=QuantAlgo.W4A16_AWQ))
    calib = CalibConfig(calib_dataset=str(SHARED / "corpora" / "c4_en_head1000.jsonl"), calib_batches=4,
                        calib_max_seq_length=128)
    llm = LLM(model_dir, quant_config=QuantConfig(quant_algo=QuantAlgo.W4A16_AWQ), calib_config=calib)
    assert llm.generate(PROMPT, SamplingParams(max_tokens=8), use_tqdm=False).outputs[0].text
    llm.shutdown()


def test_beam_search_snippets(model_dir, capsys):
    build_config = BuildConfig()
    build_config.max_beam_width = 4  # a mutable dataclass
    assert build_config.max_beam_width == 4
    llm = LLM(model_dir, build_config=build_config)
    prompt = PROMPT
    states = []
    for output in llm.generate(prompt, sampling_params=SamplingParams(beam_width=4)):  # iterating one result
        print(output)
        states.append(output)
    assert states and states[-1].finished and len(states[-1].outputs) == 1  # n=1: the best beam
    best = states[-1].outputs[0]
    assert best.token_ids and best.text and best.cumulative_logprob < 0 and "RequestOutput(" in capsys.readouterr().out
    # any width up to max_beam_width (TensorRT-LLM wants equality), n beams back, best first
    two = llm.generate(prompt, SamplingParams(use_beam_search=True, n=2, max_tokens=8), use_tqdm=False)
    assert len(two.outputs) == 2 and two.outputs[0].cumulative_logprob is not None
    with pytest.raises(ValueError, match=r"beam_width.*beam width 8 > max_beam_width=4"):
        llm.generate(prompt, SamplingParams(beam_width=8), use_tqdm=False)
    llm.shutdown()
    llm = LLM(model_dir, build_config=BuildConfig(max_num_tokens=4096, max_batch_size=128, max_beam_width=4))
    assert llm.engine_config.max_beam_width == 4
    again = llm.generate(prompt, SamplingParams(beam_width=4), use_tqdm=False)
    assert again.outputs[0].token_ids == best.token_ids
    llm.shutdown()


# --- engine configuration -----------------------------------------------------------------------------


def test_build_config_snippet(model_dir, reference):
    with LLM(model_dir, build_config=BuildConfig(max_num_tokens=4096, max_batch_size=128)) as llm:
        assert llm.engine_config.max_num_tokens == 4096
        assert llm.engine_config.max_batch_size == 128
        out = llm.generate(PROMPT, SamplingParams(max_tokens=8), use_tqdm=False)
        assert out.outputs[0].token_ids == reference["text_ids"]


def test_kv_cache_config_snippet(model_dir, reference):
    with LLM(model_dir, kv_cache_config=KvCacheConfig(free_gpu_memory_fraction=0.8)) as llm:
        assert llm.args.kv_cache_config.free_gpu_memory_fraction == 0.8
        out = llm.generate(PROMPT, SamplingParams(max_tokens=8), use_tqdm=False)
        assert out.outputs[0].token_ids == reference["text_ids"]
    # KvCacheConfig sizes the cache: max_tokens caps it (256 tokens = 8 blocks of 32)
    with LLM(model_dir, kv_cache_config=KvCacheConfig(max_tokens=256), max_batch_size=4) as llm:
        assert llm.engine_config.num_kv_blocks == 8
        assert llm.engine.kv.num_blocks == 8


# --- tokenizer customization --------------------------------------------------------------------------


def test_default_tokenizer_is_autotokenizer_from_the_folder(stories_llm, model_dir):
    from transformers import AutoTokenizer

    tok = stories_llm.tokenizer
    assert tok is not None
    assert tok.encode(PROMPT) == AutoTokenizer.from_pretrained(model_dir).encode(PROMPT)
    out = stories_llm.generate(PROMPT, SamplingParams(max_tokens=4), use_tqdm=False)
    assert out.prompt_token_ids == tok.encode(PROMPT)
    assert out.outputs[0].text == tok.decode(out.outputs[0].token_ids, skip_special_tokens=True)


def test_tokenizer_object(model_dir, reference):
    from transformers import AutoTokenizer

    my_tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with LLM(model_dir, tokenizer=my_tokenizer, max_batch_size=8) as llm:
        assert llm.tokenizer is my_tokenizer
        out = llm.generate(PROMPT, SamplingParams(max_tokens=8), use_tqdm=False)
        assert out.outputs[0].text == reference["text"]

        class Wrapped:  # any object with encode / decode (and eos_token_id) is used as it is
            eos_token_id = my_tokenizer.eos_token_id

            def __init__(self):
                self.calls = 0

            def encode(self, text, **kw):
                self.calls += 1
                return my_tokenizer.encode(text, **kw)

            def decode(self, ids, **kw):
                return my_tokenizer.decode(ids, **kw)

        wrapped = Wrapped()
        llm.tokenizer = wrapped  # the property is settable too
        out = llm.generate(PROMPT, SamplingParams(max_tokens=8), use_tqdm=False)
        assert wrapped.calls == 1 and out.outputs[0].text == reference["text"]


def test_tokenizer_path(model_dir, reference):
    with LLM(model_dir, tokenizer=model_dir, max_batch_size=8) as llm:
        assert llm.tokenizer is not None and not isinstance(llm.tokenizer, str)
        out = llm.generate(PROMPT, SamplingParams(max_tokens=8), use_tqdm=False)
        assert out.outputs[0].text == reference["text"]
    with pytest.raises(ValueError, match="tokenizer"):
        LLM(model_dir, tokenizer="/nonexistent/tokenizer/folder")


def test_token_id_prompt(stories_llm, reference):
    llm = stories_llm
    seen = []
    for output in llm.generate([32, 12]):
        seen.append(output)
    assert len(seen) == 1
    out = seen[0]
    assert isinstance(out, RequestOutput)
    assert out.prompt is None and out.prompt_token_ids == [32, 12]
    assert out.outputs[0].token_ids[:8] == reference["ids"]
    assert out.outputs[0].text  # the LLM has a tokenizer: token prompts are detokenized


def test_skip_tokenizer_init_per_call(stories_llm, reference, capsys):
    llm = stories_llm
    for output in llm.generate([[32, 12]], skip_tokenizer_init=True):
        print(output)
    printed = capsys.readouterr().out.strip()
    assert REPR.fullmatch(printed), printed
    outs = llm.generate([[32, 12]], SamplingParams(max_tokens=8), skip_tokenizer_init=True, use_tqdm=False)
    assert isinstance(outs, list) and len(outs) == 1
    assert outs[0].outputs[0].text == "" and outs[0].outputs[0].token_ids == reference["ids"]


def test_skip_tokenizer_init_at_construction(model_dir, reference):
    with LLM(model_dir, skip_tokenizer_init=True, max_batch_size=8) as llm:
        assert llm.tokenizer is None
        out = llm.generate([32, 12], SamplingParams(max_tokens=8), use_tqdm=False)
        assert out.outputs[0].text == "" and out.outputs[0].token_ids == reference["ids"]
        assert REPR.fullmatch(repr(out)), repr(out)
        with pytest.raises(ValueError, match="tokenizer"):
            llm.generate(PROMPT, use_tqdm=False)
        # the EOS id still comes from the model folder (generation_config.json / config.json)
        out = llm.generate([1, 403, 407], SamplingParams(max_tokens=4, logits_processor=_force_eos), use_tqdm=False)
        assert out.outputs[0].token_ids == [2] and out.outputs[0].finish_reason == "stop"


def _force_eos(req_id, logits, token_ids, stream_ptr, client_id):
    logits[:] = float("-inf")
    logits[..., 2] = 0.0


# --- generate() shapes --------------------------------------------------------------------------------


def test_iterating_one_finished_result_yields_itself_once(stories_llm):
    llm, prompt = stories_llm, PROMPT
    outputs = []
    for output in llm.generate(prompt):
        print(output)
        outputs.append(output)
    assert len(outputs) == 1 and outputs[0].finished
    assert list(outputs[0]) == [outputs[0]]  # and again


def test_repr_format(stories_llm):
    out = stories_llm.generate(PROMPT, SamplingParams(max_tokens=3), use_tqdm=False)
    o = out.outputs[0]
    assert repr(out) == (
        f"RequestOutput(request_id={out.request_id}, prompt={PROMPT!r}, prompt_token_ids={out.prompt_token_ids}, "
        f"outputs=[CompletionOutput(index=0, text={o.text!r}, token_ids={o.token_ids}, cumulative_logprob=None, "
        f"logprobs=[])], finished=True)"
    )


def test_dict_prompts(stories_llm, reference):
    sp = SamplingParams(max_tokens=8)
    by_text = stories_llm.generate({"prompt": PROMPT}, sp, use_tqdm=False)
    assert by_text.prompt == PROMPT and by_text.outputs[0].text == reference["text"]
    by_ids = stories_llm.generate({"prompt_token_ids": [32, 12]}, sp, use_tqdm=False)
    assert by_ids.prompt is None and by_ids.outputs[0].token_ids == reference["ids"]


def test_batches_keep_order_with_one_or_many_sampling_params(stories_llm, reference):
    llm = stories_llm
    texts = [PROMPT, "The dog", "Lily and Ben"]
    singles = [llm.generate(p, SamplingParams(max_tokens=5), use_tqdm=False).outputs[0].token_ids for p in texts]
    outs = llm.generate(texts, SamplingParams(max_tokens=5), use_tqdm=False)
    assert [o.prompt for o in outs] == texts
    assert [o.outputs[0].token_ids for o in outs] == singles
    outs = llm.generate(texts, [SamplingParams(max_tokens=n) for n in (1, 2, 3)], use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [1, 2, 3]
    assert [o.outputs[0].token_ids for o in outs] == [s[:n] for s, n in zip(singles, (1, 2, 3))]
    ids = [[32, 12], [1, 403, 407, 261, 378]]
    outs = llm.generate(ids, SamplingParams(max_tokens=8), use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == ids
    assert outs[0].outputs[0].token_ids == reference["ids"]
    assert outs[1].outputs[0].token_ids == reference["text_ids"]
    outs = llm.generate(ids, [SamplingParams(max_tokens=2), SamplingParams(max_tokens=4)], use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [2, 4]
    mixed = llm.generate([PROMPT, [32, 12], {"prompt": "The dog"}], SamplingParams(max_tokens=2), use_tqdm=False)
    assert [o.prompt for o in mixed] == [PROMPT, None, "The dog"]


def test_use_tqdm(stories_llm, capfd):
    stories_llm.generate(["a", "b"], SamplingParams(max_tokens=2))
    assert "Processed requests" in capfd.readouterr().err
    stories_llm.generate(["a", "b"], SamplingParams(max_tokens=2), use_tqdm=False)
    assert "Processed requests" not in capfd.readouterr().err


def test_generate_async_snippets(stories_llm):
    llm, prompt = stories_llm, PROMPT
    generation = llm.generate_async(prompt)  # not a coroutine: a future-like result at once
    output = generation.result(timeout=10)
    assert output.finished and len(output.outputs[0].token_ids) == 32

    async def main():
        texts = []
        async for output in llm.generate_async(prompt, streaming=True):
            texts.append(output.outputs[0].text)
        output = await llm.generate_async(prompt).aresult()
        return texts, output

    texts, awaited = asyncio.run(main())
    assert len(texts) > 1 and texts[-1] == awaited.outputs[0].text == output.outputs[0].text
