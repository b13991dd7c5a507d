"""Held-out loss / perplexity / bits-per-byte, the reload checks of the saved folder, samples."""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from .common import BOS, BOS_ID, EOS, EOS_ID, PAD, PAD_ID, log

ROUNDTRIP_TEXTS = [
    "Once upon a time, there was a little girl named Lily.",
    "  leading spaces, trailing spaces  ",
    "Line one.\n\nLine two\twith a tab.\n",
    "Unicode: naïve café, Grüße, 日本語, emoji 🙂🚀!",
    'Code: def f(x):\n    return {"a": [1, 2, 3]}  # comment',
    "First Citizen:\nBefore we proceed any further, hear me speak.",
]


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


def eval_heldout(model, hold: dict[str, torch.Tensor], args, device, amp: bool,
                 token_bytes: torch.Tensor, label: str) -> dict[str, dict]:
    """Metrics of every held-out stream; ``label`` names the weights in the log lines."""
    res = {}
    for name, s in hold.items():
        res[name] = metrics(*eval_stream(model, s, args.seq_len, args.eval_batch, device,
                                         amp, token_bytes, args.eval_max_tokens))
        log(f"held-out {name} ({label}): {res[name]}")
    return res


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


def check_reloaded_tokenizer(out: Path, tok):
    """Reload the tokenizer files with AutoTokenizer: BOS prepending, special tokens, lossless
    round-trip (also of the raw ``tok``) and the chat template. Returns the reloaded tokenizer."""
    from transformers import AutoTokenizer

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
    return htok


def check_reloaded_model(out: Path, htok, hold: dict[str, torch.Tensor], args, device, amp: bool,
                         token_bytes: torch.Tensor) -> dict:
    """Reload the saved bf16 model with AutoModelForCausalLM, re-evaluate it and sample from it
    (greedy, then two seeded T=0.8 samples)."""
    from transformers import AutoModelForCausalLM

    hm = AutoModelForCausalLM.from_pretrained(str(out))
    dtype_loaded = str(next(hm.parameters()).dtype)
    hm = hm.to(device).eval()
    if device.type != "cuda":
        hm = hm.float()  # bf16 matmuls on CPU are slow; weights are bf16-exact anyway
    saved_eval = eval_heldout(hm, hold, args, device, amp, token_bytes, "saved bf16 model")
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
    return {"heldout": saved_eval, "loaded_dtype": dtype_loaded, "greedy": greedy,
            "samples": samples}
