"""`quanta serve MODEL [flags]` (and `quanta bench-serve`): registered by quanta/cli.py's optional commands.

Flags come in groups (server, limits, engine). `--config cfg.yaml` holds the same options, keyed by their long
flag names (`max-batch-size: 64` or `max_batch_size: 64`): the command line beats the YAML file, which beats
the defaults. Startup failures (bad flags, a missing model, a port in use, not enough memory) print one line
on stderr and exit non-zero.
"""

from __future__ import annotations

import argparse
import difflib
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any

from quanta import envs

_MISSING = object()


@dataclass(frozen=True)
class _Opt:
    flag: str
    type: Any  # int, float, str, bool (a --x / --no-x switch)
    default: Any
    help: str
    group: str
    choices: tuple | None = None

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


OPTIONS: list[_Opt] = [
    # server
    _Opt("--host", str, "127.0.0.1", "address to bind (loopback by default; 0.0.0.0 exposes the server)", "server"),
    _Opt("--port", int, 8000, "port to bind (0: any free port, printed at startup)", "server"),
    _Opt("--api-key", str, None, "require 'Authorization: Bearer KEY' on every route but /health "
         "(default: $QUANTA_API_KEY if set)", "server"),
    _Opt("--served-model-name", str, None, "the model name clients send (default: MODEL as given)", "server"),
    _Opt("--chat-template", str, None, "a Jinja chat template file (or template text) overriding the tokenizer's",
         "server"),
    _Opt("--shutdown-timeout", float, 30.0, "on SIGTERM, seconds to let in-flight requests finish before "
         "aborting them", "server"),
    _Opt("--log-level", str, "warning", "server log level", "server",
         ("debug", "info", "warning", "error", "critical")),
    _Opt("--access-log", bool, False, "log one line per HTTP request (method, path, status; never bodies)",
         "server"),
    _Opt("--engine-process", bool, True, "run the engine in a child process, so the HTTP work does not slow its "
         "loop (--no-engine-process: one process)", "server"),
    # limits
    _Opt("--max-n", int, 16, "largest n a request may ask for", "limits"),
    _Opt("--max-best-of", int, 16, "largest best_of a request may ask for", "limits"),
    _Opt("--max-logprobs", int, 20, "largest logprobs / top_logprobs a request may ask for", "limits"),
    _Opt("--max-tokens-cap", int, None, "largest max_tokens a request may ask for (default: only the context "
         "length limits it)", "limits"),
    _Opt("--max-stop", int, 16, "most stop strings per request", "limits"),
    _Opt("--max-body-bytes", int, 4 << 20, "largest request body in bytes (larger: 413)", "limits"),
    _Opt("--max-queued-requests", int, 4096, "most requests waiting for their first token (more: 503 with "
         "Retry-After)", "limits"),
    # engine (LLM arguments)
    _Opt("--dtype", str, "auto", "model dtype: auto, float32, float16, bfloat16", "engine"),
    _Opt("--device", str, None, "torch device (default: cuda when available, else cpu)", "engine"),
    _Opt("--tokenizer", str, None, "tokenizer folder or Hub id (default: the model's)", "engine"),
    _Opt("--tokenizer-mode", str, "auto", "tokenizer mode", "engine", ("auto", "slow")),
    _Opt("--trust-remote-code", bool, False, "allow custom model code from the checkpoint", "engine"),
    _Opt("--revision", str, None, "Hub revision of the model", "engine"),
    _Opt("--max-batch-size", int, None, "most sequences per step (LLM max_batch_size)", "engine"),
    _Opt("--max-num-tokens", int, None, "most tokens per step (LLM max_num_tokens)", "engine"),
    _Opt("--max-seq-len", int, None, "longest prompt + output (default: the model's maximum)", "engine"),
    _Opt("--max-input-len", int, None, "longest prompt (default: max_seq_len)", "engine"),
    _Opt("--max-beam-width", int, None, "widest beam search a request may use (LLM max_beam_width)", "engine"),
    _Opt("--kv-cache-max-tokens", int, None, "KV cache size in tokens (KvCacheConfig.max_tokens)", "engine"),
    _Opt("--kv-cache-free-memory-fraction", float, None, "share of free memory for the KV cache "
         "(KvCacheConfig.free_gpu_memory_fraction)", "engine"),
    _Opt("--tokens-per-block", int, None, "KV cache block size in tokens", "engine"),
    _Opt("--enable-chunked-prefill", bool, False, "split long prompts over several steps", "engine"),
    _Opt("--scheduler-policy", str, None, "capacity scheduler policy", "engine",
         ("GUARANTEED_NO_EVICT", "MAX_UTILIZATION", "STATIC_BATCH")),
    _Opt("--enforce-eager", bool, False, "no CUDA graphs", "engine"),
    _Opt("--disable-kernels", bool, False, "PyTorch reference ops instead of the fused Triton kernels", "engine"),
    _Opt("--attn-backend", str, None, "attention backend (torch_ref, triton)", "engine"),
    _Opt("--seed", int, None, "engine seed", "engine"),
    _Opt("--load-format", str, None, "auto (checkpoint) or dummy (random weights)", "engine", ("auto", "dummy")),
    _Opt("--allow-pickle-weights", bool, False, "load .bin/.pt weights (torch.load(weights_only=True))", "engine"),
]
_BY_DEST = {o.dest: o for o in OPTIONS}
_GROUP_TITLES = {"server": "server", "limits": "request limits (a request over a limit gets a 400)",
                 "engine": "engine (LLM arguments)"}


class StartupError(Exception):
    """A startup failure: printed as one line, exit status 1 (2 for usage errors)."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status


def register(sub) -> dict:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                       description="Serve MODEL over an OpenAI-compatible HTTP API (/v1/completions, "
                       "/v1/chat/completions, /v1/models, /health, /metrics, /tokenize, /detokenize, /version).")
    p.add_argument("model", nargs="?", default=argparse.SUPPRESS,
                   help="model folder or Hub id (default: the embedded model)")
    p.add_argument("--config", default=None, help="YAML file of options keyed by long flag names; the command "
                   "line wins over it")
    groups = {name: p.add_argument_group(title) for name, title in _GROUP_TITLES.items()}
    for o in OPTIONS:
        g = groups[o.group]
        shown = "" if o.default is None else f" (default: {o.default})"
        if o.type is bool:
            g.add_argument(o.flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=o.help + shown)
        else:
            g.add_argument(o.flag, type=o.type, default=argparse.SUPPRESS, choices=o.choices, help=o.help + shown,
                           metavar=o.dest.upper() if o.choices is None else None)
    from quanta.serve.bench_serve import register as register_bench

    handlers = {"serve": run}
    handlers.update(register_bench(sub))
    return handlers


# --- options ------------------------------------------------------------------------------------------


def resolve_options(args: argparse.Namespace) -> dict[str, Any]:
    """defaults < YAML file < command line."""
    given = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    merged = {o.dest: o.default for o in OPTIONS}
    merged["model"] = None
    if getattr(args, "config", None):
        merged.update(load_yaml(args.config))
    merged.update(given)
    if merged.get("api_key") is None and envs.get("QUANTA_API_KEY"):
        merged["api_key"] = envs.get("QUANTA_API_KEY")
    return merged


def load_yaml(path: str) -> dict[str, Any]:
    try:
        import yaml
    except ImportError:
        raise StartupError("--config needs PyYAML: pip install 'quanta[server]'") from None
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise StartupError(f"cannot read the config file {path!r}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise StartupError(f"the config file {path!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise StartupError(f"the config file {path!r} must hold a mapping of option: value")
    out: dict[str, Any] = {}
    valid = sorted(list(_BY_DEST) + ["model"])
    for key, value in data.items():
        dest = str(key).lstrip("-").replace("-", "_")
        if dest not in _BY_DEST and dest != "model":
            near = difflib.get_close_matches(dest, valid, n=1)
            hint = f" (did you mean {near[0].replace('_', '-')!r}?)" if near else ""
            raise StartupError(f"the config file {path!r} has an unknown option {key!r}{hint}")
        out[dest] = _check_value(dest, value, path)
    return out


def _check_value(dest: str, value: Any, path: str) -> Any:
    if value is None or dest == "model":
        if dest == "model" and not isinstance(value, str):
            raise StartupError(f"the config file {path!r}: model must be a string")
        return value
    o = _BY_DEST[dest]
    ok = {bool: lambda v: isinstance(v, bool), int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str)}[o.type]
    if not ok(value):
        raise StartupError(f"the config file {path!r}: {o.flag[2:]} must be a {o.type.__name__}, got {value!r}")
    if o.choices is not None and value not in o.choices:
        raise StartupError(f"the config file {path!r}: {o.flag[2:]} must be one of {', '.join(o.choices)}, "
                           f"got {value!r}")
    return float(value) if o.type is float else value


def _check_ranges(o: dict[str, Any]) -> None:
    if not 0 <= o["port"] <= 65535:
        raise StartupError(f"--port must be in [0, 65535], got {o['port']}", 2)
    for name in ("max_n", "max_best_of", "max_stop", "max_body_bytes", "max_queued_requests"):
        if o[name] < 1:
            raise StartupError(f"--{name.replace('_', '-')} must be >= 1, got {o[name]}", 2)
    if o["max_logprobs"] < 0:
        raise StartupError(f"--max-logprobs must be >= 0, got {o['max_logprobs']}", 2)
    if o["max_tokens_cap"] is not None and o["max_tokens_cap"] < 1:
        raise StartupError(f"--max-tokens-cap must be >= 1, got {o['max_tokens_cap']}", 2)
    if o["shutdown_timeout"] < 0:
        raise StartupError(f"--shutdown-timeout must be >= 0, got {o['shutdown_timeout']}", 2)


def llm_kwargs(o: dict[str, Any]) -> dict[str, Any]:
    """The LLM(...) keyword arguments from the engine options."""
    from quanta.llmapi import KvCacheConfig, SchedulerConfig

    kw: dict[str, Any] = {"dtype": o["dtype"], "tokenizer_mode": o["tokenizer_mode"],
                          "trust_remote_code": o["trust_remote_code"]}
    for name in ("tokenizer", "revision", "max_batch_size", "max_num_tokens", "max_seq_len", "max_input_len",
                 "max_beam_width", "device", "attn_backend", "seed", "load_format"):
        if o.get(name) is not None:
            kw[name] = o[name]
    for name in ("enable_chunked_prefill", "enforce_eager", "disable_kernels", "allow_pickle_weights"):
        if o.get(name):
            kw[name] = True
    kv = {}
    if o.get("kv_cache_max_tokens") is not None:
        kv["max_tokens"] = o["kv_cache_max_tokens"]
    if o.get("kv_cache_free_memory_fraction") is not None:
        kv["free_gpu_memory_fraction"] = o["kv_cache_free_memory_fraction"]
    if o.get("tokens_per_block") is not None:
        kv["tokens_per_block"] = o["tokens_per_block"]
    if kv:
        kw["kv_cache_config"] = KvCacheConfig(**kv)
    if o.get("scheduler_policy"):
        kw["scheduler_config"] = SchedulerConfig(capacity_scheduler_policy=o["scheduler_policy"])
    return kw


def _read_chat_template(value: str | None) -> str | None:
    if value is None:
        return None
    if os.path.isfile(value):
        try:
            with open(value, encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise StartupError(f"cannot read the chat template {value!r}: {e}") from None
    if "{{" in value or "{%" in value:
        return value  # template text given inline
    raise StartupError(f"the chat template file {value!r} does not exist")


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind before loading the model, so a busy port fails at once (uvicorn listens on this socket)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise StartupError(f"cannot resolve --host {host!r}: {e.strerror}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        reason = "address already in use" if e.errno in (98, 48, 10048) else (e.strerror or str(e))
        raise StartupError(f"cannot listen on {host}:{port}: {reason}") from None
    sock.set_inheritable(True)
    return sock


# --- run ----------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    try:
        return _serve(args)
    except StartupError as e:
        print(f"quanta serve: error: {e}", file=sys.stderr, flush=True)
        return e.status
    except KeyboardInterrupt:
        print("quanta serve: interrupted", file=sys.stderr, flush=True)
        return 130


def _serve(args: argparse.Namespace) -> int:
    import logging

    o = resolve_options(args)
    _check_ranges(o)
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise StartupError(f"quanta serve needs the server extra ({e.name} is missing): "
                           "pip install 'quanta[server]'") from None
    chat_template = _read_chat_template(o["chat_template"])
    sock = bind_socket(o["host"], o["port"])
    logging.basicConfig(level=getattr(logging, o["log_level"].upper()), format="%(levelname)s %(name)s: %(message)s")
    model = o["model"]
    if model is None:
        from quanta.cli import default_model

        try:
            model = default_model()
        except FileNotFoundError as e:
            raise StartupError(str(e)) from None
    engine, info = _start_engine(model, o)
    try:
        return _run_server(engine, info, sock, model, o, chat_template, uvicorn)
    finally:
        engine.shutdown()


def _start_engine(model: str, o: dict[str, Any]):
    """The engine (in a child process unless --no-engine-process) and its startup summary."""
    from quanta.serve import engine_client

    if not o["engine_process"]:
        llm = _load_llm(model, o)
        return engine_client.LocalEngine(llm), engine_client.llm_summary(llm)
    try:
        kw = llm_kwargs(o)
    except ValueError as e:
        raise StartupError(str(e)) from None
    engine = engine_client.ProcessEngine(
        model, kw, {"tokenizer": o["tokenizer"], "mode": o["tokenizer_mode"],
                    "trust_remote_code": o["trust_remote_code"], "revision": o["revision"]},
        prelude=engine_client.CHILD_PRELUDE)
    try:
        info = engine.wait_ready()
        engine.load_tokenizer()
    except KeyboardInterrupt:
        engine.shutdown(5)
        raise
    except Exception as e:
        engine.shutdown(5)
        raise StartupError(" ".join(str(e).split())[:600]) from None
    return engine, info


def _load_llm(model: str, o: dict[str, Any]):
    from quanta import LLM

    try:
        kw = llm_kwargs(o)
        return LLM(model, **kw)
    except (MemoryError, KeyboardInterrupt):
        raise StartupError(f"not enough memory to load {model!r} (lower --kv-cache-max-tokens or "
                           "--kv-cache-free-memory-fraction)") from None
    except Exception as e:
        text = " ".join(str(e).split()) or type(e).__name__
        if isinstance(e, RuntimeError) and "out of memory" in text.lower():
            text = f"not enough memory: {text}"
        raise StartupError(f"cannot load the model {model!r}: {text[:500]}") from None


def _run_server(engine, info: dict, sock: socket.socket, model: str, o: dict[str, Any], chat_template: str | None,
                uvicorn) -> int:
    from quanta.serve.app import ServeConfig, create_app

    state = {"fatal": False}
    server_box: list = []

    def on_fatal() -> None:
        state["fatal"] = True
        if server_box:
            server_box[0].should_exit = True

    cfg = ServeConfig(
        model_name=o["served_model_name"] or model, api_key=o["api_key"], chat_template=chat_template,
        max_n=o["max_n"], max_best_of=o["max_best_of"], max_logprobs=o["max_logprobs"],
        max_tokens_cap=o["max_tokens_cap"], max_stop=o["max_stop"], max_body_bytes=o["max_body_bytes"],
        max_queued_requests=o["max_queued_requests"], on_fatal=on_fatal)
    app = create_app(engine, cfg)
    config = uvicorn.Config(app, log_level=o["log_level"], access_log=o["access_log"],
                            timeout_graceful_shutdown=o["shutdown_timeout"], lifespan="on",
                            timeout_keep_alive=30, server_header=False)
    server = uvicorn.Server(config)
    server_box.append(server)
    host, port = sock.getsockname()[:2]
    auth = "API key required" if cfg.api_key else "no API key"
    where = "engine process" if o["engine_process"] else "in-process engine"
    print(f"quanta serve: {cfg.model_name} ({info['arch']}, {info['dtype']}, {info['device']}, {where}); "
          f"KV cache {info['kv_tokens']} tokens, max_seq_len {info['max_seq_len']}; {auth}; "
          f"listening on http://{_url_host(host)}:{port}", flush=True)
    # uvicorn restores the previous SIGTERM handler after its graceful shutdown and raises the signal again:
    # with this no-op handler the process then exits normally (status 0) after shutting the engine down
    # instead of dying of the re-raised signal.
    import signal

    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
    if state["fatal"]:
        print("quanta serve: error: the engine loop died; exiting", file=sys.stderr, flush=True)
        return 1
    if not server.started:
        print("quanta serve: error: the server did not start", file=sys.stderr, flush=True)
        return 1
    return 0


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
