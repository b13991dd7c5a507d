"""Request checks and their translation to the engine: the JSON body (content type, size cap, JSON object),
the model name, the pydantic model, the server's caps, fields quanta refuses, SamplingParams, and the
context-length check. Every failure is an APIError in the OpenAI envelope (errors.py)."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from quanta.serve.config import ServeConfig
from quanta.serve.errors import APIError, bad_request, pydantic_errors_to_api_error
from quanta.serve.protocol import ChatCompletionRequest

# below this a temperature is greedy (as in vLLM): dividing logits by ~0 would overflow
_TEMPERATURE_EPS = 1e-5

_SP_PARAM = re.compile(r"SamplingParams\.(\w+)")


def parse(model, data: dict):
    """`data` as the pydantic request `model`; a 400 naming the first bad field."""
    from pydantic import ValidationError

    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise pydantic_errors_to_api_error(e.errors(include_url=False)) from None
    except RecursionError:
        raise bad_request("the request is nested too deeply") from None


def value_error(e: BaseException, param_names: dict[str, str]) -> APIError:
    """A ValueError of SamplingParams / the engine as a 400 naming the request's field (`param_names`:
    SamplingParams field -> request field)."""
    msg = str(e)
    m = _SP_PARAM.search(msg)
    param = None
    if m:
        field = m.group(1)
        param = param_names.get(field, field)
        msg = msg.replace(f"SamplingParams.{field}", param)
    elif msg.startswith("prompt"):
        param = "prompt"
    code = "context_length_exceeded" if ("max_seq_len" in msg or "max_input_len" in msg
                                         or "max_num_tokens" in msg) else None
    return bad_request(msg, param=param, code=code)


def refuse_unsupported(req) -> None:
    """A 400 for each field quanta knows of but cannot honour yet (protocol.py declares them)."""
    rf = req.response_format
    if rf is not None and not (isinstance(rf, dict) and rf.get("type") == "text" and len(rf) == 1):
        raise bad_request("response_format is not supported yet in quanta (structured output has not landed); "
                          "omit it or use {\"type\": \"text\"}", param="response_format")
    for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar"):
        if getattr(req, name) is not None:
            raise bad_request(f"{name} is not supported yet in quanta (guided decoding has not landed)",
                              param=name)
    if req.store:
        raise bad_request("store=true is not supported: quanta does not store completions", param="store")
    if isinstance(req, ChatCompletionRequest):
        if req.tools:
            raise bad_request("tools are not supported yet in quanta (tool calling has not landed)",
                              param="tools")
        if req.tool_choice not in (None, "none"):
            raise bad_request("tool_choice is not supported yet in quanta (tool calling has not landed)",
                              param="tool_choice")
        if req.functions or req.function_call not in (None, "none"):
            param = "functions" if req.functions else "function_call"
            raise bad_request("functions / function_call are not supported in quanta", param=param)
        for name in ("modalities", "audio", "prediction", "reasoning_effort", "web_search_options"):
            value = getattr(req, name)
            if value is not None and not (name == "modalities" and value == ["text"]):
                raise bad_request(f"{name} is not supported in quanta", param=name)
    elif req.suffix:
        raise bad_request("suffix (fill-in-the-middle) is not supported yet in quanta", param="suffix")
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed with stream=true", param="stream_options")


class RequestValidator:
    """The checks that depend on the server's config and the engine's limits."""

    def __init__(self, config: ServeConfig, engine, vocab_size: int):
        self.cfg = config
        self.engine = engine  # read at check time: max_seq_len, max_input_len
        self.vocab_size = vocab_size

    async def read_json(self, request) -> dict:
        ctype = request.headers.get("content-type")
        if ctype is not None:
            media = ctype.split(";", 1)[0].strip().lower()
            if media != "application/json" and not media.endswith("+json"):
                raise bad_request(f"Content-Type must be application/json, got {ctype[:60]!r}",
                                  code="invalid_content_type")
        cap = self.cfg.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise bad_request("invalid Content-Length header")
            if int(length) > cap:
                raise APIError(413, f"request body of {int(length)} bytes is larger than the server's limit of "
                                    f"{cap} bytes (--max-body-bytes)", code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > cap:
                raise APIError(413, f"request body is larger than the server's limit of {cap} bytes "
                                    "(--max-body-bytes)", code="request_too_large")
            chunks.append(chunk)
        body = b"".join(chunks)
        if not body.strip():
            raise bad_request("the request body is empty: send a JSON object")
        try:
            data = json.loads(body)
        except RecursionError:
            raise bad_request("the request body is nested too deeply") from None
        except ValueError as e:
            raise bad_request(f"the request body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise bad_request(f"the request body must be a JSON object, got a JSON {type(data).__name__}")
        return data

    def check_model(self, data: dict) -> None:
        name = data.get("model")
        if isinstance(name, str) and name != self.cfg.model_name:
            raise APIError(404, f"The model `{name[:200]}` does not exist (this server serves "
                                f"`{self.cfg.model_name}`).", param="model", code="model_not_found")

    def check_caps(self, req, logprobs: int | None, logprobs_param: str, max_tokens: int | None,
                   max_tokens_param: str) -> None:
        c = self.cfg
        if req.n > c.max_n:
            raise bad_request(f"n={req.n} is more than the server's limit of {c.max_n} (--max-n)", param="n")
        if req.best_of is not None and req.best_of > c.max_best_of:
            raise bad_request(f"best_of={req.best_of} is more than the server's limit of {c.max_best_of} "
                              "(--max-best-of)", param="best_of")
        if logprobs is not None and logprobs > c.max_logprobs:
            raise bad_request(f"{logprobs_param}={logprobs} is more than the server's limit of {c.max_logprobs} "
                              "(--max-logprobs)", param=logprobs_param)
        if logprobs is not None and logprobs < 0:
            raise bad_request(f"{logprobs_param} must be >= 0, got {logprobs}", param=logprobs_param)
        if max_tokens is not None and c.max_tokens_cap is not None and max_tokens > c.max_tokens_cap:
            raise bad_request(f"{max_tokens_param}={max_tokens} is more than the server's limit of "
                              f"{c.max_tokens_cap} (--max-tokens-cap)", param=max_tokens_param)
        if max_tokens is not None and max_tokens < 1:
            raise bad_request(f"{max_tokens_param} must be >= 1, got {max_tokens}", param=max_tokens_param)

    def resolve_max_tokens(self, asked: int | None, default: int | None, n_prompt: int, param: str) -> int:
        """The request's max_tokens after the context-length check (400 context_length_exceeded)."""
        max_seq_len, max_input_len = self.engine.max_seq_len, self.engine.max_input_len
        if n_prompt > max_input_len or n_prompt >= max_seq_len:
            raise bad_request(
                f"This model's maximum context length is {max_seq_len} tokens (max input {max_input_len}); "
                f"the prompt has {n_prompt} tokens. Shorten the prompt.", param="messages" if param ==
                "max_completion_tokens" else "prompt", code="context_length_exceeded")
        room = max_seq_len - n_prompt
        if asked is None:
            cap = self.cfg.max_tokens_cap
            want = default if default is not None else room
            if cap is not None:
                want = min(want, cap)
            return max(1, min(want, room))
        if n_prompt + asked > max_seq_len:
            raise bad_request(
                f"This model's maximum context length is {max_seq_len} tokens. However, you requested "
                f"{n_prompt + asked} tokens ({n_prompt} in the prompt, {asked} in the completion). Lower {param} "
                "or shorten the prompt.", param=param, code="context_length_exceeded")
        return asked

    def sampling_params(self, req, *, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None,
                        param_names: dict[str, str]):
        from quanta.sampling_params import SamplingParams

        temperature = 1.0 if req.temperature is None else req.temperature
        if 0 < temperature < _TEMPERATURE_EPS:
            temperature = 0.0
        top_k = req.top_k
        if top_k is not None and (top_k == -1 or top_k > self.vocab_size):
            top_k = 0  # all tokens
        kw = dict(
            max_tokens=max_tokens, temperature=temperature, top_p=req.top_p, top_k=top_k, min_p=req.min_p,
            seed=req.seed, presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
            repetition_penalty=req.repetition_penalty, min_tokens=req.min_tokens, ignore_eos=req.ignore_eos,
            stop=self._stops(req.stop), stop_token_ids=req.stop_token_ids,
            include_stop_str_in_output=req.include_stop_str_in_output, n=req.n, best_of=req.best_of,
            use_beam_search=req.use_beam_search, length_penalty=req.length_penalty, logprobs=logprobs,
            prompt_logprobs=prompt_logprobs, embedding_bias=self._logit_bias(req.logit_bias),
            skip_special_tokens=req.skip_special_tokens,
            spaces_between_special_tokens=req.spaces_between_special_tokens,
        )
        try:
            return SamplingParams(**kw)
        except ValueError as e:
            raise value_error(e, param_names) from None

    def _stops(self, stop: Any) -> list[str] | None:
        if stop is None:
            return None
        if isinstance(stop, str):
            stops = [stop]
        elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
            stops = stop
        else:
            raise bad_request("stop must be a string or a list of strings", param="stop")
        if len(stops) > self.cfg.max_stop:
            raise bad_request(f"stop has {len(stops)} strings, more than the server's limit of {self.cfg.max_stop} "
                              "(--max-stop)", param="stop")
        if any(not s for s in stops):
            raise bad_request("stop strings must not be empty", param="stop")
        return stops or None

    def _logit_bias(self, bias: dict[str, float] | None):
        if not bias:
            return None
        import torch

        t = torch.zeros(self.vocab_size, dtype=torch.float32)
        for key, value in bias.items():
            if not (key.isdigit() and key.isascii()) or int(key) >= self.vocab_size:
                raise bad_request(f"logit_bias key {key[:40]!r} is not a token id in [0, {self.vocab_size})",
                                  param="logit_bias")
            if not (math.isfinite(value) and -100 <= value <= 100):
                raise bad_request(f"logit_bias[{key}] must be in [-100, 100], got {value}", param="logit_bias")
            t[int(key)] = float(value)
        return t
