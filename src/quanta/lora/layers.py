"""The LoRA layer wrapper and the per-step LoRA context it reads.

`LoRALinear` replaces a built model's Linear / MergedLinear (module swap; model files are untouched) and
computes `base(x) + per-token LoRA delta`. Its adapters live in stacked device buffers, one slot per
resident adapter, zero-padded to max_lora_rank R:
`lora_a: [max_loras, num_shards * R, in]`, `lora_b: [max_loras, out, R]` (scaling folded into B).
A merged q|k|v (gate|up) layer keeps one A block per shard and each shard's B rows in its row range, so an
adapter that touches only q and v leaves k's blocks at zero.

Folding (`fold=True`, an unquantized Linear / MergedLinear base): the base weight and every slot's A live
in ONE buffer `w_full = [out + max_loras * num_shards * R, in]`; `base.weight` is the view `w_full[:out]`
(same values, contiguous: base-only forwards cost what they did) and `lora_a` the view of the rest. A
forward of at most FOLD_MAX_ROWS tokens then runs ONE GEMM on w_full (base output + every slot's shrink)
and ONE kernel adding each token's expand (kernels/lora_folded.py); larger ones keep base + lora_apply.

`LoRAContext` holds the step's token -> slot mapping in persistent buffers (filled by the model runner
before the forward), so a captured CUDA graph reads the current step's mapping on replay.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quanta.kernels.lora import LoRAMeta
from quanta.kernels.lora_folded import FOLD_MAX_ROWS, lora_folded, lora_folded_ref
from quanta.kernels.lora_fused import lora_apply, lora_apply_ref
from quanta.layers.linear import Linear


class LoRAContext:
    """Per-step LoRA inputs shared by every LoRALinear (one per engine)."""

    def __init__(self, max_num_tokens: int, num_slots: int, device: torch.device):
        self.device = device
        self.num_slots = num_slots
        pin = device.type == "cuda"

        def pair(n: int, fill: int):
            host = torch.full((n,), fill, dtype=torch.int32, pin_memory=pin)
            return host, (torch.full((n,), fill, dtype=torch.int32, device=device) if pin else host)

        self.h_slots, slots = pair(max_num_tokens, -1)  # per token: its adapter's slot, -1 = none
        self.h_sorted, sorted_idx = pair(max_num_tokens, 0)  # tokens with an adapter, grouped by slot
        self.h_counts, counts = pair(num_slots, 0)  # tokens per slot
        self.h_starts, starts = pair(num_slots, 0)  # group offsets into sorted_idx
        self.meta = LoRAMeta(slots, sorted_idx, counts, starts, max_count=None)
        # Host flag: does any token of this step have an adapter? When not, eager forwards skip LoRA and
        # CUDA-graph steps replay the decode graphs captured without it (CudaGraphRunner sets it per capture).
        self.active = True
        self.use_kernels = False  # Triton kernels (CUDA) vs the PyTorch twins


class LoRALinear(nn.Module):
    """base(x) + sum over the token's adapter: x @ A^T @ B^T, for every token at once."""

    def __init__(self, base: nn.Module, ctx: LoRAContext, shards: list[tuple[str, int, int]], max_rank: int,
                 dtype: torch.dtype, device: torch.device, fold: bool = True):
        """`fold`: share one buffer between the base weight and A when the base allows it (`can_fold`).
        Build it after the base's weights are loaded (and quantized): folding copies the weight."""
        super().__init__()
        self.base = base
        self.ctx = ctx
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.shard_names = [name for name, _, _ in shards]
        self.shard_ranges = [(start, size) for _, start, size in shards]
        self.splits = tuple(start for _, start, _ in shards[1:])  # output offsets where shards 1, 2 begin
        self.max_rank = max_rank
        n = len(shards) * max_rank
        self.w_full: torch.Tensor | None = None  # folded: [out + slots * n, in], base weight then every A
        if fold and can_fold(base, dtype, device):
            out, k = self.out_features, self.in_features
            w_full = torch.empty(out + ctx.num_slots * n, k, dtype=dtype, device=device)
            w_full[:out].copy_(base.weight.detach())
            w_full[out:].zero_()
            old = base.weight
            base.weight = nn.Parameter(w_full[:out], requires_grad=False)  # same values; the old one is freed
            for attr, value in vars(old).items():  # weight_loader ... (loading writes into the view)
                setattr(base.weight, attr, value)
            self.w_full = w_full
            lora_a = w_full[out:].view(ctx.num_slots, n, k)
        else:
            lora_a = torch.zeros(ctx.num_slots, n, self.in_features, dtype=dtype, device=device)
        self.register_buffer("lora_a", lora_a, persistent=False)
        self.register_buffer("lora_b", torch.zeros(ctx.num_slots, self.out_features, max_rank, dtype=dtype,
                                                   device=device), persistent=False)

    # Pass-throughs, so code that inspects a projection (weight, quant_method ...) still finds it.
    @property
    def weight(self):
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def shard_offsets(self):
        return self.base.shard_offsets()

    def set_slot(self, slot: int, weights: list[tuple[int, torch.Tensor, torch.Tensor]] | None) -> None:
        """Write one adapter's weights (shard index, A [r, in], B [size, r]) into `slot`; zeros elsewhere."""
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        nb = self.lora_a.is_cuda
        for shard, a, b in weights or ():
            r = a.shape[0]
            start, size = self.shard_ranges[shard]
            self.lora_a[slot, shard * self.max_rank : shard * self.max_rank + r].copy_(a, non_blocking=nb)
            self.lora_b[slot, start : start + size, :r].copy_(b, non_blocking=nb)

    @property
    def folded(self) -> bool:
        return self.w_full is not None

    def check_folded(self) -> None:
        """Raise when the base weight no longer aliases w_full (reassigned after folding: a reload,
        quantization, `.to()`), which would make the folded path use stale weights."""
        w = getattr(self.base, "weight", None)
        if (not isinstance(w, torch.Tensor) or w.data_ptr() != self.w_full.data_ptr()
                or getattr(self.base, "quant_method", None) is not None):
            raise RuntimeError("LoRALinear: the base weight was replaced after folding it into w_full; load "
                               "weights through weight_loader / in place, or wrap the layer after loading")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = self.ctx
        if not ctx.active:
            return self.base(x)
        x2 = x.reshape(-1, self.in_features)
        if self.w_full is not None and x2.shape[0] <= FOLD_MAX_ROWS:
            self.check_folded()
            y_full = F.linear(x2, self.w_full)  # [T, out + slots * shards * R]: base + every slot's shrink
            bias = self.base.bias
            if ctx.use_kernels and x2.is_cuda:
                y = lora_folded(y_full, self.lora_b, ctx.meta.slots, ctx.meta.counts, self.out_features,
                                self.splits, bias)
            else:
                y = lora_folded_ref(y_full, self.lora_b, ctx.meta.slots, self.out_features, self.splits, bias)
            return y.view(*x.shape[:-1], self.out_features)
        y = self.base(x)
        if not y.is_contiguous():
            y = y.contiguous()
        y2 = y.view(-1, self.out_features)
        if ctx.use_kernels and x2.is_cuda:
            if x2.stride(1) != 1:
                x2 = x2.contiguous()
            lora_apply(y2, x2, self.lora_a, self.lora_b, ctx.meta, self.splits)  # fused, or shrink + expand
        else:
            lora_apply_ref(y2, x2, self.lora_a, self.lora_b, ctx.meta, self.splits)
        return y

    def extra_repr(self) -> str:
        return (f"shards={self.shard_names}, max_rank={self.max_rank}, slots={self.ctx.num_slots}, "
                f"folded={self.folded}")


def can_fold(base: nn.Module, dtype: torch.dtype, device: torch.device) -> bool:
    """An unquantized Linear / MergedLinear whose forward is F.linear on a plain [out, in] weight."""
    w = getattr(base, "weight", None)
    return (isinstance(base, Linear) and base.quant_method is None and isinstance(w, torch.Tensor)
            and w.shape == (base.out_features, base.in_features) and w.dtype == dtype
            and w.device.type == device.type and w.is_contiguous())
