"""The engine in the HTTP server's own process (`quanta serve --no-engine-process`): an `LLM` object whose
RequestOutputs are the handles the server iterates."""

from __future__ import annotations


class LocalEngine:
    """The engine in this process: an `LLM` object (its RequestOutputs are the handles)."""

    def __init__(self, llm):
        import inspect

        from quanta.serve.metrics import engine_state

        self.llm = llm
        self.tokenizer = llm.tokenizer
        cfg = llm.engine_config
        self.max_seq_len, self.max_input_len = cfg.max_seq_len, cfg.max_input_len
        built = getattr(llm, "_built", None)
        size = getattr(getattr(built, "hf_config", None), "vocab_size", None)
        self.vocab_size = size if isinstance(size, int) and size > 0 else len(llm.tokenizer)
        self.accepts_cache_salt = "cache_salt" in inspect.signature(llm.generate_async).parameters
        self._engine_state = engine_state

    async def start(self) -> None:
        pass

    async def generate(self, ids: list[int], params, cache_salt: str | None = None):
        kwargs = {"cache_salt": cache_salt} if cache_salt is not None else {}
        return self.llm.generate_async(ids, params, streaming=True, **kwargs)

    def state(self) -> dict:
        return self._engine_state(self.llm.engine)

    def error(self) -> str | None:
        loop = getattr(self.llm, "_loop", None)
        if loop is None:
            return "the engine is not running"
        if loop.dead is not None:
            return f"the engine loop died ({type(loop.dead).__name__}: {loop.dead})"
        if not loop.is_alive:
            return "the engine is shutting down"
        return None

    def shutdown(self) -> None:
        self.llm.shutdown()


def llm_summary(llm) -> dict:
    """What the startup line shows about an LLM (and what the child reports as ready)."""
    built = llm._built
    cfg = built.config
    return {
        "arch": (getattr(built.hf_config, "architectures", None) or ["?"])[0],
        "dtype": str(built.dtype).replace("torch.", ""), "device": str(built.device),
        "kv_tokens": cfg.num_kv_blocks * cfg.tokens_per_block, "max_seq_len": cfg.max_seq_len,
        "max_input_len": cfg.max_input_len,
        "vocab_size": int(getattr(built.hf_config, "vocab_size", 0) or len(llm.tokenizer or [])),
        "model_path": str(built.model_path) if built.model_path is not None else None,
    }
