"""The wire format between the HTTP server and the engine process: length-prefixed JSON frames over a
socketpair (no pickle on any socket), and the codecs of what crosses it.

    parent -> child   ["add", rid, prompt_ids, sampling_params_fields, cache_salt]  ["abort", rid]  ["shutdown"]
    child -> parent   ["ready", info] | ["fatal", message]      once, at startup
                      ["ack", rid] | ["reject", rid, kind, message]      per add
                      ["d", rid, finished, replace, seqs, prompt_logprobs]   output deltas
                      ["e", rid, kind, message]                            a request failed
                      ["state", {running, waiting, kv_*, preemptions}]    engine state, when it changes
                      ["dead", message]                                    the engine loop died

`kind` is "value" (a bad request: 400), "dead" (the engine is gone: 503) or "other" (500).
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

HEADER = struct.Struct(">I")
MAX_FRAME = 1 << 30


class EngineGone(RuntimeError):
    """The engine (process or loop) is gone."""


def frame(obj: Any) -> bytes:
    data = json.dumps(obj, separators=(",", ":")).encode()
    return HEADER.pack(len(data)) + data


def recv_frame_blocking(sock: socket.socket) -> list:
    def exact(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise EOFError("connection closed")
            buf += chunk
        return buf

    (size,) = HEADER.unpack(exact(HEADER.size))
    return json.loads(exact(size))


def params_to_json(params) -> dict:
    """SamplingParams -> JSON-able fields (the tensor logit bias as a sparse {id: bias})."""
    from dataclasses import fields

    out = {}
    for f in fields(params):
        value = getattr(params, f.name)
        if f.name == "embedding_bias" and value is not None:
            nz = value.nonzero().flatten().tolist()
            out[f.name] = {"__size__": int(value.numel()), "bias": {str(i): float(value[i]) for i in nz}}
        elif f.name == "logits_processor" and value is not None:
            raise ValueError("logits processors cannot cross to the engine process")
        else:
            out[f.name] = value
    return out


def params_from_json(data: dict):
    from quanta.sampling_params import SamplingParams

    bias = data.get("embedding_bias")
    if bias is not None:
        import torch

        t = torch.zeros(bias["__size__"], dtype=torch.float32)
        for i, v in bias["bias"].items():
            t[int(i)] = v
        data = dict(data, embedding_bias=t)
    return SamplingParams(**data)


def lp_to_json(d: dict | None) -> list | None:
    if d is None:
        return None
    return [[tid, lp.logprob, lp.rank] for tid, lp in d.items()]


def lp_from_json(items: list | None) -> dict | None:
    if items is None:
        return None
    from quanta.outputs import Logprob

    return {tid: Logprob(lp, rank) for tid, lp, rank in items}


def error_kind(err: BaseException | None, dead: bool) -> str:
    if dead:
        return "dead"
    cause = err.__cause__ if err is not None and err.__cause__ is not None else err
    return "value" if isinstance(cause, ValueError) else "other"


def make_error(kind: str, message: str) -> BaseException:
    """The exception a request's consumer sees, with the cause the server maps to a status."""
    from quanta.llmapi.request_output import RequestError

    cause: BaseException = ValueError(message) if kind == "value" else (
        EngineGone(message) if kind == "dead" else RuntimeError(message))
    err = RequestError(message)
    err.__cause__ = cause
    return err


def kwargs_to_json(kw: dict) -> dict:
    """LLM kwargs from the CLI (plain values and the KV / scheduler config dataclasses) as JSON."""
    out = {}
    for k, v in kw.items():
        if hasattr(v, "to_dict"):
            d = {key: (str(val) if hasattr(val, "value") else val) for key, val in v.to_dict().items()}
            out[k] = {"__config__": type(v).__name__, "fields": d}
        else:
            out[k] = v
    return out


def kwargs_from_json(kw: dict) -> dict:
    import quanta.llmapi as api

    out = {}
    for k, v in kw.items():
        if isinstance(v, dict) and "__config__" in v:
            out[k] = getattr(api, v["__config__"])(**v["fields"])
        else:
            out[k] = v
    return out
