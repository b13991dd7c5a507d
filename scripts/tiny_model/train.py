"""Packed training stream, model config, the training loop and saving the model folder."""

from __future__ import annotations

import json
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .common import BOS_ID, EOS_ID, PAD_ID, T_START, log, sync
from .data import Corpora
from .evaluate import eval_stream, metrics
from .tokenizer import encode_docs, save_tokenizer, token_byte_lengths


@dataclass
class Streams:
    """Token streams of the run: each document is packed as ``<s> ids </s>``."""

    train: torch.Tensor  # [num_train_tokens] shuffled documents, with repeats
    hold: dict[str, torch.Tensor]  # held-out name -> [num_tokens]
    token_bytes: torch.Tensor  # [vocab_size] UTF-8 bytes of each token
    mix: dict[str, int]  # training tokens per source, with repeats


def pack(parts: list[np.ndarray]) -> torch.Tensor:
    if not parts:
        return torch.zeros(0, dtype=torch.long)
    return torch.from_numpy(np.concatenate(parts).astype(np.int64))


def build_streams(args, tok, corpora: Corpora, gen_train: list[str], gen_hold: list[str]) -> Streams:
    """Encode every document, upsample, shuffle (seeded) and pack the training stream."""
    c = corpora
    rng = random.Random(args.seed)
    ts_parts, c4_parts = encode_docs(tok, c.ts_train), encode_docs(tok, c.c4)
    sp_parts, gen_parts = encode_docs(tok, c.sp), encode_docs(tok, gen_train)
    parts = (ts_parts * args.tinystories_repeat + c4_parts * args.c4_repeat
             + sp_parts * args.shakespeare_repeat + gen_parts)
    rng.shuffle(parts)
    train_stream = pack(parts)
    hold = {"tinystories_heldout": pack(encode_docs(tok, c.ts_hold))}
    if gen_hold:
        hold["generated_heldout"] = pack(encode_docs(tok, gen_hold))
    token_bytes = token_byte_lengths(tok, args.vocab_size)

    def ntok(ps):
        return int(sum(len(p) for p in ps))

    mix = {
        "tinystories_real": ntok(ts_parts) * args.tinystories_repeat,
        "generated": ntok(gen_parts),
        "c4": ntok(c4_parts) * args.c4_repeat,
        "shakespeare": ntok(sp_parts) * args.shakespeare_repeat,
    }
    uniq = ntok(ts_parts) + ntok(c4_parts) + ntok(sp_parts) + ntok(gen_parts)
    chars = sum(map(len, c.ts_train)) + sum(map(len, c.c4)) + sum(map(len, c.sp)) + sum(map(len, gen_train))
    log(f"train stream {train_stream.numel() / 1e6:.2f}M tokens (with repeats); mix {mix}; "
        f"{uniq / 1e6:.2f}M unique tokens, {chars / max(1, uniq):.2f} chars/token")
    log("held-out tokens: " + ", ".join(f"{k}={v.numel()}" for k, v in hold.items()))
    return Streams(train=train_stream, hold=hold, token_bytes=token_bytes, mix=mix)


def build_config(args, vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.hidden_size // args.head_dim,
        num_key_value_heads=args.num_kv_heads,
        head_dim=args.head_dim,
        max_position_embeddings=args.max_position_embeddings,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        initializer_range=0.02,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        use_cache=True,
        attn_implementation="sdpa",
    )


def build_model(args, device: torch.device):
    """A freshly initialised (seeded) LlamaForCausalLM; returns (model, n_params)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(args.seed)
    config = build_config(args, args.vocab_size)
    model = LlamaForCausalLM(config).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.3f}M params (tied embeddings), "
        f"{n_params * 2 / 1e6:.1f} MB as bf16")
    return model, n_params


def make_optimizer(args, model, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    opt_kw = dict(lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    if device.type == "cuda":
        opt_kw["fused"] = True
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], **opt_kw)


def train_budget(args) -> float:
    """Training seconds: --train-seconds, cut so the run ends by --total-seconds if given."""
    budget = args.train_seconds
    if args.total_seconds:
        reserve = args.reserve_seconds
        budget = max(5.0, min(budget, args.total_seconds - (time.time() - T_START) - reserve))
        if budget < args.train_seconds:
            log(f"train: budget cut to {budget:.0f}s by --total-seconds {args.total_seconds}")
    return budget


def train(args, model, train_stream: torch.Tensor, evals: dict, token_bytes, device):
    amp = device.type == "cuda"
    B, T = args.batch_size, args.seq_len
    opt = make_optimizer(args, model, device)
    fwd = torch.compile(model) if args.compile else model

    data = train_stream.to(device)
    N = data.numel()
    assert N > T + 1, f"training stream too short ({N} tokens) for seq_len {T}"
    offs = torch.arange(T + 1, device=device)
    gen = torch.Generator(device=device)
    gen.manual_seed(args.seed)

    budget = train_budget(args)
    min_lr = args.lr * args.min_lr_frac

    def lr_at(step: int, elapsed: float) -> float:
        if step < args.warmup_steps:
            return args.lr * (step + 1) / args.warmup_steps
        p = min(1.0, elapsed / budget)
        if args.max_steps:
            p = max(p, step / args.max_steps)
        return min_lr + 0.5 * (args.lr - min_lr) * (1.0 + math.cos(math.pi * p))

    log(f"train: {N / 1e6:.2f}M-token stream, batch {B}x{T} = {B * T} tokens/step, "
        f"budget {budget:.0f}s, lr {args.lr} warmup {args.warmup_steps}, compile={args.compile}")
    model.train()
    history = []
    loss_acc = torch.zeros((), device=device)
    n_acc = 0
    step = 0
    t0 = time.time()
    t_log, tok_log = t0, 0
    next_eval = args.eval_every_seconds if args.eval_every_seconds > 0 else float("inf")
    last_loss = float("nan")
    # Early stopping on held-out loss (the data is reused for many epochs): keep the best
    # weights seen at the periodic evals. Selection uses the generated held-out split when there
    # is one, so the TinyStories held-out numbers stay a clean test set.
    sel_name = "generated_heldout" if "generated_heldout" in evals else "tinystories_heldout"
    best = {"loss": float("inf"), "step": -1, "state": None, "last": None}
    last_eval_step = -1

    def run_evals(tag: str):
        res = {}
        for name, st in evals.items():
            res[name] = metrics(*eval_stream(model, st, T, args.eval_batch, device, amp, token_bytes,
                                             args.eval_max_tokens))
            log(f"eval {tag} step {step} {name}: {res[name]}")
            history.append({"step": step, "eval": name, **res[name]})
        sel = res.get(sel_name, {}).get("loss")
        best["last"] = sel
        if args.keep_best and sel is not None and sel < best["loss"]:
            best.update(loss=sel, step=step,
                        state={k: v.detach().clone() for k, v in model.state_dict().items()})
        return res

    while True:
        elapsed = time.time() - t0
        if elapsed >= budget or (args.max_steps and step >= args.max_steps):
            break
        lr = lr_at(step, elapsed)
        for g in opt.param_groups:
            g["lr"] = lr
        ix = torch.randint(0, N - T - 1, (B,), device=device, generator=gen)
        w = data[ix[:, None] + offs]  # [B, T + 1]
        x, y = w[:, :-1], w[:, 1:]
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if amp else nullcontext()
        with ctx:
            logits = fwd(input_ids=x, use_cache=False).logits  # [B, T, vocab]
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_acc += loss.detach()
        n_acc += 1
        step += 1
        now = time.time()
        if step == 1 or now - t_log >= args.log_seconds:
            last_loss = float(loss_acc) / n_acc  # syncs
            now = time.time()
            tps = (step * B * T - tok_log) / max(now - t_log, 1e-9)
            log(f"step {step:6d} | loss {last_loss:.4f} | lr {lr:.2e} | {tps / 1e3:8.1f}k tok/s | "
                f"{step * B * T / 1e6:8.1f}M tok | train {now - t0:6.1f}s / {budget:.0f}s")
            history.append({"step": step, "loss": round(last_loss, 4),
                            "elapsed": round(now - t0, 1), "tok_per_s": round(tps)})
            loss_acc.zero_()
            n_acc = 0
            t_log, tok_log = now, step * B * T
        if now - t0 >= next_eval:
            run_evals("periodic")
            last_eval_step = step
            next_eval = time.time() - t0 + args.eval_every_seconds
    sync(device)
    train_time = time.time() - t0
    if n_acc:
        last_loss = float(loss_acc) / n_acc
    log(f"train: {step} steps, {step * B * T / 1e6:.1f}M tokens in {train_time:.1f}s "
        f"({step * B * T / train_time / 1e3:.1f}k tok/s), last loss {last_loss:.4f}")
    if last_eval_step != step:
        run_evals("final")
    chosen = step
    if args.keep_best and best["state"] is not None and best["step"] != step:
        log(f"restoring the best weights, from step {best['step']} ({sel_name} loss "
            f"{best['loss']:.4f} < {best['last']:.4f} at the end)")
        model.load_state_dict(best["state"])
        chosen = best["step"]
    best["state"] = None  # free the copy
    return {"steps": step, "tokens_seen": step * B * T, "train_seconds": round(train_time, 1),
            "final_train_loss": round(last_loss, 4), "selected_step": chosen,
            "selection_metric": sel_name, "history": history}


def save_model(model, tok, out: Path, max_position_embeddings: int) -> tuple[dict[str, int], dict]:
    """Save bf16 weights, generation config and tokenizer files; returns (file sizes, config)."""
    from transformers import GenerationConfig

    model = model.to(torch.bfloat16)
    model.config.use_cache = True
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                                               pad_token_id=PAD_ID)
    model.save_pretrained(str(out), max_shard_size="1GB")
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    # Spell the dtype and RoPE base both ways (transformers 5 writes "dtype" and
    # "rope_parameters"; older readers look for "torch_dtype" and "rope_theta").
    cfg["dtype"] = "bfloat16"
    cfg["torch_dtype"] = "bfloat16"
    cfg["rope_theta"] = 10000.0
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    save_tokenizer(tok, out, max_position_embeddings)
    sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    log(f"saved {out}: {sizes}")
    return sizes, cfg
