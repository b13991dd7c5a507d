"""GPTQ (Frantar et al. 2022): quantize one input column at a time and spread its rounding error over the
columns not yet quantized, weighted by the inverse Hessian H = X^T X of the layer's calibration inputs.

act-order off (columns in order, so groups stay contiguous and the stored layout is the plain one),
damp = 0.01 * mean(diag(H)), lazy batch updates over blocks of 128 columns. Group parameters are taken from
the already error-corrected weights when each group starts, each (row, group)'s range shrunk where that
lowers its output error e H_g e^T (int_quant.search_group_qparams: the GPTQ reference quantizer's MSE grid,
weighted by the group's block of H); per channel: once, round-to-nearest over the whole row.
The driver runs the layer's groups in forward order (qkv, o, gate_up, down), each seeing the inputs
produced by the already quantized ones.
"""

from __future__ import annotations

import torch

from quanta.quantization.int_quant import group_qparams, hessian_blocks, num_groups, search_group_qparams

DAMP = 0.01
BLOCK = 128


def gptq_layer(layer, groups, stats: dict, method, qc) -> None:
    for group in groups:
        for lin in group.linears:
            if lin in stats:
                gptq_quantize(lin, stats[lin].hessian / max(stats[lin].num_tokens, 1), method)


def _inverse_hessian_chol(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H^-1, damped; retried with more damping if H is not positive definite."""
    damp = DAMP * torch.mean(torch.diag(h))
    eye = torch.eye(h.shape[0], device=h.device, dtype=h.dtype)
    for _ in range(6):
        try:
            lower = torch.linalg.cholesky(h + damp * eye)
            return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
        except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
            damp = damp * 10
    raise RuntimeError("GPTQ: the calibration Hessian is not positive definite even with heavy damping")


@torch.no_grad()
def gptq_quantize(lin, hessian: torch.Tensor, method) -> None:
    w = lin.weight.data.float().clone()  # [out, in]
    out, inn = w.shape
    h = hessian.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    hinv = _inverse_hessian_chol(h)
    bits, gs, zp = method.bits, method.group_size(lin), method.zero_point
    qmax = 2**bits - 1
    dtype = lin.weight.dtype
    ng = num_groups(inn, gs)
    scales = torch.empty(out, ng, dtype=dtype, device=w.device)
    zeros = torch.empty(out, ng, dtype=torch.uint8, device=w.device)
    q_all = torch.zeros(out, ng * gs, dtype=torch.uint8, device=w.device)
    block = max(BLOCK // gs, 1) * gs if gs < inn else BLOCK
    scale = zero = None
    for i1 in range(0, inn, block):
        i2 = min(i1 + block, inn)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % gs == 0:
                if gs >= inn:  # per channel: one range per row (a search would cost out x in^2 per step)
                    scale, z = group_qparams(w, bits, gs, zp, dtype)
                else:
                    src, hg = w1[:, i : i + gs], h[col : col + gs, col : col + gs]
                    scale, z = search_group_qparams(src, hessian_blocks(hg, gs), bits, gs, zp, dtype)
                zero = z.float() if z is not None else torch.full_like(scale, 2 ** (bits - 1), dtype=torch.float32)
                scales[:, col // gs] = scale[:, 0]
                zeros[:, col // gs] = zero[:, 0].to(torch.uint8)
            sf = scale.float()[:, 0]
            q = torch.clamp(torch.round(w1[:, i] / sf) + zero[:, 0], 0, qmax)
            q_all[:, col] = q.to(torch.uint8)
            dq = (q - zero[:, 0]) * sf
            e = (w1[:, i] - dq) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    method.store(lin, q_all, scales, zeros if zp else None)
