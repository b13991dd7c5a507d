"""The L2 prefetch of the next large weight (kernels/pdl.py: l2_next_target / l2_next_args) on the host side: which
storage it picks, how many lines a row, and that the model's o_proj -> gate_up link is not a submodule."""

from __future__ import annotations

import torch

from quanta.kernels import pdl
from quanta.models.llama import LlamaDecoderLayer


class _Cfg:
    hidden_size, intermediate_size, num_attention_heads, num_key_value_heads = 64, 128, 4, 2
    rms_norm_eps, max_position_embeddings, rope_theta = 1e-5, 128, 10000.0


def test_layer_links_o_proj_to_gate_up_without_a_submodule() -> None:
    layer = LlamaDecoderLayer(_Cfg())
    assert layer.self_attn.o_proj.l2_next[0] is layer.mlp.gate_up_proj
    names = {n for n, _ in layer.named_modules()}
    assert "self_attn.o_proj.l2_next" not in names and len(names) == len(set(names))
    assert not any("l2_next" in k for k in layer.state_dict())


def test_target_off_by_default_and_on_cpu(monkeypatch) -> None:
    layer = LlamaDecoderLayer(_Cfg())
    assert pdl.l2_next_target(layer.self_attn.o_proj) is None  # QUANTA_L2_NEXT_MB 0
    monkeypatch.setattr(pdl, "_NEXT_BYTES", 1 << 20)
    assert pdl.l2_next_target(layer.self_attn.o_proj) is None  # CPU weights: nothing to prefetch
    assert pdl.l2_next_target(layer.mlp.gate_up_proj) is None  # no link


def test_args_lines_a_row(monkeypatch) -> None:
    monkeypatch.setattr(pdl, "_NEXT_BYTES", 4 << 20)
    w = torch.empty(16384, 2048, dtype=torch.bfloat16)  # 4 KiB rows: 4 MiB is 2 lines of each
    args = pdl.l2_next_args(w, True, 4)
    assert (args["nf_rows"], args["nf_stride"], args["nf_lines"], args["NF_CHUNK"]) == (16384, 4096, 2, 128)
    assert pdl.l2_next_args(w, False, 4) == {} and pdl.l2_next_args(None, True, 4) == {}
    monkeypatch.setattr(pdl, "_NEXT_BYTES", 1 << 30)  # more than the weight: whole rows
    assert pdl.l2_next_args(w, True, 8)["nf_lines"] == 32
    words = torch.empty(64, 16, 32, 8, dtype=torch.int32)  # mma words: a 16-row tile's groups are one "row"
    monkeypatch.setattr(pdl, "_NEXT_BYTES", 1 << 10)
    assert pdl.l2_next_args(words, True, 4)["nf_lines"] == 1  # at least one line a row
