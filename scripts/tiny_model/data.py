"""Corpora loading, held-out splits and synthetic stories sampled from stories260K."""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .common import log, sync

STORY_STARTS = ("Once upon a time", "Once there was", "Once there lived", "There once was", "Once, ")

GEN_PROMPTS = [
    "Once upon a time", "Once upon a time", "Once upon a time", "One day", "One day,",
    "Once there was", "There was a", "Tom and", "Lily and", "Ben and", "Sue and",
    "A little girl named", "A little boy named", "The little", "The big", "Mom said",
    "The cat", "The dog", "The sun was", "In a small town", "Max wanted", "Sara liked",
    "The bird", "Timmy had a", "Anna saw", "It was a sunny day.",
]


@dataclass
class Corpora:
    """The text documents of the run, split into what is trained on and what is held out."""

    ts_train: list[str]  # real TinyStories, trained on
    ts_hold: list[str]  # real TinyStories, never trained on (the clean test set)
    c4: list[str]
    sp: list[str]  # tiny-shakespeare chunks


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


def load_corpora(data_dir: Path, tinystories_holdout_frac: float) -> Corpora:
    """Load the three corpora; the last stories of TinyStories are held out."""
    cdir = data_dir / "corpora"
    ts = load_tinystories(cdir / "tinystories_valid_head.txt")
    n_hold = max(1, int(round(len(ts) * tinystories_holdout_frac)))
    ts_train, ts_hold = ts[:-n_hold], ts[-n_hold:]
    c4 = load_c4(cdir / "c4_en_head1000.jsonl")
    sp = load_shakespeare(cdir / "tinyshakespeare.txt")
    log(f"tinystories: {len(ts)} stories ({len(ts_train)} train / {len(ts_hold)} held out), "
        f"c4: {len(c4)} docs, shakespeare: {len(sp)} chunks")
    return Corpora(ts_train=ts_train, ts_hold=ts_hold, c4=c4, sp=sp)


def split_generated(gen: list[str], holdout_frac: float) -> tuple[list[str], list[str]]:
    """Every k-th story is held out (spread over all chunks, not just the last one)."""
    k = max(2, int(round(1.0 / holdout_frac))) if holdout_frac > 0 else 0
    gen_hold = [g for i, g in enumerate(gen) if k and i % k == k // 2]
    gen_train = [g for i, g in enumerate(gen) if not (k and i % k == k // 2)]
    if not gen_hold and len(gen_train) >= 2 and k:
        gen_hold = [gen_train.pop()]
    log(f"generated: {len(gen_train)} train / {len(gen_hold)} held out")
    return gen_train, gen_hold


def trim_to_sentence(text: str) -> str:
    cut = max(text.rfind(c) for c in (".", "!", "?"))
    if cut > 0:
        end = cut + 1
        if end < len(text) and text[end] == '"':
            end += 1
        return text[:end]
    return text


def split_samples(rows: list[list[int]], new: list[list[int]], gbos: int, geos: int,
                  gpad: int) -> tuple[list[tuple[list[int], bool]], int]:
    """llama2.c models separate stories with BOS (and rarely emit EOS): split each sample
    into stories at BOS; a segment is complete if a BOS/EOS follows it. Returns the
    (ids, is_complete) segments and the number of generated tokens."""
    seqs = []
    n_gen_tokens = 0
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
    return seqs, n_gen_tokens


def clean_story(text: str, is_complete: bool) -> str:
    text = text.strip()
    if not is_complete:
        text = trim_to_sentence(text)
    # TinyStories separates paragraphs with a blank line; llama2.c samples use one "\n"
    return "\n\n".join(p.strip() for p in text.split("\n") if p.strip())


def left_pad(rows: list[list[int]], gpad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[bs, plen] input ids and attention mask of left-padded prompts."""
    bs, plen = len(rows), max(len(r) for r in rows)
    inp = torch.full((bs, plen), gpad, dtype=torch.long)
    att = torch.zeros((bs, plen), dtype=torch.long)
    for i, r in enumerate(rows):
        inp[i, plen - len(r):] = torch.tensor(r)
        att[i, plen - len(r):] = 1
    return inp, att


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

    prompt_ids = [[gbos] + gtok.encode(p, add_special_tokens=False).ids for p in GEN_PROMPTS]
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
        inp, att = left_pad(rows, gpad)
        plen = inp.shape[1]
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
        seqs, n_new = split_samples(rows, out[:, plen:].cpu().tolist(), gbos, geos, gpad)
        n_gen_tokens += n_new
        texts = gtok.decode_batch([s for s, _ in seqs], skip_special_tokens=True)
        for text, (_, complete) in zip(texts, seqs):
            text = clean_story(text, complete)
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
