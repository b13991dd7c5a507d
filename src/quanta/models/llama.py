"""Llama decoder (Llama 2/3/3.1/3.2). Qwen2, Qwen3 and Mistral reuse it with small switches.

Structure only: quantization, tensor parallelism and LoRA live in the shared layers.
"""

from __future__ import annotations

import torch
from torch import nn

from quanta.layers import fast_ops
from quanta.layers.attention import Attention
from quanta.layers.embedding import LMHead, VocabEmbedding
from quanta.layers.linear import Linear, MergedLinear
from quanta.layers.norm import RMSNorm
from quanta.layers.rotary import RotaryEmbedding, rope_params


class LlamaAttention(nn.Module):
    qkv_bias_default = False
    use_qk_norm = False

    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        bias = bool(getattr(config, "attention_bias", self.qkv_bias_default)) or self.qkv_bias_default
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = MergedLinear(config.hidden_size, {"q": q_size, "k": kv_size, "v": kv_size}, bias=bias)
        self.o_proj = Linear(q_size, config.hidden_size, bias=bool(getattr(config, "attention_bias", False)))
        theta, scaling = rope_params(config)
        self.rotary = RotaryEmbedding(self.head_dim, config.max_position_embeddings, theta, scaling)
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5)
        if self.use_qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.split = (q_size, kv_size, kv_size)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [T, hidden_size]
        return self.attend(positions, self.qkv_proj(hidden))

    def attend(self, positions: torch.Tensor, qkv: torch.Tensor) -> torch.Tensor:
        """Everything after the qkv projection (the decoder layer may fuse that projection with its norm)."""
        return fast_ops.decode_linear(self.o_proj, self.attend_core(positions, qkv))

    def attend_core(self, positions: torch.Tensor, qkv: torch.Tensor) -> torch.Tensor:
        """attend() up to o_proj's input (the decoder layer may fuse o_proj with the add + norm after it)."""
        q, k, v = qkv.split(self.split, dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)  # [T, H, D]
        k = k.view(-1, self.num_kv_heads, self.head_dim)  # [T, KH, D]
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.use_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return self.attn(q, k, v, rope=(self.rotary, positions))


class LlamaMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        inter = config.intermediate_size
        bias = bool(getattr(config, "mlp_bias", False))
        self.gate_up_proj = MergedLinear(config.hidden_size, {"gate": inter, "up": inter}, bias=bias)
        self.down_proj = Linear(inter, config.hidden_size, bias=bias)
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported (only 'silu')")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.gate_up_proj(x))

    def down(self, gate_up: torch.Tensor) -> torch.Tensor:
        return fast_ops.silu_mul_linear(gate_up, self.down_proj)


class LlamaDecoderLayer(nn.Module):
    attention_cls = LlamaAttention

    def __init__(self, config):
        super().__init__()
        self.self_attn = self.attention_cls(config)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    next_layer: tuple = ()  # (the next decoder layer,) set by LlamaModel (a tuple: not a submodule)

    def forward(self, positions, hidden, residual):
        # norm -> projection pairs go through fast_ops.norm_linear: one fused GEMV on small CUDA batches; one int4
        # row may split an add + norm across the GEMVs around it (fast_ops.linear_add_norm): hidden a Prenormed
        attn, mlp = self.self_attn, self.mlp
        qkv, residual = fast_ops.norm_linear(self.input_layernorm, attn.qkv_proj, hidden, residual)
        hidden, residual = fast_ops.linear_add_norm(attn.o_proj, attn.attend_core(positions, qkv), residual,
                                                    self.post_attention_layernorm, mlp.gate_up_proj, silu=True)
        nxt = self.next_layer[0] if self.next_layer else None
        return fast_ops.norm_mlp(self.post_attention_layernorm, mlp, hidden, residual, nxt)


class LlamaModel(nn.Module):
    def __init__(self, config, layer_cls=LlamaDecoderLayer):
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([layer_cls(config) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        for layer, nxt in zip(self.layers[:-1], self.layers[1:]):
            layer.next_layer = (nxt,)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None  # [T, hidden]
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    layer_cls = LlamaDecoderLayer
    # checkpoint name fragment -> (our param fragment, shard id)
    stacked_params = [
        (".q_proj.", ".qkv_proj.", "q"),
        (".k_proj.", ".qkv_proj.", "k"),
        (".v_proj.", ".qkv_proj.", "v"),
        (".gate_proj.", ".gate_up_proj.", "gate"),
        (".up_proj.", ".gate_up_proj.", "up"),
    ]

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, self.layer_cls)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        tied = self.model.embed_tokens if self.tie_word_embeddings else None
        self.lm_head = LMHead(config.vocab_size, config.hidden_size, tied_to=tied)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)  # [T, hidden]

    def compute_logits(self, hidden: torch.Tensor, float32: bool = True) -> torch.Tensor:
        return self.lm_head(hidden, float32)  # [N, vocab] float32 (else the model's dtype)

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]
