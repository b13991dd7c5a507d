"""AWQ (activation-aware weight quantization, Lin et al. 2023) for one decoder layer.

For each scale group (structure.py) a grid search picks per-input-channel scales
s = mean|x|^a / mean|w_normalized|^(1-a), a in [0, 1) (AutoAWQ's "duo" form; s = 1 is a candidate too),
that minimise the error of the group's block output (the MLP's output for gate_up, else the projection's
own output) on sampled calibration tokens when W * s is quantized; s is folded into the
previous op (or kept as a runtime pre_quant_scale). Then a clip search shrinks each (row, group)'s range
where that lowers its output error on the samples (int_quant.search_group_qparams; q and k rows keep
round-to-nearest's range: attention scores are sensitive to them), and the weights are quantized with it.
"""

from __future__ import annotations

import torch

from quanta.quantization.int_quant import (
    fake_quant_groups,
    group_qparams,
    pad_columns,
    quantize_groups,
    search_group_qparams,
)
from quanta.quantization.structure import ScaleGroup, apply_scale

N_GRID = 20
CLIP_GRID = 20
MAX_SHRINK = 0.5


def awq_layer(layer, groups: list[ScaleGroup], stats: dict, method, qc) -> None:
    for group in groups:
        lins = [m for m in group.linears if m in stats]
        if not lins:
            continue
        s = search_scale(group, lins, stats[lins[0]], method)
        apply_scale(group, lins, s, stats, qc.pre_quant_scale)
    for group in groups:
        for lin in group.linears:
            if lin in stats:
                q, scale, zero = clip_quantize(lin, stats[lin].samples, method, _clip_rows(group, lin))
                method.quantize(lin, stats[lin])  # the method's own parameters (W4A8: the activation scale)
                method.store(lin, q, scale, zero)  # with the searched ranges


def _fake(w: torch.Tensor, method, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """What the stored weight will be (scales rounded to the model dtype, as stored)."""
    return fake_quant_groups(w, method.bits, group_size, method.zero_point, dtype)


@torch.no_grad()
def search_scale(group: ScaleGroup, lins: list, st, method) -> torch.Tensor:
    x = st.samples  # [S, in] float32
    w = torch.cat([m.weight.data for m in lins]).float()  # [out, in]
    gs = method.group_size(lins[0])
    inspect = group.inspect or (lambda h: h)
    ref = inspect(x @ w.t())
    x_mean = st.absmean.float().clamp(min=1e-8)
    wg = pad_columns(w.abs(), gs).view(w.shape[0], -1, gs)
    w_mean = (wg / wg.amax(-1, keepdim=True).clamp(min=1e-8)).view(w.shape[0], -1)[:, : w.shape[1]].mean(0)
    candidates = [torch.ones_like(x_mean)]  # never worse than round-to-nearest on the samples
    for i in range(N_GRID):
        a = i / N_GRID
        candidates.append(x_mean.pow(a) / w_mean.clamp(min=1e-8).pow(1 - a))
    best, best_s = float("inf"), candidates[0]
    for s in candidates:
        s = group.tie(s.clamp(min=1e-4))
        s = s / (s.max() * s.min()).sqrt()
        wq = _fake(w * s, method, gs, lins[0].weight.dtype) / s
        err = (inspect(x @ wq.t()) - ref).pow(2).mean().item()
        if err < best:
            best, best_s = err, s
    return best_s.to(w.device)


def _clip_rows(group: ScaleGroup, lin) -> tuple[int, int] | None:
    """Rows of `lin` the clip search may change: all, but only v of a merged qkv."""
    offsets = lin.shard_offsets()
    if group.name == "qkv" or {"q", "k"} <= set(offsets):
        return offsets.get("v")
    return 0, lin.out_features


@torch.no_grad()
def clip_quantize(lin, samples: torch.Tensor, method, rows: tuple[int, int] | None):
    """(q, scale, zero) of `lin`, the ranges of `rows` (start, size) searched on the samples' output error."""
    w, gs, dtype = lin.weight.data, method.group_size(lin), lin.weight.dtype
    scale, zero = group_qparams(w, method.bits, gs, method.zero_point, dtype)
    if rows is not None:
        start, size = rows
        xg = torch.nn.functional.pad(samples, (0, scale.shape[1] * gs - w.shape[1])).view(samples.shape[0], -1, gs)
        h_blocks = torch.einsum("sgi,sgj->gij", xg, xg) / max(samples.shape[0], 1)  # [G, g, g]
        s, z = search_group_qparams(w[start : start + size], h_blocks, method.bits, gs, method.zero_point, dtype,
                                    CLIP_GRID, MAX_SHRINK)
        scale[start : start + size] = s
        if zero is not None:
            zero[start : start + size] = z
    return quantize_groups(w, scale, zero, method.bits, gs), scale, zero
