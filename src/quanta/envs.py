"""Every QUANTA_* environment variable in one place: its name, default, kind and meaning (STYLE: environment
variables are read here, never deep in the code). Code reads one with `envs.get(NAME)`.

Most are A/B switches of the GPU fast paths (benchmarks/gpu_round.sh sets them); the defaults are the measured
winners (benchmarks/RESULTS.md). A value that does not parse raises ValueError naming the variable and what it
takes. `quanta env` prints them with the values in effect.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class EnvVar:
    name: str
    default: str
    kind: str  # a key of _PARSERS: "flag" (0 / 1), "int", "str", or "choice" (one of `choices`)
    doc: str
    choices: tuple[str, ...] = ()


def _flag(var: EnvVar, raw: str) -> bool:
    if raw not in ("0", "1"):
        raise ValueError(f"{var.name}={raw!r}: expected 0 or 1 ({var.doc})")
    return raw == "1"


def _int(var: EnvVar, raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{var.name}={raw!r}: expected an integer ({var.doc})") from None


def _choice(var: EnvVar, raw: str) -> str:
    if raw not in var.choices:
        raise ValueError(f"{var.name}={raw!r}: expected one of {', '.join(var.choices)} ({var.doc})")
    return raw


_PARSERS: dict[str, Callable[[EnvVar, str], Any]] = {
    "flag": _flag, "int": _int, "str": lambda var, raw: raw, "choice": _choice,
}
_VARS: dict[str, EnvVar] = {}


def _add(name: str, default: str, kind: str, doc: str, choices: tuple[str, ...] = ()) -> None:
    assert kind in _PARSERS and name not in _VARS
    _VARS[name] = EnvVar(name, default, kind, doc, choices)


# fmt: off
# the package, the server, tests
_add("QUANTA_SHARED", "../shared", "str", "the shared folder (models, configs, corpora) tests and the default model use")
_add("QUANTA_DEFAULT_MODEL", "", "str", "model folder of `quanta` commands given none (default: the embedded one)")
_add("QUANTA_API_KEY", "", "str", "`quanta serve`'s API key when --api-key is not given")
_add("QUANTA_OVERLAP", "0", "flag", "overlap scheduling on a CPU too (always on for CUDA; builder.py)")
# attention
_add("QUANTA_FUSED_DECODE", "1", "flag", "one-launch decode attention (kernels/decode_attention_fused.py)")
_add("QUANTA_FUSED_DECODE_MAX_SEQS", "16", "int", "decode batches of up to this many sequences take it")
_add("QUANTA_FUSED_DECODE_MANY", "32,4,4096", "str", "its launches of several sequences: 'tile keys,warps,prefetch bytes'")
_add("QUANTA_FUSED_DECODE_MIN_SPLIT_TOKENS", "64", "int", "keys a split of the one-launch decode reads, at least")
_add("QUANTA_FUSED_DECODE_ONE_SPLIT_TOKENS", "128", "int", "sequences up to this long are one split")
_add("QUANTA_FUSED_DECODE_TILE_N", "64", "int", "keys a tile of the one-launch decode (head_dim > 128: half)")
_add("QUANTA_FUSED_DECODE_WARPS", "0", "int", "warps a program of the one-launch decode (0: 4, head_dim > 64: 8)")
_add("QUANTA_FUSED_DECODE_PREFETCH_BYTES", "8192", "int", "K / V tiles up to this size double-buffered (0: never)")
_add("QUANTA_DECODE_MIN_SPLIT_TOKENS", "128", "int", "keys a split of the three-launch decode reads, at least")
_add("QUANTA_DECODE_MAX_SPLITS", "64", "int", "splits per (sequence, kv head) of the decode attention, at most")
_add("QUANTA_DECODE_WARPS", "4", "int", "warps a program of the three-launch decode attention's split kernel")
_add("QUANTA_DECODE_TILE_N", "64", "int", "keys a tile of the three-launch decode (head_dim > 128: half)")
# programmatic dependent launch (kernels/pdl.py)
_add("QUANTA_PDL", "1", "flag", "programmatic dependent launch of the decode kernels (sm_90+)")
_add("QUANTA_GRAPH_TOKENS", "1", "flag", "CUDA graphs hand their greedy tokens to the host and the next step's "
     "input ids themselves (worker/cuda_graph.py)")
_add("QUANTA_PACKED_INPUTS", "1", "flag", "a step's inputs in two host -> device copies (0: one each; worker/input_batch.py)")
_add("QUANTA_PDL_PRELOAD", "1", "flag", "under PDL, kernels load weights / metadata before waiting")
_add("QUANTA_PDL_PREFETCH", "0", "flag", "under PDL, GEMVs prefetch all their weights into L2 first")
# bf16 / fp16 GEMVs (kernels/gemv*.py, layers/fast_ops.py)
_add("QUANTA_GEMV_CONFIG", "", "str", "force one skinny-GEMV config, e.g. bn4_bk512_sk1_w4_s3")
_add("QUANTA_GEMV_FUSED_CONFIG", "", "str", "force the fused GEMVs' config")
_add("QUANTA_GEMV_FUSED_CONFIG_NORM", "", "str", "force the norm -> GEMV config")
_add("QUANTA_GEMV_FUSED_CONFIG_SILU", "", "str", "force the SiLU -> GEMV config")
_add("QUANTA_FUSED_GEMV_ROWS", "1", "int", "decode batches of up to this many rows fuse norm / SiLU into GEMVs")
_add("QUANTA_FUSED_NORM_MAX_MB", "16", "int", "largest weight (MiB) the norm -> GEMV fusion takes")
_add("QUANTA_FUSED_SILU_MAX_MB", "40", "int", "largest weight (MiB) the SiLU -> GEMV fusion takes")
_add("QUANTA_GEMV_LINEAR_MB", "-1", "int", "plain batch-1 linears up to this size (MiB) on the GEMV; -1: 48 with PDL")
_add("QUANTA_GEMV_LMHEAD", "0", "flag", "the batch-1 lm_head on the skinny GEMV")
_add("QUANTA_BENCH_FLUSH", "write", "choice", "how GEMV benchmarks evict L2", ("write", "read"))
# weight-only int kernels (quantization/w_int_*.py, kernels/gemv_config.py)
_add("QUANTA_INT_GEMV_ASM", "1", "flag", "the inline-PTX int4 GEMV at one row (sm_90)")
_add("QUANTA_INT_GEMV_ASM_CONFIG", "bn8_bk1024_sk1_w4_s1_nx", "str", "its config")
_add("QUANTA_INT_GEMV_ASM_CONFIG_LONG", "bn8_bk1024_sk1_w4_s1_nx", "str", "its config for K >= 8192")
_add("QUANTA_INT_GEMV_ASM_SHAPES", "", "str", "per-shape configs: 'NxK=config;...'")
_add("QUANTA_INT_L2_PREFETCH", "0", "flag", "under PDL, the int4 asm GEMV prefetches its words into L2 first")
_add("QUANTA_INT_GEMV_PLANES", "1", "flag", "the norm writes x planes for the int4 asm GEMV")
_add("QUANTA_INT_GEMV_PLANES_CONFIG", "bn4_bk1024_sk1_w4_s1_xp", "str", "the asm GEMV's config with planes")
_add("QUANTA_SPLIT_NORM", "0", "flag", "one int4 row: add + RMSNorm split across the GEMVs around it (split_norm.py)")
_add("QUANTA_INT_SILU_EPILOGUE", "1", "flag", "gate_up's int4 GEMV stores SiLU(gate) * up")
_add("QUANTA_INT4_GEMV_MANY_CONFIG", "", "str", "config of the int4 GEMVs of 5-16 rows")
_add("QUANTA_INT4_GEMV_MANY_SHAPES", "", "str", "per-shape configs of those: 'NxK=config;...'")
_add("QUANTA_INT_DEQUANT_MIN_ROWS", "64", "int", "from this many rows int linears dequantize once + cuBLAS")
_add("QUANTA_INT_MMA_ROWS", "1-16", "str", "int4 linears of this many rows on the tensor-core mma GEMV ('' = off)")
_add("QUANTA_INT_MMA_CONFIG", "", "str", "its config ('t2_w4[_np]'; '' = by shape)")
_add("QUANTA_INT_MMA_SHAPES", "", "str", "its per-shape configs 'NxK=t1_w8;...' (over QUANTA_INT_MMA_CONFIG)")
_add("QUANTA_INT_MMA_SILU_ROWS", "1-16", "str", "gate_up linears of this many rows on the mma GEMV with SiLU * up")
_add("QUANTA_INT_MMA_XF_ROWS", "", "str", "int4 mma linears of this many rows read x in fragment order from the norm "
     "/ silu_and_mul before them ('' = off)")
_add("QUANTA_INT_MMA_SILU_CONFIG", "", "str", "its config ('t2_w2[_np]'; '' = 2 warps)")
_add("QUANTA_INT4_TINYGEMM_MAX_ROWS", "0", "int", "int4 linears of up to this many rows on PyTorch's tinygemm")
# LoRA
_add("QUANTA_LORA_FOLD_MAX_ROWS", "-1", "int", "decode batches of up to this many rows use folded LoRA (-1: 64)")
_add("QUANTA_LORA_FOLD_SKIP", "", "str", "comma-separated module names that keep unfolded LoRA")
# fmt: on


def get(name: str) -> Any:
    """The value of registered variable `name` (its default when unset), parsed by its kind."""
    var = _VARS[name]
    return _PARSERS[var.kind](var, os.environ.get(name, var.default))


def registered() -> dict[str, EnvVar]:
    return dict(_VARS)


def describe() -> str:
    rows = [f"{v.name} = {os.environ.get(v.name, v.default)!r} (default {v.default!r}): {v.doc}" for v in _VARS.values()]
    return "\n".join(rows)
