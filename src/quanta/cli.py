"""`quanta generate | bench ...`: the command line (subcommands registered in one table)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


def default_model() -> str:
    from quanta.assets import default_model_path

    return str(default_model_path())


def _add_generate(sub) -> Callable:
    p = sub.add_parser("generate", help="generate text for prompts")
    p.add_argument("prompts", nargs="*", default=["Once upon a time"], help="prompt texts")
    p.add_argument("--model", default=None, help="model folder or Hub id (default: the embedded model)")
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--n", type=int, default=1)
    g.add_argument("--stop", action="append", default=None)
    e = p.add_argument_group("engine")
    e.add_argument("--dtype", default="auto")
    e.add_argument("--device", default=None)
    return _run_generate


def _run_generate(args) -> int:
    from quanta import LLM, SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, n=args.n, stop=args.stop)
    with LLM(args.model or default_model(), dtype=args.dtype, device=args.device) as llm:
        for out in llm.generate(args.prompts, params, use_tqdm=False):
            for c in out.outputs:
                print(f"{out.prompt}{c.text}")
    return 0


def _add_env(sub) -> Callable:
    sub.add_parser("env", help="list the QUANTA_* environment variables, their values and defaults")

    def run(args) -> int:
        from quanta import envs

        print(envs.describe())
        return 0

    return run


COMMANDS: list[Callable] = [_add_generate, _add_env]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="quanta", description="quanta LLM inference engine")
    sub = parser.add_subparsers(dest="command", required=True)
    handlers = {}
    for add in COMMANDS:
        handler = add(sub)
        handlers[list(sub.choices)[-1]] = handler
    for extra in _optional_commands():
        handlers.update(extra(sub))
    args = parser.parse_args(argv)
    return handlers[args.command](args)


def _optional_commands() -> list[Callable]:
    """Subcommands that live in their own modules (bench, serve ...), registered when present."""
    import importlib

    found = []
    for module in ("quanta.bench.cli", "quanta.serve.cli", "quanta.quantization.cli"):
        try:
            found.append(importlib.import_module(module).register)
        except ImportError:
            continue
    return found


if __name__ == "__main__":
    sys.exit(main())
