"""Configs of the skinny decode GEMVs (kernels/gemv.py, the int GEMVs of quantization/): `GemvConfig` (its text
form 'bn4_bk512_sk0_w4_s3[_dot|...]'), the per-shape table and heuristics (`gemv_config`, `default_config`),
automatic split-K and the candidates a tuning run times."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from quanta import envs
from quanta.kernels._compat import next_pow2

NUM_SMS_DEFAULT = 132  # H100 SXM; the real count is read from the device when there is one


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class GemvConfig:
    block_n: int = 4  # output rows per program
    block_k: int = 512  # K elements per step (int4 / int8: elements, not bytes)
    split_k: int = 0  # programs per row block along K; 0 = automatic
    num_warps: int = 4
    num_stages: int = 3
    use_dot: bool = False  # tl.dot on a 16-row tile (fp16 / bf16 only) instead of a broadcast multiply
    # int GEMV only (w4 / w8; fp16 / bf16, block_n >= 16): swap-AB tl.dot, y^T = W x^T (w_int_gemv_t.py), suffix
    # "_dott"; with dot_t_offset ("_dotto") the weights enter the dot as OFFSET + q straight from their bits
    use_dot_t: bool = False
    dot_t_offset: bool = False
    # the next K step's loads issued before this step's math (two steps in flight a program), suffix "_nx";
    # kernels/gemv_fused.py and the int byte GEMV (quantization/w_int_kernel.py) honour it
    next_step: bool = False
    # int4 asm GEMV only (quantization/w_int_gemv_asm.py), suffix "_tma": the weight tile comes in by TMA (a host
    # tensor descriptor), the K loop pipelined num_stages deep by Triton (mbarriers, no registers held in flight)
    tma: bool = False
    # register cap per thread (ptxas -maxrregcount, Triton's maxnreg), suffix "_rN"; 0 = the compiler's choice.
    # The int4 asm GEMV: with zero points it takes 72 registers (7 programs an SM), capped at 64: 8. The 16-bit GEMV
    # and the fused ones too: the 1B SiLU -> down GEMV (bn4_bk1024_nx) takes 156 (3 programs an SM: 396 slots for its
    # 512 programs), capped at 128 no spills (4: one wave), no faster (H200 1B: 1,121.9 / 1,120.6 vs 1,122.7 / 1,125.6)
    max_regs: int = 0
    # int4 asm GEMV only, suffix "_xp": x comes as x_planes (w_int_gemv_asm.py): the pairs in the weights' layout
    x_planes: bool = False

    def launch_kwargs(self) -> dict:
        """Extra kernel launch keywords of this config: the register cap (Triton's maxnreg) when set."""
        return {"maxnreg": self.max_regs} if self.max_regs else {}

    def __str__(self) -> str:
        s = f"bn{self.block_n}_bk{self.block_k}_sk{self.split_k}_w{self.num_warps}_s{self.num_stages}"
        s += "_dot" if self.use_dot else ""
        s += ("_dotto" if self.dot_t_offset else "_dott") if self.use_dot_t else ""
        return s + ("_nx" if self.next_step else "") + ("_tma" if self.tma else "") + (f"_r{self.max_regs}" if self.max_regs else "") + ("_xp" if self.x_planes else "")

    @classmethod
    def parse(cls, text: str) -> GemvConfig:
        """'bn4_bk512_sk0_w4_s3[_dot|_dott|_dotto][_nx][_tma][_rN][_xp]' (any subset of the fields, in any order) -> GemvConfig."""
        keys = {"bn": "block_n", "bk": "block_k", "sk": "split_k", "w": "num_warps", "s": "num_stages", "r": "max_regs"}
        flags = {"dot": ("use_dot",), "dott": ("use_dot_t",), "dotto": ("use_dot_t", "dot_t_offset"),
                 "nx": ("next_step",), "tma": ("tma",), "xp": ("x_planes",)}
        kw: dict = {}
        for part in text.strip().lower().split("_"):
            if part in flags:
                kw.update(dict.fromkeys(flags[part], True))
                continue
            head = part.rstrip("0123456789")
            if head not in keys or head == part:
                raise ValueError(f"bad GEMV config field {part!r} in {text!r}")
            kw[keys[head]] = int(part[len(head) :])
        return cls(**kw)


# (kind, M, N, K) -> config; kind: "w16" (fp16 / bf16 / fp32 weights), "w4", "w8". Filled from bench_gemv.py.
GEMV_CONFIGS: dict[tuple[str, int, int, int], GemvConfig] = {}
_BITS = {"w16": 16, "w8": 8, "w4": 4}
# One-row 16-bit GEMVs of at most this many weights take bn4_bk2048_sk1_w4_s1 (no split-K, no cp.async stages;
# the 1B o_proj in one K step). H200, Llama-3.2-1B bf16 batch 1 (benchmarks/results/h200_s12{a,e,f,g}_*): bn4_bk512
# s3 auto split (before) 1,059.5 / 1,059.2 tok/s (call 1), 1,026.3 / 1,067.4 (call 5); bn4_bk1024_sk1_w4_s1 1,092.1
# (call 1), 1,098.2 / 1,099.2 (call 5), 1,098.5 / 1,098.1 (call 7); bn4_bk2048_sk1_w4_s1 1,116.6 (call 6), 1,116.8 /
# 1,116.4 (call 7); bn2_bk1024 1,101.8, bn8_bk1024_w8 1,088.0, bn4_bk2048_w8 1,092.3 (call 6). Larger weights (8B
# qkv / o: QUANTA_GEMV_CONFIG=bn4_bk1024_sk1_w4_s1 225.7 vs 225.1 tok/s, call 2) keep the old default.
SMALL_W16 = 8 << 20
INT4_MANY_CONFIG = envs.get("QUANTA_INT4_GEMV_MANY_CONFIG")  # int4 GEMVs of 5-16 rows (default: _dott)
INT4_MANY_SHAPES = envs.get("QUANTA_INT4_GEMV_MANY_SHAPES")  # per shape: "NxK=config;..."


def shape_table(text: str, parse, what: str = "GEMV shape configs") -> dict:
    """"NxK=config;NxK=config" -> {(N, K): parse(config)}; `what` names the setting in the error."""
    table = {}
    for item in filter(None, (t.strip() for t in text.split(";"))):
        shape, _, cfg = item.partition("=")
        n, _, k = shape.lower().partition("x")
        if not (n.isdigit() and k.isdigit() and cfg):
            raise ValueError(f"{what}: {item!r} is not 'NxK=config' (e.g. '4096x4096=...')")
        table[(int(n), int(k))] = parse(cfg)
    return table


@functools.lru_cache(maxsize=8)
def _shape_configs(text: str) -> dict:
    """{(N, K): GemvConfig} of QUANTA_INT4_GEMV_MANY_SHAPES / QUANTA_INT_GEMV_ASM_SHAPES."""
    return shape_table(text, GemvConfig.parse)


def num_sms(device: torch.device | None = None) -> int:
    if device is not None and device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return NUM_SMS_DEFAULT


def auto_split_k(cfg: GemvConfig, n: int, k: int, sms: int = NUM_SMS_DEFAULT) -> int:
    """Split K until the grid holds >= 4 waves of programs, keeping >= 2 K steps per split (max 16)."""
    programs, split = _cdiv(n, cfg.block_n), 1
    while programs * split < 4 * sms and split < 16 and k >= 2 * (2 * split) * cfg.block_k:
        split *= 2
    return split


def default_config(kind: str, m: int, n: int, k: int) -> GemvConfig:
    bits = _BITS[kind]
    if m > 4 and bits < 16:  # int weights, M in 5..16: swap-AB tl.dot (H100, 8B shapes at M=16: 1.35-1.45x faster)
        if bits == 4 and (INT4_MANY_CONFIG or INT4_MANY_SHAPES):  # env (benchmarks): another config
            shaped = _shape_configs(INT4_MANY_SHAPES).get((n, k))
            return shaped or GemvConfig.parse(INT4_MANY_CONFIG or "bn64_bk128_sk0_w4_s3_dott")
        if bits == 4 and n * k <= 32 << 20:  # H200, 8B qkv / o at 16 rows: 4 splits 16.4 / 13.7 us vs auto 18.0 / 15.8
            return GemvConfig(block_n=64, block_k=128, split_k=4, num_warps=4, use_dot_t=True)
        if bits == 4:  # gate_up / down: weights as OFFSET + q from their bits ("_dotto"): 43.2 / 28.0 vs 45.3 / 29.1
            return GemvConfig(block_n=64, block_k=128, num_warps=4, use_dot_t=True, dot_t_offset=True)
        return GemvConfig(block_n=64, block_k=128, num_warps=4, use_dot_t=True)
    if m > 4:  # M in 5..16: one 16-row tl.dot tile
        return GemvConfig(block_n=32, block_k=256, num_warps=4, use_dot=True)
    if bits == 16 and m == 1 and n * k <= SMALL_W16:  # e.g. the 1B o_proj (2048 x 2048)
        return GemvConfig(block_n=4, block_k=2048, split_k=1, num_warps=4, num_stages=1)
    bn = 4 if m <= 2 else 8
    bk = 2048 * 8 // bits // 2 if bits < 16 else 512  # ~1 KiB of each weight row per step (int4: 2048 / 2)
    if bits == 16:  # the [BLOCK_M, BLOCK_N, BLOCK_K] fp32 accumulator: <= 64 registers a thread at 4 warps
        bk = min(bk, 64 * 128 // (next_pow2(m) * bn))
    return GemvConfig(block_n=bn, block_k=bk, num_warps=4)


def gemv_config(kind: str, m: int, n: int, k: int) -> GemvConfig:
    env = envs.get("QUANTA_GEMV_CONFIG")
    if env:
        return GemvConfig.parse(env)
    return GEMV_CONFIGS.get((kind, m, n, k)) or default_config(kind, m, n, k)


def candidate_configs(kind: str, m: int, n: int, k: int) -> list[GemvConfig]:
    """A handful of configs worth timing for one shape (the default first)."""
    bits, out = _BITS[kind], [default_config(kind, m, n, k)]
    if m <= 4:
        step = 16 // bits  # scale block_k so the bytes per row per step match
        for bn, bk, w in ((4, 256, 4), (8, 256, 4), (4, 1024, 8), (16, 128, 4), (2, 1024, 4), (16, 256, 8)):
            if bits == 16 and next_pow2(m) * bn * bk // (32 * w) > 128:
                continue
            out.append(GemvConfig(block_n=bn, block_k=bk * step, num_warps=w))
    if bits < 16 and m <= 4:  # the byte GEMV with the next step's weights in flight ("_nx"): to be timed
        for bn, bk in ((4, 2048), (4, 1024), (8, 1024), (2, 2048)):
            out.append(GemvConfig(block_n=bn, block_k=bk * 4 // bits, num_warps=4, next_step=True))
    for bn, bk, w in ((32, 256, 4), (64, 256, 8), (16, 512, 4)):
        out.append(GemvConfig(block_n=bn, block_k=bk if bits == 16 else 2 * bk, num_warps=w, use_dot=True))
    if bits < 16:  # swap-AB int GEMV at every M (issue 6): to be timed before any default uses it
        for bn, bk, w, off in ((64, 128, 4, False), (128, 128, 4, False), (128, 128, 8, False), (256, 128, 8, False),
                               (64, 256, 4, False), (64, 128, 4, True), (128, 128, 4, True), (256, 128, 8, True)):
            out.append(GemvConfig(block_n=bn, block_k=bk, num_warps=w, use_dot_t=True, dot_t_offset=off))
    seen: set = set()
    return [c for c in out if not (c in seen or seen.add(c))]
