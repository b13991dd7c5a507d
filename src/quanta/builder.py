"""'Building' an engine: find the checkpoint, load the model, size the KV cache, wire the runner.

Resolves the LLM arguments once into a frozen EngineConfig.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from quanta import envs
from quanta.config import EngineConfig
from quanta.engine.engine import LLMEngine
from quanta.llmapi.llm_args import LlmArgs, resolve_dtype
from quanta.models.loader import build_model, load_hf_config, resolve_model_path
from quanta.worker.memory import kv_bytes_per_token, num_kv_blocks
from quanta.worker.model_runner import ModelRunner

logger = logging.getLogger("quanta")


@dataclass
class Built:
    engine: LLMEngine
    hf_config: object
    model_path: Path | None
    dtype: torch.dtype
    device: torch.device
    config: EngineConfig


def load_config_only(model, revision, trust_remote_code):
    """A config.json file (for dummy weights) or a model folder / Hub id."""
    p = Path(str(model)).expanduser()
    if p.is_file() and p.suffix == ".json":
        from transformers import AutoConfig, PretrainedConfig

        data = json.loads(p.read_text())
        model_type = data.get("model_type")
        cfg = AutoConfig.for_model(model_type, **{k: v for k, v in data.items() if k != "model_type"}) \
            if model_type else PretrainedConfig(**data)
        return cfg, None
    path = resolve_model_path(model, revision)
    return load_hf_config(path, trust_remote_code), path


def build(model, args: LlmArgs, dtype, revision, trust_remote_code, tokenizer) -> Built:
    hf_config, path = load_config_only(model, revision, trust_remote_code)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = resolve_dtype(dtype, hf_config, device)
    config = _engine_config(args, hf_config)
    from quanta.layers import fast_ops

    fast_ops.set_use_kernels(device.type == "cuda" and not args.disable_kernels)
    net = build_model(hf_config, path, torch_dtype, device, args.load_format, args.allow_pickle_weights)
    backend = args.attn_backend or ("triton" if device.type == "cuda" else "torch_ref")
    from quanta.quantization import quantize_for_build
    from quanta.quantization.kv_cache import kv_cache_dtype

    quantize_for_build(net, args.quant_config, args.calib_config, tokenizer if tokenizer is not None else path,
                       args.kv_cache_config.dtype, args.load_format, backend)
    kv_dtype = kv_cache_dtype(net) or torch_dtype  # int8 / fp8 when the KV cache is quantized
    from quanta.lora import attach_lora

    lora = attach_lora(net, args, device, torch_dtype, config.max_num_tokens)  # wraps projections; None = no LoRA
    runner = ModelRunner(net, device, torch_dtype, config.tokens_per_block, config.max_num_tokens,
                         config.max_batch_size, config.max_seq_len, backend)
    runner.lora = lora
    runner.profile_peak_bytes()
    attn = net.attention_layers()[0]
    per_token = kv_bytes_per_token(len(net.attention_layers()), attn.num_kv_heads, attn.head_dim, kv_dtype)
    blocks = num_kv_blocks(args.kv_cache_config, device, per_token, config.tokens_per_block,
                           config.max_batch_size * config.max_seq_len)
    runner.dtype = kv_dtype  # NOTE: allocate_kv_cache takes the cache dtype from here; restored just after
    runner.allocate_kv_cache(blocks)
    runner.dtype = torch_dtype
    kv = args.kv_cache_config
    host_blocks = (kv.host_cache_size or 0) // (per_token * config.tokens_per_block) if kv.enable_block_reuse else 0
    if kv.host_cache_size and not kv.enable_block_reuse:
        logger.warning("quanta: KvCacheConfig.host_cache_size is unused: it holds reusable blocks, and "
                       "enable_block_reuse=False")
    if host_blocks:
        runner.allocate_host_cache(host_blocks)
    runner.set_attention_windows(attention_windows(kv.max_attention_window, hf_config, len(net.attention_layers()),
                                                   config.max_seq_len))
    from dataclasses import replace

    overlap = (not args.disable_overlap_scheduler if args.disable_overlap_scheduler is not None
               else device.type == "cuda" or envs.get("QUANTA_OVERLAP"))
    config = replace(config, num_kv_blocks=blocks, num_host_kv_blocks=host_blocks, overlap_scheduler=overlap)
    kv_tokens = blocks * config.tokens_per_block
    logger.info("quanta: %s on %s (%s); KV cache %d tokens (%d blocks), max concurrency %.1f at max_seq_len",
                getattr(hf_config, "architectures", ["?"])[0], device, torch_dtype, kv_tokens, blocks,
                kv_tokens / config.max_seq_len)
    if device.type == "cuda" and not args.enforce_eager:
        runner.capture_cuda_graphs(config.max_batch_size)
    engine = LLMEngine(config, runner, tokenizer)
    if lora is not None:  # running sequences pin their adapters' device slots; admission leaves one free
        lora.scheduler = engine.scheduler
        engine.scheduler.admission_gate = lora.can_admit
    return Built(engine, hf_config, path, torch_dtype, device, config)


def _engine_config(args: LlmArgs, hf_config) -> EngineConfig:
    bc = args.build_config
    model_max = int(getattr(hf_config, "max_position_embeddings", 0) or 2048)
    max_seq_len = bc.max_seq_len or model_max
    if max_seq_len > model_max:
        raise ValueError(f"max_seq_len={max_seq_len} is larger than the model's max_position_embeddings={model_max}")
    max_input_len = bc.max_input_len or max_seq_len
    if max_input_len > max_seq_len:
        raise ValueError(f"max_input_len={max_input_len} is larger than max_seq_len={max_seq_len}")
    return EngineConfig(
        max_batch_size=bc.max_batch_size,
        max_num_tokens=bc.max_num_tokens,
        max_seq_len=max_seq_len,
        max_input_len=max_input_len,
        max_beam_width=bc.max_beam_width,
        tokens_per_block=args.kv_cache_config.tokens_per_block,
        num_kv_blocks=0,
        enable_chunked_prefill=args.enable_chunked_prefill,
        scheduler_policy=args.scheduler_config.capacity_scheduler_policy,
        gather_context_logits=bc.gather_context_logits,
        gather_generation_logits=bc.gather_generation_logits,
        context_chunking_policy=args.scheduler_config.context_chunking_policy,
        enable_block_reuse=args.kv_cache_config.enable_block_reuse,
        enable_partial_reuse=args.kv_cache_config.enable_partial_reuse,
    )


def attention_windows(max_attention_window, hf_config, num_layers: int, max_seq_len: int) -> list[int | None]:
    """Per-layer sliding window (attend to the last W tokens), None = full attention.

    KvCacheConfig.max_attention_window: an int for every layer, or a list repeated over the layers
    (TensorRT-LLM's form). The model's own `sliding_window` (Mistral; Qwen2 with use_sliding_window)
    applies too (per layer when the config has `layer_types`); where both are given, the smaller wins.
    A window of max_seq_len or more is no window."""
    model_w = getattr(hf_config, "sliding_window", None)
    if not getattr(hf_config, "use_sliding_window", True):  # Qwen2/3 carry a window they do not use
        model_w = None
    types = getattr(hf_config, "layer_types", None)  # Hugging Face's per-layer form
    model = [model_w if types is None or types[i] == "sliding_attention" else None for i in range(num_layers)]
    if max_attention_window is None:
        user = [None] * num_layers
    else:
        ws = max_attention_window if isinstance(max_attention_window, (list, tuple)) else [max_attention_window]
        user = [ws[i % len(ws)] for i in range(num_layers)]
    windows = [min((w for w in (u, m) if w), default=None) for u, m in zip(user, model)]
    return [w if w is not None and w < max_seq_len else None for w in windows]
