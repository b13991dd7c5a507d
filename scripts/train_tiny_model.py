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
import random
import sys
import time
from pathlib import Path

# NOTE: first, so that the run clock (common.T_START) starts before numpy / torch load.
from tiny_model.common import PHASES, T_START, log, phase

# isort: split
import numpy as np
import torch
from tiny_model.data import generate_stories, load_corpora, split_generated
from tiny_model.evaluate import (
    check_reloaded_model,
    check_reloaded_tokenizer,
    eval_heldout,
    stories260k_reference_bpb,
)
from tiny_model.tokenizer import tokenizer_docs, train_tokenizer
from tiny_model.train import build_model, build_streams, save_model, train


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
        corpora = load_corpora(data_dir, args.tinystories_holdout_frac)

    with phase("generate"):
        gen = generate_stories(args, device) if args.gen_sequences > 0 and args.gen_seconds > 0 else []
        gen_train, gen_hold = split_generated(gen, args.gen_holdout_frac)

    with phase("tokenizer"):
        tok = train_tokenizer(tokenizer_docs(corpora, gen_train, args.tok_max_gen_chars), args.vocab_size)
        vocab = tok.get_vocab_size()
        log(f"tokenizer: vocab {vocab}")
        assert vocab <= args.vocab_size

    with phase("encode"):
        streams = build_streams(args, tok, corpora, gen_train, gen_hold)

    with phase("train"):
        model, n_params = build_model(args, device)
        tr = train(args, model, streams.train, streams.hold, streams.token_bytes, device)

    amp = device.type == "cuda"
    with phase("eval"):
        final_eval = eval_heldout(model, streams.hold, args, device, amp, streams.token_bytes,
                                  "training weights")
        ref_bpb = None
        if not args.skip_reference:
            ref_bpb = stories260k_reference_bpb(args, corpora.ts_hold, device)
            log(f"reference: stories260K bits/byte on held-out tinystories = {ref_bpb}")

    with phase("save"):
        sizes, cfg = save_model(model, tok, out, args.max_position_embeddings)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()

    with phase("verify"):
        htok = check_reloaded_tokenizer(out, tok)
        reloaded = check_reloaded_model(out, htok, streams.hold, args, device, amp, streams.token_bytes)

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
            "tinystories_stories_train": len(corpora.ts_train),
            "tinystories_stories_heldout": len(corpora.ts_hold),
            "c4_docs": len(corpora.c4), "shakespeare_chunks": len(corpora.sp),
            "generated_stories_train": len(gen_train), "generated_stories_heldout": len(gen_hold),
            "train_stream_tokens": int(streams.train.numel()), "mix_tokens": streams.mix,
            "heldout_tokens": {k: int(v.numel()) for k, v in streams.hold.items()},
        },
        "tokenizer_vocab": vocab,
        "training": {k: v for k, v in tr.items() if k != "history"},
        "tokens_seen": tr["tokens_seen"],
        "train_loss": tr["final_train_loss"],
        "heldout_training_weights": final_eval,
        "heldout": reloaded["heldout"],
        "reference_stories260K_bpb_tinystories_heldout": ref_bpb,
        "loaded_dtype": reloaded["loaded_dtype"],
        "greedy_once_upon_a_time": reloaded["greedy"],
        "samples_t0.8": reloaded["samples"],
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
