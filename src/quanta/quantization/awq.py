"""AWQ (activation-aware weight quantization, Lin et al. 2023) for one decoder layer.

For each scale group (structure.py) a grid search picks per-input-channel scales
s = mean|x|^a / mean|w_normalized|^(1-a), a in [0, 1) (AutoAWQ's "duo" form; s = 1 is a candidate too),
that minimise the error of the group's block output (the MLP's output for gate_up, else the projection's
own output) on sampled calibration tokens when W * s is quantized; s is folded into the
previous op (or kept as a runtime pre_quant_scale). Then a clip search shrinks each group's range where
that lowers the output error (skipped for q and k rows: attention scores are sensitive to them), and the
layer's weights are quantized with the method's round-to-nearest.
"""

from __future__ import annotations

import torch

from quanta.quantization.int_quant import fake_quant_groups, pad_columns
from quanta.quantization.structure import ScaleGroup, apply_scale

N_GRID = 20
CLIP_GRID = 20
MAX_SHRINK = 0.5
CLIP_TOKENS = 512


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
                rows = _clip_rows(group, lin)
                if rows is not None:
                    clip_weight(lin, stats[lin].samples, method, rows)
                method.quantize(lin, stats[lin])


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
def clip_weight(lin, samples: torch.Tensor, method, rows: tuple[int, int]) -> None:
    """Per (row, group) range shrink in [1 - MAX_SHRINK, 1] that minimises the group's output error."""
    start, size = rows
    gs = method.group_size(lin)
    w = lin.weight.data[start : start + size].float()
    if samples.shape[0] > CLIP_TOKENS:
        samples = samples[torch.linspace(0, samples.shape[0] - 1, CLIP_TOKENS).long()]
    xs = torch.nn.functional.pad(samples, (0, pad_columns(w[:1], gs).shape[1] - w.shape[1]))
    xg = xs.view(xs.shape[0], -1, gs)  # [S, G, g]
    step = max(1, (1 << 24) // (xg.shape[1] * max(xg.shape[0], gs)))  # rows per chunk: [R, S, G] outputs
    for r0 in range(0, size, step):
        wg = pad_columns(w[r0 : r0 + step], gs).view(-1, xg.shape[1], gs)  # [R, G, g]
        ref = torch.einsum("sgk,rgk->rsg", xg, wg)
        amax = wg.abs().amax(-1, keepdim=True)  # [R, G, 1]
        best_err = torch.full(amax.shape[:2], float("inf"), device=w.device)
        best_max = amax.clone()
        for i in range(int(MAX_SHRINK * CLIP_GRID)):
            mx = amax * (1 - i / CLIP_GRID)
            cw = wg.clamp(-mx, mx)
            qw = _fake(cw.view(cw.shape[0], -1), method, gs, lin.weight.dtype).view_as(cw)
            err = (torch.einsum("sgk,rgk->rsg", xg, qw) - ref).pow(2).mean(1)  # [R, G]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_max = torch.where(better[..., None], mx, best_max)
        clipped = wg.clamp(-best_max, best_max).view(wg.shape[0], -1)[:, : w.shape[1]]
        w[r0 : r0 + step] = clipped
    lin.weight.data[start : start + size] = w.to(lin.weight.dtype)
