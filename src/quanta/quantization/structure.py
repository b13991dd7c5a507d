"""Where per-input-channel scales (AWQ, SmoothQuant) can be folded: the decoder layer's four scale groups.

A group is the Linear(s) reading one input plus the op producing that input:
  input_layernorm          -> qkv_proj        (norm weight / s)
  v rows of qkv_proj       -> o_proj          (v rows / s; with GQA one scale per kv channel, shared by the
                                               query heads of its group)
  post_attention_layernorm -> gate_up_proj    (norm weight / s)
  up rows of gate_up_proj  -> down_proj       (up rows / s: silu(gate) * up is linear in up)
x' = x / s and W' = W * s leave the float model unchanged. Found by duck typing on the shared Llama-family
decoder, so model files stay structure only; a layer that does not match gets no folding (runtime
pre_quant_scale instead).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn


def _identity(s: torch.Tensor) -> torch.Tensor:
    return s


@dataclass
class ScaleGroup:
    name: str
    linears: list[nn.Module]  # Linear layers sharing one input
    fold: Callable[[torch.Tensor], None] | None  # divide the producer's output channels by s
    tie: Callable[[torch.Tensor], torch.Tensor] = field(default=_identity)  # project s onto foldable scales
    # maps the group's output to the block output whose error AWQ's search measures (None: the output itself)
    inspect: Callable[[torch.Tensor], torch.Tensor] | None = None


def _fold_norm(norm) -> Callable[[torch.Tensor], None]:
    def fold(s: torch.Tensor) -> None:
        norm.weight.data.div_(s.to(norm.weight.dtype))

    return fold


def _fold_rows(linear, shard: str, reduce: Callable[[torch.Tensor], torch.Tensor] = _identity):
    """Divide the output rows of `linear`'s shard (still float) by reduce(s)."""
    start, size = linear.shard_offsets()[shard]

    def fold(s: torch.Tensor) -> None:
        r = reduce(s).to(linear.weight.dtype)
        linear.weight.data[start : start + size].div_(r[:, None])
        if linear.bias is not None:
            linear.bias.data[start : start + size].div_(r)

    return fold


def _gqa(attn) -> tuple[Callable, Callable]:
    """o_proj input channel (h, d) is fed by v channel (h // group, d): their scales must be one."""
    h, kvh, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    g = h // kvh

    def tie(s: torch.Tensor) -> torch.Tensor:
        return s.view(kvh, g, d).mean(1, keepdim=True).expand(kvh, g, d).reshape(-1)

    def reduce(s: torch.Tensor) -> torch.Tensor:
        return s.view(kvh, g, d)[:, 0, :].reshape(-1)

    return tie, reduce


def _mlp_inspect(down) -> Callable[[torch.Tensor], torch.Tensor]:
    """gate|up output -> the MLP's output (float down_proj): the error that matters downstream."""

    def inspect(h: torch.Tensor) -> torch.Tensor:
        gate, up = h.chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * up @ down.weight.float().t()

    return inspect


def scale_groups(layer: nn.Module) -> list[ScaleGroup]:
    """The decoder layer's groups in forward order (also GPTQ's sequential order)."""
    from quanta.layers.linear import Linear

    groups: list[ScaleGroup] = []
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    qkv, o = getattr(attn, "qkv_proj", None), getattr(attn, "o_proj", None)
    if isinstance(qkv, Linear):
        norm = getattr(layer, "input_layernorm", None)
        groups.append(ScaleGroup("qkv", [qkv], _fold_norm(norm) if norm is not None else None))
    if isinstance(o, Linear):
        fold, tie = None, _identity
        inner = getattr(attn, "attn", None)
        if isinstance(qkv, Linear) and "v" in qkv.shard_offsets() and inner is not None:
            tie, reduce = _gqa(inner)
            fold = _fold_rows(qkv, "v", reduce)
        groups.append(ScaleGroup("o", [o], fold, tie))
    gate_up, down = getattr(mlp, "gate_up_proj", None), getattr(mlp, "down_proj", None)
    if isinstance(gate_up, Linear):
        norm = getattr(layer, "post_attention_layernorm", None)
        inspect = _mlp_inspect(down) if isinstance(down, Linear) else None
        groups.append(ScaleGroup("gate_up", [gate_up], _fold_norm(norm) if norm is not None else None,
                                 inspect=inspect))
    if isinstance(down, Linear):
        fold = _fold_rows(gate_up, "up") if isinstance(gate_up, Linear) and "up" in gate_up.shard_offsets() else None
        groups.append(ScaleGroup("down", [down], fold))
    seen = {id(m) for g in groups for m in g.linears}
    for m in layer.modules():  # any other Linear: its own group, nothing to fold into
        if isinstance(m, Linear) and id(m) not in seen:
            groups.append(ScaleGroup("other", [m], None))
    return groups


def apply_scale(group: ScaleGroup, linears: list[nn.Module], s: torch.Tensor, stats: dict,
                use_pre_quant_scale: bool) -> None:
    """x' = x / s into the producer (or a runtime pre_quant_scale), W' = W * s into the consumers."""
    from quanta.quantization.base import set_params

    if group.fold is not None and not use_pre_quant_scale:
        group.fold(s)
    else:
        for lin in linears:
            set_params(lin, drop=(), pre_quant_scale=(1.0 / s).to(lin.weight.dtype))
    for lin in linears:
        lin.weight.data.mul_(s.to(lin.weight.dtype)[None, :])
    for st in {id(stats[lin]): stats[lin] for lin in linears if lin in stats}.values():
        st.divide_inputs(s)
