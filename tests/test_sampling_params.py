"""SamplingParams: API.md defaults, keyword-only construction, validation and helpers."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from quanta.sampling_params import LogitsProcessor, SamplingParams

# API.md's SamplingParams table, field by field.
API_DEFAULTS = {
    "max_tokens": 32,
    "end_id": None,
    "pad_id": None,
    "temperature": None,
    "top_k": None,
    "top_p": None,
    "min_p": None,
    "top_p_min": None,
    "top_p_decay": None,
    "top_p_reset_ids": None,
    "seed": None,
    "repetition_penalty": None,
    "presence_penalty": None,
    "frequency_penalty": None,
    "prompt_ignore_length": None,
    "no_repeat_ngram_size": None,
    "min_tokens": None,
    "ignore_eos": False,
    "stop": None,
    "stop_token_ids": None,
    "include_stop_str_in_output": False,
    "bad": None,
    "bad_token_ids": None,
    "embedding_bias": None,
    "logits_processor": None,
    "n": 1,
    "best_of": None,
    "use_beam_search": False,
    "beam_width": 1,
    "length_penalty": None,
    "early_stopping": None,
    "beam_search_diversity_rate": None,
    "beam_width_array": None,
    "logprobs": None,
    "prompt_logprobs": None,
    "logprobs_mode": "raw",
    "return_context_logits": False,
    "return_generation_logits": False,
    "exclude_input_from_output": True,
    "detokenize": True,
    "add_special_tokens": True,
    "skip_special_tokens": True,
    "spaces_between_special_tokens": True,
    "truncate_prompt_tokens": None,
    "guided_decoding": None,
}


def test_fields_and_defaults_match_api():
    names = [f.name for f in dataclasses.fields(SamplingParams)]
    assert sorted(names) == sorted(API_DEFAULTS)
    params = SamplingParams()
    for name, default in API_DEFAULTS.items():
        assert getattr(params, name) == default, name


def test_keyword_only():
    with pytest.raises(TypeError):
        SamplingParams(5)  # type: ignore[misc]


INVALID = [
    ("max_tokens", "5"),
    ("max_tokens", 0),
    ("max_tokens", -3),
    ("max_tokens", True),
    ("max_tokens", 5.0),
    ("end_id", -2),
    ("end_id", "2"),
    ("temperature", -1.0),
    ("temperature", math.nan),
    ("temperature", math.inf),
    ("temperature", "0.5"),
    ("temperature", True),
    ("top_k", -1),
    ("top_k", 2.5),
    ("top_k", True),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("top_p", -0.1),
    ("top_p", math.nan),
    ("min_p", -0.1),
    ("min_p", 1.1),
    ("top_p_min", 0.0),
    ("top_p_min", 1.2),
    ("top_p_decay", 0.0),
    ("top_p_decay", 1.5),
    ("top_p_reset_ids", -1),
    ("top_p_reset_ids", [1, -2]),
    ("top_p_reset_ids", "3"),
    ("seed", 1.5),
    ("seed", "7"),
    ("seed", 2**64),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("repetition_penalty", math.inf),
    ("presence_penalty", 2.5),
    ("presence_penalty", -2.1),
    ("frequency_penalty", 3.0),
    ("frequency_penalty", -2.5),
    ("prompt_ignore_length", -1),
    ("prompt_ignore_length", 1.5),
    ("no_repeat_ngram_size", 0),
    ("no_repeat_ngram_size", -2),
    ("min_tokens", -1),
    ("min_tokens", 33),  # > max_tokens (32)
    ("min_tokens", "2"),
    ("ignore_eos", 1),
    ("stop", 5),
    ("stop", ["ok", 3]),
    ("stop", [""]),
    ("stop_token_ids", [1, -1]),
    ("stop_token_ids", 5),
    ("stop_token_ids", [1.0]),
    ("bad", 7),
    ("bad", ["x", None]),
    ("bad_token_ids", [-5]),
    ("bad_token_ids", "1"),
    ("include_stop_str_in_output", "yes"),
    ("embedding_bias", [0.0, 1.0]),
    ("embedding_bias", torch.zeros(2, 3)),
    ("embedding_bias", torch.zeros(4, dtype=torch.int64)),
    ("logits_processor", 3),
    ("logits_processor", [lambda *a: None, "x"]),
    ("logits_processor", []),
    ("n", 0),
    ("n", "2"),
    ("best_of", 0),
    ("beam_width", 0),
    ("beam_width", 2.0),
    ("use_beam_search", "no"),
    ("length_penalty", math.nan),
    ("early_stopping", "always"),
    ("beam_search_diversity_rate", -0.5),
    ("beam_width_array", [2, 0]),
    ("logprobs", -1),
    ("logprobs", 101),
    ("logprobs", 2.5),
    ("prompt_logprobs", -1),
    ("prompt_logprobs", 101),
    ("logprobs_mode", "logits"),
    ("logprobs_mode", None),
    ("return_context_logits", 1),
    ("return_generation_logits", None),
    ("exclude_input_from_output", 0),
    ("detokenize", "true"),
    ("add_special_tokens", None),
    ("skip_special_tokens", 1),
    ("spaces_between_special_tokens", 0),
    ("truncate_prompt_tokens", 0),
    ("truncate_prompt_tokens", -1),
]


@pytest.mark.parametrize(("name", "value"), INVALID, ids=[f"{n}={v!r}" for n, v in INVALID])
def test_invalid_value_raises_naming_field_and_value(name, value):
    with pytest.raises(ValueError) as info:
        SamplingParams(**{name: value})
    message = str(info.value)
    assert f"SamplingParams.{name} must be" in message
    assert "got" in message


def test_message_names_value_and_range():
    with pytest.raises(
        ValueError,
        match=r"SamplingParams\.temperature must be >= 0 and finite, "
        r"got -1\.0",
    ):
        SamplingParams(temperature=-1.0)
    with pytest.raises(ValueError, match=r"SamplingParams\.top_p .*\(0, 1\].*got 1\.5"):
        SamplingParams(top_p=1.5)


def test_cross_field_checks():
    with pytest.raises(ValueError, match=r"SamplingParams\.best_of .*n=3.*got 2"):
        SamplingParams(n=3, best_of=2)
    with pytest.raises(ValueError, match=r"SamplingParams\.min_tokens .*max_tokens=4.*got 5"):
        SamplingParams(max_tokens=4, min_tokens=5)
    with pytest.raises(ValueError, match=r"SamplingParams\.n"):
        SamplingParams(beam_width=2, n=3)
    with pytest.raises(ValueError, match=r"SamplingParams\.best_of"):
        SamplingParams(beam_width=4, use_beam_search=True, best_of=3)
    SamplingParams(max_tokens=4, min_tokens=4)  # boundary is fine
    SamplingParams(n=2, best_of=2)


def test_normalization():
    params = SamplingParams(stop="###", bad="bad word", logprobs=True, prompt_logprobs=True)
    assert params.stop == ["###"]
    assert params.bad == ["bad word"]
    assert params.logprobs == 1 and params.prompt_logprobs == 1
    assert SamplingParams(logprobs=False).logprobs is None
    assert SamplingParams(logprobs=0).logprobs == 0
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(temperature=1).temperature == 1.0
    assert isinstance(SamplingParams(temperature=1).temperature, float)
    assert SamplingParams(end_id=2).pad_id == 2
    assert SamplingParams(end_id=2, pad_id=0).pad_id == 0
    assert SamplingParams(logprobs_mode="processed_logprobs").logprobs_mode == "processed"
    assert SamplingParams(top_p_reset_ids=3).top_p_reset_id_set == {3}
    assert SamplingParams(top_p_reset_ids=[3, 4]).top_p_reset_id_set == {3, 4}
    assert SamplingParams(seed=-1).seed == -1


def test_valid_edge_values():
    SamplingParams(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0)
    SamplingParams(min_p=1.0, presence_penalty=-2.0, frequency_penalty=2.0)
    SamplingParams(logprobs=100, prompt_logprobs=0, truncate_prompt_tokens=1)
    SamplingParams(embedding_bias=torch.zeros(8), logits_processor=[lambda *a: None])
    SamplingParams(early_stopping=True, beam_width_array=[2, 4], length_penalty=-1.0)
    SamplingParams(early_stopping="never", beam_width=2)  # Hugging Face's spelling is accepted too


def test_is_greedy():
    assert SamplingParams().is_greedy
    assert SamplingParams(temperature=0.0, top_p=0.9).is_greedy
    assert SamplingParams(top_k=1, temperature=0.7).is_greedy
    assert not SamplingParams(temperature=0.7).is_greedy
    assert not SamplingParams(top_p=0.9).is_greedy
    assert not SamplingParams(top_k=0).is_greedy
    assert not SamplingParams(min_p=0.1).is_greedy


def test_beam_and_best_of_helpers():
    assert SamplingParams().best_of_or_n == 1
    assert SamplingParams(n=3).best_of_or_n == 3
    assert SamplingParams(n=2, best_of=5).best_of_or_n == 5
    assert SamplingParams().effective_beam_width == 1
    assert SamplingParams(beam_width=4).effective_beam_width == 4  # the seed snippet's spelling
    assert SamplingParams(use_beam_search=True, n=2).effective_beam_width == 2
    assert SamplingParams(use_beam_search=True, n=2, best_of=6).effective_beam_width == 6
    assert SamplingParams(n=3, best_of=4).effective_beam_width == 1  # sampling, not beams
    assert SamplingParams().logprobs_k is None
    assert SamplingParams(logprobs=5).logprobs_k == 5


def test_logits_processor_base_class_is_usable():
    class Allow(LogitsProcessor):
        def __call__(self, req_id, logits, token_ids, stream_ptr, client_id):
            logits[..., 0] = 0.0

    SamplingParams(logits_processor=Allow())
    with pytest.raises(TypeError):
        LogitsProcessor()  # type: ignore[abstract]
