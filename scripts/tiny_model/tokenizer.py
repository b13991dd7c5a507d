"""Byte-level BPE tokenizer: training, the Hugging Face tokenizer files, document encoding."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .common import BOS, BOS_ID, EOS, EOS_ID, PAD, PAD_ID
from .data import Corpora

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


def tokenizer_docs(corpora: Corpora, gen_train: list[str], max_gen_chars: int) -> Iterator[str]:
    """The BPE trainer's input: all real training text, then generated stories up to a char cap."""
    yield from corpora.ts_train
    yield from corpora.c4
    yield from corpora.sp
    n = 0
    for s in gen_train:
        if n >= max_gen_chars:
            break
        n += len(s)
        yield s


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


def token_byte_lengths(tok, vocab_size: int) -> torch.Tensor:
    """[vocab_size] bytes of each token (ByteLevel: one vocab char per byte; specials are 0 bytes)."""
    return torch.tensor(
        [0 if i in (PAD_ID, BOS_ID, EOS_ID) else len(tok.id_to_token(i) or "")
         for i in range(vocab_size)], dtype=torch.long)
