#!/usr/bin/env python3
"""Train quanta's tiny default model and its tokenizer, reproducibly, from scratch.

Phases (each is timed and logged, the times go into ``train_summary.json``):

1. load the corpora from ``--data-dir/corpora`` (TinyStories head, C4 head, tiny-shakespeare)
   and split off held-out text that is never trained on;
2. sample synthetic stories from the small ``--data-dir/stories260K`` Llama model with
   ``transformers`` ``generate`` (batched, capped by ``--gen-sequences`` and ``--gen-seconds``);
3. train a byte-level BPE tokenizer (HF ``tokenizers``), BOS-prepending post-processor,
   ByteLevel decoder, special tokens ``<|pad|>``=0, ``<s>``=1, ``</s>``=2;
4. tokenize everything into one packed token stream (each document is ``<s> ... </s>``);
5. train a ``LlamaForCausalLM`` (GQA, tied embeddings, ~5.8M parameters) with a plain
   PyTorch loop: AdamW, linear warmup + cosine decay over a wall-clock budget
   (``--train-seconds``), bf16 autocast on CUDA, random windows of the packed stream;
6. evaluate held-out loss / perplexity (per token of our tokenizer) and bits-per-byte;
7. save model (bf16 safetensors) + generation config + tokenizer files into ``--out``;
8. reload the folder with ``AutoModelForCausalLM`` / ``AutoTokenizer``, check the tokenizer
   round-trips text, re-evaluate the saved bf16 weights and write a greedy sample.

Typical GPU run (about 8 minutes on one H100)::

    python scripts/train_tiny_model.py --data-dir .carry/train_data --out out/quanta-tiny

Toy CPU smoke test (about a minute on 2 cores)::

    python scripts/train_tiny_model.py --device cpu --data-dir .carry/train_data \
        --gen-sequences 8 --gen-max-new-tokens 32 --train-seconds 20 --batch-size 8 \
        --seq-len 128 --out /tmp/tiny_out

Works with torch >= 2.4 and transformers 5.x (4.4x is expected to work too).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

T_START = time.time()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

PAD, BOS, EOS = "<|pad|>", "<s>", "</s>"
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2

# A deliberately simple, model-agnostic chat template (the model is a story model, not a chat
# model; this only gives engines something standard to render).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] }}\n"
    "{% else %}Assistant: {{ message['content'] }}{{ eos_token }}\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

GEN_PROMPTS = [
    "Once upon a time", "Once upon a time", "Once upon a time", "One day", "One day,",
    "Once there was", "There was a", "Tom and", "Lily and", "Ben and", "Sue and",
    "A little girl named", "A little boy named", "The little", "The big", "Mom said",
    "The cat", "The dog", "The sun was", "In a small town", "Max wanted", "Sara liked",
    "The bird", "Timmy had a", "Anna saw", "It was a sunny day.",
]

ROUNDTRIP_TEXTS = [
    "Once upon a time, there was a little girl named Lily.",
    "  leading spaces, trailing spaces  ",
    "Line one.\n\nLine two\twith a tab.\n",
    "Unicode: naïve café, Grüße, 日本語, emoji 🙂🚀!",
    'Code: def f(x):\n    return {"a": [1, 2, 3]}  # comment',
    "First Citizen:\nBefore we proceed any further, hear me speak.",
]


def log(msg: str) -> None:
    print(f"[{time.time() - T_START:7.1f}s] {msg}", flush=True)


PHASES: dict[str, float] = {}


@contextmanager
def phase(name: str):
    t0 = time.time()
    log(f"=== phase {name} ===")
    try:
        yield
    finally:
        PHASES[name] = round(time.time() - t0, 2)
        log(f"=== phase {name} done in {PHASES[name]:.1f}s ===")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

STORY_STARTS = ("Once upon a time", "Once there was", "Once there lived", "There once was", "Once, ")


def load_tinystories(path: Path) -> list[str]:
    """Stories are not delimited in the head file: paragraphs are separated by blank lines, and
    a new story is assumed where a paragraph opens like a story does."""
    paras = [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    stories: list[list[str]] = []
    for p in paras:
        if not stories or p.startswith(STORY_STARTS):
            stories.append([p])
        else:
            stories[-1].append(p)
    return ["\n\n".join(s) for s in stories]


def load_c4(path: Path) -> list[str]:
    out = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                t = json.loads(line)["text"].strip()
                if t:
                    out.append(t)
    return out


def load_shakespeare(path: Path, chunk_chars: int = 4000) -> list[str]:
    """Chunk the play text into ~4 KB documents on speech boundaries."""
    speeches = [s.strip() for s in path.read_text(encoding="utf-8").split("\n\n") if s.strip()]
    docs, cur, n = [], [], 0
    for s in speeches:
        cur.append(s)
        n += len(s)
        if n >= chunk_chars:
            docs.append("\n\n".join(cur))
            cur, n = [], 0
    if cur:
        docs.append("\n\n".join(cur))
    return docs


def trim_to_sentence(text: str) -> str:
    cut = max(text.rfind(c) for c in (".", "!", "?"))
    if cut > 0:
        end = cut + 1
        if end < len(text) and text[end] == '"':
            end += 1
        return text[:end]
    return text


def generate_stories(args, device: torch.device) -> list[str]:
    """Sample stories from the stories260K model until --gen-sequences or --gen-seconds."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    t0 = time.time()
    deadline = t0 + args.gen_seconds
    gdir = Path(args.data_dir) / "stories260K"
    gtok = Tokenizer.from_file(str(gdir / "tokenizer.json"))
    gmodel = AutoModelForCausalLM.from_pretrained(str(gdir), dtype=torch.float32).to(device).eval()
    max_pos = int(getattr(gmodel.config, "max_position_embeddings", 512))
    gbos = int(gmodel.config.bos_token_id if gmodel.config.bos_token_id is not None else 1)
    geos = int(gmodel.config.eos_token_id if gmodel.config.eos_token_id is not None else 2)
    gpad = 0  # <unk> in the llama2.c tokenizer; masked out anyway

    prompt_ids = []
    for p in GEN_PROMPTS:
        ids = gtok.encode(p, add_special_tokens=False).ids
        prompt_ids.append([gbos] + ids)
    max_prompt = max(len(p) for p in prompt_ids)
    max_new = min(args.gen_max_new_tokens, max_pos - max_prompt)
    rng = random.Random(args.seed + 1)

    stories: list[str] = []
    seen: set[str] = set()
    n_sampled = n_gen_tokens = 0
    chunk = 0
    while n_sampled < args.gen_sequences:
        remaining = deadline - time.time()
        if remaining < 1.0:
            log(f"gen: time budget reached after {chunk} chunks")
            break
        bs = min(args.gen_batch, args.gen_sequences - n_sampled)
        rows = [prompt_ids[rng.randrange(len(prompt_ids))] for _ in range(bs)]
        plen = max(len(r) for r in rows)
        inp = torch.full((bs, plen), gpad, dtype=torch.long)
        att = torch.zeros((bs, plen), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding
            inp[i, plen - len(r):] = torch.tensor(r)
            att[i, plen - len(r):] = 1
        tc = time.time()
        with torch.inference_mode():
            out = gmodel.generate(
                input_ids=inp.to(device), attention_mask=att.to(device),
                do_sample=True, temperature=args.gen_temperature, top_p=args.gen_top_p, top_k=0,
                max_new_tokens=max_new, pad_token_id=gpad, eos_token_id=geos, bos_token_id=gbos,
                max_time=max(1.0, remaining),
            )
        sync(device)
        dt = time.time() - tc
        new = out[:, plen:].cpu().tolist()
        # llama2.c models separate stories with BOS (and rarely emit EOS): split each sample
        # into stories at BOS; a segment is complete if a BOS/EOS follows it.
        seqs = []
        for r, g in zip(rows, new):
            if geos in g:
                g = g[: g.index(geos)] + [gbos]
            if gpad in g:
                g = [t for t in g if t != gpad]
            n_gen_tokens += len(g)
            start, first = 0, True
            while True:
                try:
                    end = g.index(gbos, start)
                except ValueError:
                    break
                seqs.append(((r[1:] if first else []) + g[start:end], True))
                start, first = end + 1, False
            if start < len(g):
                seqs.append(((r[1:] if first else []) + g[start:], False))
        texts = gtok.decode_batch([s for s, _ in seqs], skip_special_tokens=True)
        for text, (_, complete) in zip(texts, seqs):
            text = text.strip()
            if not complete:
                text = trim_to_sentence(text)
            # TinyStories separates paragraphs with a blank line; llama2.c samples use one "\n"
            text = "\n\n".join(p.strip() for p in text.split("\n") if p.strip())
            if len(text) >= args.gen_min_chars and text not in seen:
                seen.add(text)
                stories.append(text)
        n_sampled += bs
        chunk += 1
        log(f"gen chunk {chunk}: batch {bs} x <= {max_new} new tokens in {dt:.1f}s "
            f"({bs * (out.shape[1] - plen) / max(dt, 1e-9) / 1e3:.0f}k new tok/s), "
            f"{len(stories)} stories kept of {n_sampled} sampled, {time.time() - t0:.0f}s used")
    del gmodel
    if device.type == "cuda":
        torch.cuda.empty_cache()
    log(f"gen: {len(stories)} stories, {sum(map(len, stories)) / 1e6:.2f}M chars, "
        f"{n_gen_tokens / 1e6:.2f}M stories260K tokens")
    return stories


def stories260k_reference_bpb(args, docs: list[str], device: torch.device) -> float | None:
    """Bits per byte of the generator model on our held-out TinyStories, as a reference."""
    try:
        from tokenizers import Tokenizer
        from transformers import AutoModelForCausalLM

        gdir = Path(args.data_dir) / "stories260K"
        gtok = Tokenizer.from_file(str(gdir / "tokenizer.json"))
        gm = AutoModelForCausalLM.from_pretrained(str(gdir), dtype=torch.float32).to(device).eval()
        stream = []
        for e in gtok.encode_batch(docs, add_special_tokens=False):
            stream += [1] + e.ids  # llama2.c convention: stories are only BOS-separated
        t = torch.tensor(stream, dtype=torch.long)
        nats, _, n = eval_stream(gm, t, min(512, args.seq_len), 64, device, amp=False)
        nbytes = sum(len(d.encode("utf-8")) for d in docs)
        del gm
        return nats / math.log(2) / nbytes
    except Exception as e:  # reference only: never fail the run for it
        log(f"stories260K reference eval failed: {e!r}")
        return None


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

def train_tokenizer(docs_iter, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(docs_iter, trainer=trainer)
    assert tok.token_to_id(PAD) == PAD_ID and tok.token_to_id(BOS) == BOS_ID
    assert tok.token_to_id(EOS) == EOS_ID
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, BOS_ID)]
    )
    return tok


def save_tokenizer(tok, out: Path, model_max_length: int) -> None:
    tok.save(str(out / "tokenizer.json"))
    added = {
        str(i): {"content": c, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": True}
        for i, c in ((PAD_ID, PAD), (BOS_ID, BOS), (EOS_ID, EOS))
    }
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": None,
        "added_tokens_decoder": added,
        "model_max_length": model_max_length,
        "padding_side": "left",
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}, indent=2) + "\n")


def encode_docs(tok, docs: list[str]) -> list[np.ndarray]:
    """Each document becomes <s> ids </s>."""
    out = []
    for i in range(0, len(docs), 8192):  # chunked: Encoding objects are memory-hungry
        for e in tok.encode_batch(docs[i: i + 8192], add_special_tokens=False):
            a = np.empty(len(e.ids) + 2, dtype=np.int32)
            a[0], a[-1] = BOS_ID, EOS_ID
            a[1:-1] = e.ids
            out.append(a)
    return out


def pack(parts: list[np.ndarray]) -> torch.Tensor:
    if not parts:
        return torch.zeros(0, dtype=torch.long)
    return torch.from_numpy(np.concatenate(parts).astype(np.int64))


# --------------------------------------------------------------------------------------------
# Model / training / eval
# --------------------------------------------------------------------------------------------

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


@torch.no_grad()
def eval_stream(model, stream: torch.Tensor, seq_len: int, batch: int, device, amp: bool,
                token_bytes: torch.Tensor | None = None, max_tokens: int = 0):
    """Sum of next-token NLL (nats) over non-overlapping windows of the stream; returns
    (sum_nats, sum_target_bytes, n_targets)."""
    was_training = model.training
    model.eval()
    if max_tokens and stream.numel() > max_tokens + 1:
        stream = stream[: max_tokens + 1]
    n = stream.numel() - 1
    if n <= 0:
        return 0.0, 0, 0
    T = min(seq_len, n)
    nw = n // T
    X = stream[: nw * T].view(nw, T)
    Y = stream[1: nw * T + 1].view(nw, T)
    batches = [(X[i: i + batch], Y[i: i + batch]) for i in range(0, nw, batch)]
    if nw * T < n:  # the tail, so that every token of the stream is scored
        batches.append((stream[nw * T: n].view(1, -1), stream[nw * T + 1: n + 1].view(1, -1)))
    tot = torch.zeros((), dtype=torch.float64, device=device)
    nbytes = 0
    for xb, yb in batches:
        x = xb.to(device, non_blocking=True)
        y = yb.to(device, non_blocking=True)
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if amp else nullcontext()
        with ctx:
            logits = model(input_ids=x, use_cache=False).logits
        tot += F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1),
                               reduction="sum").double()
        if token_bytes is not None:
            nbytes += int(token_bytes[yb].sum())
    if was_training:
        model.train()
    return float(tot), nbytes, n


def metrics(nats: float, nbytes: int, n: int) -> dict:
    if n == 0:
        return {"tokens": 0}
    loss = nats / n
    return {"loss": round(loss, 4), "ppl": round(math.exp(loss), 3),
            "bpb": round(nats / math.log(2) / max(nbytes, 1), 4), "tokens": n}


def train(args, model, train_stream: torch.Tensor, evals: dict, token_bytes, device):
    amp = device.type == "cuda"
    B, T = args.batch_size, args.seq_len
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    opt_kw = dict(lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    if device.type == "cuda":
        opt_kw["fused"] = True
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], **opt_kw)
    fwd = torch.compile(model) if args.compile else model

    data = train_stream.to(device)
    N = data.numel()
    assert N > T + 1, f"training stream too short ({N} tokens) for seq_len {T}"
    offs = torch.arange(T + 1, device=device)
    gen = torch.Generator(device=device)
    gen.manual_seed(args.seed)

    budget = args.train_seconds
    if args.total_seconds:
        reserve = args.reserve_seconds
        budget = max(5.0, min(budget, args.total_seconds - (time.time() - T_START) - reserve))
        if budget < args.train_seconds:
            log(f"train: budget cut to {budget:.0f}s by --total-seconds {args.total_seconds}")
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
        w = data[ix[:, None] + offs]
        x, y = w[:, :-1], w[:, 1:]
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if amp else nullcontext()
        with ctx:
            logits = fwd(input_ids=x, use_cache=False).logits
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


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--data-dir", default=".carry/train_data",
                    help="folder with corpora/ (tinystories_valid_head.txt, c4_en_head1000.jsonl, "
                         "tinyshakespeare.txt) and stories260K/ (HF Llama + tokenizer.json)")
    ap.add_argument("--out", default="out/quanta-tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--total-seconds", type=float, default=0.0,
                    help="if > 0, shrink the training budget so the whole script ends by then")
    ap.add_argument("--reserve-seconds", type=float, default=45.0,
                    help="time kept for eval/save/verify when --total-seconds is used")
    # generation
    ap.add_argument("--gen-sequences", type=int, default=131072)
    ap.add_argument("--gen-batch", type=int, default=8192)
    ap.add_argument("--gen-max-new-tokens", type=int, default=400)
    ap.add_argument("--gen-seconds", type=float, default=120.0)
    ap.add_argument("--gen-temperature", type=float, default=0.9)
    ap.add_argument("--gen-top-p", type=float, default=0.95)
    ap.add_argument("--gen-min-chars", type=int, default=60)
    ap.add_argument("--gen-holdout-frac", type=float, default=0.02)
    # data mixture / tokenizer
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--tinystories-holdout-frac", type=float, default=0.05)
    ap.add_argument("--tinystories-repeat", type=int, default=3,
                    help="upsampling of the real TinyStories text in the training stream")
    ap.add_argument("--c4-repeat", type=int, default=1)
    ap.add_argument("--shakespeare-repeat", type=int, default=1)
    ap.add_argument("--tok-max-gen-chars", type=int, default=8_000_000,
                    help="at most this many chars of generated text feed the BPE trainer")
    # model
    ap.add_argument("--hidden-size", type=int, default=256)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--num-kv-heads", type=int, default=2)
    ap.add_argument("--intermediate-size", type=int, default=768)
    ap.add_argument("--num-layers", type=int, default=6)
    ap.add_argument("--max-position-embeddings", type=int, default=1024)
    # training
    ap.add_argument("--train-seconds", type=float, default=300.0)
    ap.add_argument("--max-steps", type=int, default=0, help="optional step cap (0 = time only)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--warmup-steps", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (costs compile time)")
    ap.add_argument("--log-seconds", type=float, default=10.0, help="progress line interval")
    ap.add_argument("--eval-every-seconds", type=float, default=20.0)
    ap.add_argument("--no-keep-best", dest="keep_best", action="store_false",
                    help="save the last weights instead of the best periodic-eval weights")
    ap.add_argument("--eval-batch", type=int, default=64)
    ap.add_argument("--eval-max-tokens", type=int, default=500_000)
    ap.add_argument("--sample-tokens", type=int, default=60)
    ap.add_argument("--skip-reference", action="store_true",
                    help="skip the stories260K bits-per-byte reference on held-out TinyStories")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = Path(args.data_dir)
    import tokenizers
    import transformers

    env = {"python": sys.version.split()[0], "torch": torch.__version__,
           "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
           "device": str(device),
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    log(f"env: {env}")
    PHASES["startup"] = round(time.time() - T_START, 2)

    with phase("load_corpora"):
        cdir = data_dir / "corpora"
        ts = load_tinystories(cdir / "tinystories_valid_head.txt")
        n_hold = max(1, int(round(len(ts) * args.tinystories_holdout_frac)))
        ts_train, ts_hold = ts[:-n_hold], ts[-n_hold:]
        c4 = load_c4(cdir / "c4_en_head1000.jsonl")
        sp = load_shakespeare(cdir / "tinyshakespeare.txt")
        log(f"tinystories: {len(ts)} stories ({len(ts_train)} train / {len(ts_hold)} held out), "
            f"c4: {len(c4)} docs, shakespeare: {len(sp)} chunks")

    with phase("generate"):
        gen = generate_stories(args, device) if args.gen_sequences > 0 and args.gen_seconds > 0 else []
        # every k-th story is held out (spread over all chunks, not just the last one)
        k = max(2, int(round(1.0 / args.gen_holdout_frac))) if args.gen_holdout_frac > 0 else 0
        gen_hold = [g for i, g in enumerate(gen) if k and i % k == k // 2]
        gen_train = [g for i, g in enumerate(gen) if not (k and i % k == k // 2)]
        if not gen_hold and len(gen_train) >= 2 and k:
            gen_hold = [gen_train.pop()]
        log(f"generated: {len(gen_train)} train / {len(gen_hold)} held out")

    with phase("tokenizer"):
        def tok_docs():
            yield from ts_train
            yield from c4
            yield from sp
            n = 0
            for s in gen_train:
                if n >= args.tok_max_gen_chars:
                    break
                n += len(s)
                yield s

        tok = train_tokenizer(tok_docs(), args.vocab_size)
        vocab = tok.get_vocab_size()
        log(f"tokenizer: vocab {vocab}")
        assert vocab <= args.vocab_size

    with phase("encode"):
        rng = random.Random(args.seed)
        ts_parts, c4_parts = encode_docs(tok, ts_train), encode_docs(tok, c4)
        sp_parts, gen_parts = encode_docs(tok, sp), encode_docs(tok, gen_train)
        parts = (ts_parts * args.tinystories_repeat + c4_parts * args.c4_repeat
                 + sp_parts * args.shakespeare_repeat + gen_parts)
        rng.shuffle(parts)
        train_stream = pack(parts)
        hold = {"tinystories_heldout": pack(encode_docs(tok, ts_hold))}
        if gen_hold:
            hold["generated_heldout"] = pack(encode_docs(tok, gen_hold))
        # bytes of each token (ByteLevel: one vocab char per byte; specials are 0 bytes)
        token_bytes = torch.tensor(
            [0 if i in (PAD_ID, BOS_ID, EOS_ID) else len(tok.id_to_token(i) or "")
             for i in range(args.vocab_size)], dtype=torch.long)

        def ntok(ps):
            return int(sum(len(p) for p in ps))

        mix = {
            "tinystories_real": ntok(ts_parts) * args.tinystories_repeat,
            "generated": ntok(gen_parts),
            "c4": ntok(c4_parts) * args.c4_repeat,
            "shakespeare": ntok(sp_parts) * args.shakespeare_repeat,
        }
        uniq = ntok(ts_parts) + ntok(c4_parts) + ntok(sp_parts) + ntok(gen_parts)
        chars = sum(map(len, ts_train)) + sum(map(len, c4)) + sum(map(len, sp)) + sum(map(len, gen_train))
        log(f"train stream {train_stream.numel() / 1e6:.2f}M tokens (with repeats); mix {mix}; "
            f"{uniq / 1e6:.2f}M unique tokens, {chars / max(1, uniq):.2f} chars/token")
        log("held-out tokens: " + ", ".join(f"{k}={v.numel()}" for k, v in hold.items()))

    with phase("train"):
        from transformers import GenerationConfig, LlamaForCausalLM

        torch.manual_seed(args.seed)
        config = build_config(args, args.vocab_size)
        model = LlamaForCausalLM(config).to(device)
        n_params = sum(p.numel() for p in model.parameters())
        log(f"model: {n_params / 1e6:.3f}M params (tied embeddings), "
            f"{n_params * 2 / 1e6:.1f} MB as bf16")
        tr = train(args, model, train_stream, hold, token_bytes, device)

    amp = device.type == "cuda"
    with phase("eval"):
        final_eval = {}
        for name, s in hold.items():
            final_eval[name] = metrics(*eval_stream(model, s, args.seq_len, args.eval_batch, device,
                                                    amp, token_bytes, args.eval_max_tokens))
            log(f"held-out {name} (training weights): {final_eval[name]}")
        ref_bpb = None
        if not args.skip_reference:
            ref_bpb = stories260k_reference_bpb(args, ts_hold, device)
            log(f"reference: stories260K bits/byte on held-out tinystories = {ref_bpb}")

    with phase("save"):
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
        save_tokenizer(tok, out, args.max_position_embeddings)
        sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
        log(f"saved {out}: {sizes}")
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()

    with phase("verify"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        htok = AutoTokenizer.from_pretrained(str(out))
        ids = htok("Once upon a time")["input_ids"]
        assert ids[0] == BOS_ID, ids
        assert htok.bos_token == BOS and htok.eos_token == EOS and htok.pad_token == PAD
        assert htok.bos_token_id == BOS_ID and htok.eos_token_id == EOS_ID and htok.pad_token_id == PAD_ID
        for t in ROUNDTRIP_TEXTS:
            enc = htok(t)["input_ids"]
            assert enc[0] == BOS_ID
            dec = htok.decode(enc, skip_special_tokens=True)
            assert dec == t, (t, dec)
            assert tok.decode(tok.encode(t).ids, skip_special_tokens=True) == t
        chat = htok.apply_chat_template([{"role": "user", "content": "Tell me a story."}],
                                        tokenize=False, add_generation_prompt=True)
        log(f"tokenizer OK: class {type(htok).__name__}, 'Once upon a time' -> {ids}, "
            f"round-trip of {len(ROUNDTRIP_TEXTS)} texts OK, chat template renders {chat!r}")

        hm = AutoModelForCausalLM.from_pretrained(str(out))
        dtype_loaded = str(next(hm.parameters()).dtype)
        hm = hm.to(device).eval()
        if device.type != "cuda":
            hm = hm.float()  # bf16 matmuls on CPU are slow; weights are bf16-exact anyway
        saved_eval = {}
        for name, s in hold.items():
            saved_eval[name] = metrics(*eval_stream(hm, s, args.seq_len, args.eval_batch, device,
                                                    amp, token_bytes, args.eval_max_tokens))
            log(f"held-out {name} (saved bf16 model): {saved_eval[name]}")
        enc = htok("Once upon a time", return_tensors="pt").to(device)
        with torch.inference_mode():
            g = hm.generate(**enc, max_new_tokens=args.sample_tokens, do_sample=False,
                            pad_token_id=PAD_ID)
        greedy = htok.decode(g[0], skip_special_tokens=True)
        log(f"greedy sample: {greedy!r}")
        torch.manual_seed(args.seed)
        samples = []
        for prompt in ("Once upon a time", "Tom and Lily"):
            enc = htok(prompt, return_tensors="pt").to(device)
            with torch.inference_mode():
                g = hm.generate(**enc, max_new_tokens=args.sample_tokens, do_sample=True,
                                temperature=0.8, top_p=0.95, top_k=0, pad_token_id=PAD_ID)
            samples.append(htok.decode(g[0], skip_special_tokens=True))
            log(f"sampled (T=0.8): {samples[-1]!r}")

    summary = {
        "env": env,
        "args": vars(args),
        "params": n_params,
        "model_bytes_on_disk": sizes.get("model.safetensors"),
        "config": {k: cfg[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                       "num_key_value_heads", "head_dim", "intermediate_size",
                                       "vocab_size", "max_position_embeddings", "rope_theta",
                                       "tie_word_embeddings")},
        "data": {
            "tinystories_stories_train": len(ts_train), "tinystories_stories_heldout": len(ts_hold),
            "c4_docs": len(c4), "shakespeare_chunks": len(sp),
            "generated_stories_train": len(gen_train), "generated_stories_heldout": len(gen_hold),
            "train_stream_tokens": int(train_stream.numel()), "mix_tokens": mix,
            "heldout_tokens": {k: int(v.numel()) for k, v in hold.items()},
        },
        "tokenizer_vocab": vocab,
        "training": {k: v for k, v in tr.items() if k != "history"},
        "tokens_seen": tr["tokens_seen"],
        "train_loss": tr["final_train_loss"],
        "heldout_training_weights": final_eval,
        "heldout": saved_eval,
        "reference_stories260K_bpb_tinystories_heldout": ref_bpb,
        "loaded_dtype": dtype_loaded,
        "greedy_once_upon_a_time": greedy,
        "samples_t0.8": samples,
        "phase_seconds": PHASES,
        "total_seconds": round(time.time() - T_START, 1),
        "history": tr["history"],
    }
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    log(f"phases (s): {PHASES}")
    log(f"done in {summary['total_seconds']}s; summary in {out / 'train_summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
