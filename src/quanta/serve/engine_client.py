"""How the HTTP server reaches the engine: in its own process (`LocalEngine`, an `LLM` object) or in a child
process (`ProcessEngine`, the default of `quanta serve`). Both offer the same surface to the server:
`tokenizer`, `vocab_size`, `max_seq_len`, `max_input_len`, `accepts_cache_salt`, `start()`,
`generate(ids, params, cache_salt) -> handle`, `state()`, `error()`, `shutdown()`.

    engine_local.py     LocalEngine, llm_summary
    engine_process.py   ProcessEngine, RemoteOutput: the server's side of the engine process
    engine_child.py     the engine process's side (`python -m quanta.serve.engine_child FD`)
    engine_ipc.py       the wire format both sides share (JSON frames over a socketpair, no pickle)

This module is the stable import path for all of them.
"""

from __future__ import annotations

import sys

from quanta.serve.engine_ipc import EngineGone
from quanta.serve.engine_local import LocalEngine, llm_summary
from quanta.serve.engine_process import ProcessEngine, RemoteOutput

__all__ = ["CHILD_PRELUDE", "EngineGone", "LocalEngine", "ProcessEngine", "RemoteOutput", "llm_summary"]

# Python code the engine process runs before building the LLM (tests set it to inject faults).
CHILD_PRELUDE: str | None = None


if __name__ == "__main__":
    from quanta.serve.engine_child import child_main

    sys.exit(child_main(int(sys.argv[1])))
