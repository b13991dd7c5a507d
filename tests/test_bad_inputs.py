"""RELIABILITY.md "Bad inputs tried", Python API part: each bad input raises a clear ValueError naming the
field, and the same LLM (one for the whole module) still generates correctly afterwards.
"""

from __future__ import annotations

import json
import math
import shutil
import time

import pytest
import torch

from quanta import LLM, SamplingParams
from quanta.llmapi import BuildConfig, KvCacheConfig

PROMPT = "Once upon a time"
VOCAB = 512  # stories260K


@pytest.fixture(scope="module")
def llm(stories_llm):
    return stories_llm


@pytest.fixture(scope="module")
def reference(llm):
    return llm.generate(PROMPT, SamplingParams(max_tokens=6), use_tqdm=False).outputs[0].token_ids


def assert_serving(llm, reference) -> None:
    """No request left behind, and a greedy request still gives the reference tokens."""
    deadline = time.monotonic() + 5
    while llm.engine.requests and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not llm.engine.requests, "a rejected request was left in the engine"
    out = llm.generate(PROMPT, SamplingParams(max_tokens=6), use_tqdm=False)
    assert out.outputs[0].token_ids == reference


def SP(**kw):  # noqa: N802 - reads like the class in the tables below
    return lambda: SamplingParams(**kw)


# (id, what to call with the LLM, regex the error must match: it names the field)
GENERATE_CASES = [
    # wrong types
    ("prompt-int", lambda llm: llm.generate(5), r"prompt.*int"),
    ("prompt-none", lambda llm: llm.generate(None), r"prompt.*NoneType"),
    ("prompt-float-ids", lambda llm: llm.generate([1.5, 2.0]), r"prompt.*float"),
    ("prompt-mixed-ids", lambda llm: llm.generate([[1, 2], 3.5]), r"prompt.*float"),
    ("prompt-str-in-ids", lambda llm: llm.generate({"prompt_token_ids": [1, "a"]}), r"prompt token ids.*'a'"),
    ("prompt-dict-keys", lambda llm: llm.generate({"text": PROMPT}), r"'prompt' or 'prompt_token_ids'"),
    ("sampling-params-dict", lambda llm: llm.generate(PROMPT, {"max_tokens": 3}), r"sampling_params"),
    ("sampling-params-list-item", lambda llm: llm.generate(["a", "b"], [SamplingParams(), 3]), r"sampling_params"),
    ("sampling-params-list-len", lambda llm: llm.generate(["a", "b"], [SamplingParams()]), r"sampling_params"),
    ("generate-unknown-kwarg", lambda llm: llm.generate(PROMPT, foo=1), r"'foo'"),
    ("max_tokens-str", lambda llm: llm.generate(PROMPT, SP(max_tokens="5")()), r"max_tokens.*'5'"),
    ("temperature-str", lambda llm: SP(temperature="hot")(), r"temperature.*'hot'"),
    ("ignore_eos-str", lambda llm: SP(ignore_eos="yes")(), r"ignore_eos"),
    ("stop-int", lambda llm: SP(stop=5)(), r"stop.*5"),
    ("stop_token_ids-str", lambda llm: SP(stop_token_ids="2")(), r"stop_token_ids"),
    ("logits_processor-int", lambda llm: SP(logits_processor=5)(), r"logits_processor"),
    ("embedding_bias-list", lambda llm: SP(embedding_bias=[0.0] * VOCAB)(), r"embedding_bias"),
    ("seed-float", lambda llm: SP(seed=1.5)(), r"seed"),
    # ranges
    ("temperature-negative", lambda llm: SP(temperature=-0.1)(), r"temperature.*-0.1"),
    ("temperature-nan", lambda llm: SP(temperature=math.nan)(), r"temperature.*nan"),
    ("temperature-inf", lambda llm: SP(temperature=math.inf)(), r"temperature.*inf"),
    ("top_p-zero", lambda llm: SP(top_p=0.0)(), r"top_p.*\(0, 1\]"),
    ("top_p-above-1", lambda llm: SP(top_p=1.01)(), r"top_p.*1.01"),
    ("top_p-negative", lambda llm: SP(top_p=-0.5)(), r"top_p"),
    ("top_k-negative", lambda llm: SP(top_k=-1)(), r"top_k.*-1"),
    ("min_p-negative", lambda llm: SP(min_p=-0.1)(), r"min_p.*\[0, 1\]"),
    ("min_p-above-1", lambda llm: SP(min_p=1.5)(), r"min_p.*1.5"),
    ("max_tokens-zero", lambda llm: SP(max_tokens=0)(), r"max_tokens.*0"),
    ("max_tokens-negative", lambda llm: SP(max_tokens=-3)(), r"max_tokens.*-3"),
    ("min_tokens-above-max", lambda llm: SP(max_tokens=4, min_tokens=5)(), r"min_tokens.*5"),
    ("n-zero", lambda llm: SP(n=0)(), r"\bn\b.*0"),
    ("best_of-below-n", lambda llm: SP(n=3, best_of=2)(), r"best_of.*n=3"),
    ("logprobs-negative", lambda llm: SP(logprobs=-1)(), r"logprobs.*-1"),
    ("logprobs-above-100", lambda llm: SP(logprobs=101)(), r"logprobs.*101"),
    ("prompt_logprobs-above-100", lambda llm: SP(prompt_logprobs=101)(), r"prompt_logprobs.*101"),
    (
        "beam_width-above-max",
        lambda llm: llm.generate(PROMPT, SamplingParams(beam_width=2)),
        r"beam_width.*max_beam_width=1",
    ),
    (
        "use_beam_search-above-max",
        lambda llm: llm.generate(PROMPT, SamplingParams(use_beam_search=True, n=2)),
        r"use_beam_search.*max_beam_width=1",
    ),
    # token ids
    ("token-id-negative", lambda llm: llm.generate([1, -1]), r"token id -1.*\[0, 512\)"),
    ("token-id-vocab", lambda llm: llm.generate([1, VOCAB]), r"token id 512.*\[0, 512\)"),
    ("token-id-dict", lambda llm: llm.generate({"prompt_token_ids": [1, 999]}), r"token id 999"),
    ("token-id-in-batch", lambda llm: llm.generate([[1, 2], [1, VOCAB + 5]]), r"token id 517"),
    ("bad-prompt-after-good-in-batch", lambda llm: llm.generate([PROMPT, [1, -4]]), r"token id -4"),
    (
        "stop_token_ids-vocab",
        lambda llm: llm.generate(PROMPT, SamplingParams(stop_token_ids=[VOCAB])),
        r"stop_token_ids.*512",
    ),
    (
        "bad_token_ids-vocab",
        lambda llm: llm.generate(PROMPT, SamplingParams(bad_token_ids=[600])),
        r"bad_token_ids.*600",
    ),
    ("end_id-vocab", lambda llm: llm.generate(PROMPT, SamplingParams(end_id=VOCAB)), r"end_id.*512"),
    (
        "embedding_bias-too-long",
        lambda llm: llm.generate(PROMPT, SamplingParams(embedding_bias=torch.zeros(600))),
        r"embedding_bias.*600",
    ),
    (
        "top_p_reset_ids-vocab",
        lambda llm: llm.generate(PROMPT, SamplingParams(top_p=0.5, top_p_reset_ids=[VOCAB])),
        r"top_p_reset_ids.*512",
    ),
    # empty prompts
    ("empty-str", lambda llm: llm.generate(""), r"prompt is empty"),
    ("empty-ids", lambda llm: llm.generate([]), r"prompt is empty"),
    ("empty-ids-in-batch", lambda llm: llm.generate([[]]), r"prompt is empty"),
    ("empty-dict-ids", lambda llm: llm.generate({"prompt_token_ids": []}), r"prompt is empty"),
    ("empty-dict-text", lambda llm: llm.generate({"prompt": ""}), r"prompt is empty"),
    # limits: an error, never a silent truncation
    ("prompt-above-max_input_len", lambda llm: llm.generate([1] * 513), r"513 tokens.*max_input_len=512"),
    (
        "prompt-plus-max_tokens-above-max_seq_len",
        lambda llm: llm.generate([1] * 500, SamplingParams(max_tokens=13)),
        r"max_tokens \(13\).*max_seq_len=512",
    ),
]


@pytest.mark.parametrize("call, match", [c[1:] for c in GENERATE_CASES], ids=[c[0] for c in GENERATE_CASES])
def test_bad_generate_input(llm, reference, call, match):
    with pytest.raises(ValueError, match=match):
        call(llm)
    assert_serving(llm, reference)


def test_stop_strings_need_a_tokenizer(llm, reference, stories_path):
    with LLM(str(stories_path), skip_tokenizer_init=True, max_batch_size=4) as bare:
        with pytest.raises(ValueError, match=r"stop"):
            bare.generate([1, 2, 3], SamplingParams(stop="x"))
        with pytest.raises(ValueError, match=r"bad"):
            bare.generate([1, 2, 3], SamplingParams(bad="x"))
        assert bare.generate([1, 403], SamplingParams(max_tokens=2)).outputs[0].token_ids
    assert_serving(llm, reference)


def test_small_limits_are_enforced_exactly(stories_path):
    with LLM(str(stories_path), max_input_len=16, max_seq_len=64, max_batch_size=4) as small:
        with pytest.raises(ValueError, match=r"17 tokens.*max_input_len=16"):
            small.generate([1] * 17, SamplingParams(max_tokens=1))
        with pytest.raises(ValueError, match=r"= 65 exceeds max_seq_len=64"):
            small.generate([1] * 16, SamplingParams(max_tokens=49))
        out = small.generate([1] * 16, SamplingParams(max_tokens=48, ignore_eos=True))
        assert len(out.outputs[0].token_ids) == 48 and out.outputs[0].finish_reason == "length"
        with pytest.raises(ValueError, match=r"max_num_tokens=8"):
            LLM(str(stories_path), max_num_tokens=8, max_batch_size=4).generate([1] * 9)


# --- LLM construction ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_batch_szie=8), r"'max_batch_szie'.*did you mean 'max_batch_size'"),
        (dict(kv_cache_confg=KvCacheConfig()), r"'kv_cache_confg'.*did you mean 'kv_cache_config'"),
        (dict(enable_chunked_prefil=True), r"did you mean 'enable_chunked_prefill'"),
        (dict(build_config=5), r"build_config.*BuildConfig"),
        (dict(max_batch_size="8"), r"max_batch_size.*'8'"),
        (dict(max_num_tokens=0), r"max_num_tokens.*0"),
        (dict(build_config=BuildConfig(), max_seq_len=4096), r"max_seq_len=4096.*max_position_embeddings=512"),
        (dict(kv_cache_config=dict(free_gpu_memory_fraction=1.5)), r"free_gpu_memory_fraction.*1.5"),
        (dict(kv_cache_config=KvCacheConfig(max_tokens=8)), r"KvCacheConfig.max_tokens=8.*tokens_per_block=32"),
        (dict(tokenizer_mode="fast"), r"tokenizer_mode"),
        (dict(dtype="float8"), r"dtype.*'float8'"),
        (dict(tokenizer=123), r"tokenizer.*encode\(\) and decode\(\).*int"),
        (dict(skip_tokenizer_init="no"), r"skip_tokenizer_init.*bool.*'no'"),
        (dict(trust_remote_code="yes"), r"trust_remote_code.*bool"),
        (dict(enable_chunked_prefill="yes"), r"enable_chunked_prefill.*bool"),
        (dict(allow_pickle_weights=1), r"allow_pickle_weights.*bool"),
        (dict(tensor_parallel_size="2"), r"tensor_parallel_size.*'2'"),
        (dict(revision=3), r"revision.*int"),
        (dict(device="tpu"), r"device.*'tpu'"),
        (dict(scheduler_config="MAX_UTILIZATION"), r"scheduler_config.*SchedulerConfig"),
    ],
)
def test_bad_llm_arguments(stories_path, llm, reference, kwargs, match):
    with pytest.raises(ValueError, match=match):
        LLM(str(stories_path), **kwargs)
    assert_serving(llm, reference)


@pytest.mark.parametrize("model", [None, 123, ["a"]])
def test_model_of_a_wrong_type(llm, reference, model):
    with pytest.raises(ValueError, match=r"LLM model must be a folder path or a Hugging Face Hub id"):
        LLM(model)
    assert_serving(llm, reference)


def test_request_larger_than_the_kv_cache(stories_path):
    with LLM(str(stories_path), kv_cache_config=KvCacheConfig(max_tokens=64), max_batch_size=2) as small:
        with pytest.raises(ValueError, match=r"max_tokens \(100\) needs 128 tokens of KV cache.*holds 64"):
            small.generate([1, 2, 3], SamplingParams(max_tokens=100))
        out = small.generate([1, 2, 3], SamplingParams(max_tokens=61, ignore_eos=True))
        assert len(out.outputs[0].token_ids) == 61


@pytest.fixture(scope="module")
def broken(stories_path, tmp_path_factory):
    """Copies of the stories260K folder, each broken in one way."""
    root = tmp_path_factory.mktemp("broken")

    def copy(name):
        dst = root / name
        shutil.copytree(stories_path, dst)
        return dst

    def edit_config(path, **changes):
        cfg = json.loads((path / "config.json").read_text())
        cfg.update(changes)
        (path / "config.json").write_text(json.dumps(cfg))

    folders = {}
    folders["no_config"] = copy("no_config")
    (folders["no_config"] / "config.json").unlink()
    folders["unknown_arch"] = copy("unknown_arch")
    edit_config(folders["unknown_arch"], architectures=["GPTFooForCausalLM"])
    folders["unknown_model_type"] = copy("unknown_model_type")
    edit_config(folders["unknown_model_type"], architectures=["GPTFooForCausalLM"], model_type="gpt_foo")
    folders["no_weights"] = copy("no_weights")
    (folders["no_weights"] / "model.safetensors").unlink()
    folders["truncated"] = copy("truncated")
    data = (folders["truncated"] / "model.safetensors").read_bytes()
    (folders["truncated"] / "model.safetensors").write_bytes(data[: len(data) // 2])
    folders["missing_tensor"] = copy("missing_tensor")
    from safetensors.torch import load_file, save_file

    weights = load_file(str(stories_path / "model.safetensors"))
    save_file(
        {k: v for k, v in weights.items() if "layers.1.mlp.up_proj" not in k},
        str(folders["missing_tensor"] / "model.safetensors"),
    )
    folders["wrong_shape"] = copy("wrong_shape")
    reshaped = dict(weights)
    reshaped["model.layers.0.mlp.down_proj.weight"] = reshaped["model.layers.0.mlp.down_proj.weight"][:, :-1].clone()
    save_file(reshaped, str(folders["wrong_shape"] / "model.safetensors"))
    folders["pickle"] = copy("pickle")
    (folders["pickle"] / "model.safetensors").unlink()
    torch.save(weights, folders["pickle"] / "pytorch_model.bin")
    return folders


@pytest.mark.parametrize(
    "name, match",
    [
        ("no_config", r"no config.json"),
        ("unknown_arch", r"GPTFooForCausalLM.*supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"),
        ("unknown_model_type", r"GPTFooForCausalLM.*supported: LlamaForCausalLM, MistralForCausalLM"),
        ("no_weights", r"no weights"),
        ("truncated", r"corrupt or unreadable weights file model.safetensors"),
        ("missing_tensor", r"missing from the checkpoint.*layers.1.mlp"),
        ("wrong_shape", r"model.layers.0.mlp.down_proj.weight.*shape"),
        ("pickle", r"pickle.*allow_pickle_weights=True"),
    ],
)
def test_bad_model_folder(broken, llm, reference, name, match):
    with pytest.raises(ValueError, match=match):
        LLM(str(broken[name]))
    assert_serving(llm, reference)


def test_missing_model_path(llm, reference, tmp_path):
    with pytest.raises(ValueError, match=r"not a folder with a config.json"):
        LLM(str(tmp_path / "nowhere" / "model"))
    assert_serving(llm, reference)


def test_pickle_weights_load_with_opt_in(broken, reference):
    with LLM(str(broken["pickle"]), allow_pickle_weights=True, max_batch_size=4) as opted_in:
        out = opted_in.generate(PROMPT, SamplingParams(max_tokens=6), use_tqdm=False)
        assert out.outputs[0].token_ids == reference
