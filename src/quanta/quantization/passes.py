"""Calibration passes, one per QuantMethod.calibration name, and the layer-by-layer driver.

A pass says which input statistics it needs, whether a layer's groups are quantized one after another
(each re-running the layer so later groups see quantized inputs: GPTQ) or all from one float run
(AWQ, SmoothQuant, static scales), and what it does with a layer once its statistics are in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from quanta.quantization.awq import awq_layer
from quanta.quantization.gptq import gptq_layer
from quanta.quantization.stats import ABSMAX, ABSMEAN, HESSIAN, SAMPLES, LinearStats
from quanta.quantization.structure import ScaleGroup, apply_scale, scale_groups

SEARCH_TOKENS = 1024  # token rows kept per Linear for AWQ's scale search (its clip search uses 512)


def rtn_layer(layer, groups: list[ScaleGroup], stats: dict, method, qc) -> None:
    """Round-to-nearest (and static activation scales from the gathered absmax, when the method has one)."""
    for group in groups:
        for lin in group.linears:
            if lin in stats:
                method.quantize(lin, stats[lin])


def smoothquant_layer(layer, groups: list[ScaleGroup], stats: dict, method, qc) -> None:
    """s = max|x|^alpha / max|w|^(1 - alpha) per input channel, folded like AWQ's scales (Xiao et al. 2022)."""
    alpha = float(qc.smoothquant_val)
    for group in groups:
        lins = [m for m in group.linears if m in stats]
        if not lins:
            continue
        act = stats[lins[0]].absmax.float().clamp(min=1e-5)
        wmax = torch.cat([m.weight.data for m in lins]).float().abs().amax(0).clamp(min=1e-5)
        s = group.tie((act.pow(alpha) / wmax.pow(1 - alpha)).clamp(min=1e-5))
        apply_scale(group, lins, s, stats, qc.pre_quant_scale)
    rtn_layer(layer, groups, stats, method, qc)


@dataclass(frozen=True)
class CalibPass:
    needs: frozenset[str]
    sequential: bool
    process: Callable


PASSES: dict[str | None, CalibPass] = {
    None: CalibPass(frozenset(), False, rtn_layer),
    "amax": CalibPass(frozenset({ABSMAX}), False, rtn_layer),
    "smoothquant": CalibPass(frozenset({ABSMAX}), False, smoothquant_layer),
    "awq": CalibPass(frozenset({ABSMEAN, ABSMAX, SAMPLES}), False, awq_layer),
    "gptq": CalibPass(frozenset({HESSIAN}), True, gptq_layer),
}


class KvStats:
    """Per attention layer: max |k| and max |v| (after rotary), for the static KV-cache scales."""

    def __init__(self):
        self.k_amax = self.v_amax = None

    def observe(self, q, k, v) -> None:
        ka, va = k.detach().float().abs().amax(), v.detach().float().abs().amax()
        self.k_amax = ka if self.k_amax is None else torch.maximum(self.k_amax, ka)
        self.v_amax = va if self.v_amax is None else torch.maximum(self.v_amax, va)


def calibrate_and_quantize(runner, method, selected: set, qc, kv: bool, seed: int,
                           show_progress: bool = True) -> dict:
    """Every decoder layer in turn: gather statistics, run the method's pass. Returns {attn module: KvStats}."""
    cp = PASSES[method.calibration if method is not None else None]
    total = runner.num_seqs * runner.seq_len
    gen = torch.Generator().manual_seed(seed)
    kv_stats: dict = {}
    label = f"Calibrating {method.algo if method is not None else 'KV cache'}"
    for layer in tqdm(runner.layers, desc=label, unit="layer", disable=not show_progress):
        groups = [g for g in scale_groups(layer)]
        for g in groups:
            g.linears = [m for m in g.linears if id(m) in selected]

        def new_stats(lins) -> dict:
            return {m: LinearStats(cp.needs, min(1.0, SEARCH_TOKENS / total), gen) for m in lins}

        hooks: dict = {}
        if kv:
            inner = getattr(getattr(layer, "self_attn", None), "attn", None)
            if inner is not None:
                kv_stats[inner] = hooks[inner] = KvStats()
        if method is None:
            runner.run(layer, hooks, advance=True)
            continue
        if cp.sequential:  # quantize group by group, each on inputs from the quantized ones before it
            for g in groups:
                if g.linears:
                    st = new_stats(g.linears)
                    runner.run(layer, st, advance=False)
                    cp.process(layer, [g], st, method, qc)
            runner.run(layer, hooks, advance=True)
        else:  # one float run gives every group's inputs (and the next layer's)
            st = new_stats([m for g in groups for m in g.linears]) if cp.needs else {}
            runner.run(layer, {**st, **hooks}, advance=True)
            if not cp.needs:
                st = {m: None for g in groups for m in g.linears}
            cp.process(layer, groups, st, method, qc)
    return kv_stats
