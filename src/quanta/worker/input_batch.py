"""SchedulerOutput (CPU, Python) -> one flat ForwardBatch in persistent device buffers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from quanta.attention.metadata import AttentionMetadata
from quanta.engine.scheduler import SchedulerOutput


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T] int64 (device)
    positions: torch.Tensor  # [T] int64 (device)
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [num_sample_rows] int64: last token of each sampling sequence
    sample_rows: list[int]  # indexes into scheduler_output.scheduled of sequences that sample
    num_tokens: int
    num_seqs: int
    token_offsets: list[int]  # start of each scheduled sequence in the flat batch


class InputBuffers:
    """Persistent step-input buffers (device) with pinned host staging, sized for the engine limits."""

    def __init__(self, max_num_tokens: int, max_batch_size: int, max_blocks_per_seq: int, device: torch.device):
        self.device = device
        pin = device.type == "cuda"
        t, b = max_num_tokens, max_batch_size

        def pair(shape, dtype):
            host = torch.zeros(shape, dtype=dtype, pin_memory=pin)
            return host, (torch.zeros(shape, dtype=dtype, device=device) if pin else host)

        self.h_ids, self.input_ids = pair(t, torch.int64)
        self.h_pos, self.positions = pair(t, torch.int64)
        self.h_slots, self.slot_mapping = pair(t, torch.int64)
        self.h_tables, self.block_tables = pair((b, max_blocks_per_seq), torch.int32)
        self.h_seq_lens, self.seq_lens = pair(b, torch.int32)
        self.h_qsl, self.query_start_loc = pair(b + 1, torch.int32)
        self.h_logits_idx, self.logits_indices = pair(b, torch.int64)

    def build(self, out: SchedulerOutput, block_size: int, pad_to: int = 0) -> ForwardBatch:
        """Fill the buffers for `out`; with pad_to (decode under a CUDA graph) add inert padding rows."""
        num_seqs, num_tokens = len(out.scheduled), out.num_tokens
        ids = self.h_ids.numpy()
        pos = self.h_pos.numpy()
        slots = self.h_slots.numpy()
        tables = self.h_tables.numpy()
        seq_lens, qsl, lidx = self.h_seq_lens.numpy(), self.h_qsl.numpy(), self.h_logits_idx.numpy()
        max_blocks = max(len(s.seq.block_ids) for s in out.scheduled)
        offsets, sample_rows = [], []
        cursor, max_q, max_s = 0, 0, 0
        qsl[0] = 0
        for i, s in enumerate(out.scheduled):
            seq, n = s.seq, s.num_new_tokens
            start = seq.num_computed_tokens
            offsets.append(cursor)
            p = np.arange(start, start + n)
            blocks = np.asarray(seq.block_ids, dtype=np.int64)
            ids[cursor : cursor + n] = seq.token_ids[start : start + n]
            pos[cursor : cursor + n] = p
            slots[cursor : cursor + n] = blocks[p // block_size] * block_size + p % block_size
            tables[i, : len(blocks)] = blocks
            tables[i, len(blocks) : max_blocks] = 0
            seq_lens[i] = start + n
            cursor += n
            qsl[i + 1] = cursor
            max_q, max_s = max(max_q, n), max(max_s, start + n)
            if s.do_sample:
                lidx[len(sample_rows)] = cursor - 1
                sample_rows.append(i)
        if pad_to > num_seqs:  # one token each, writes nothing (slot -1), attends to one key
            ids[num_tokens:pad_to] = 0
            pos[num_tokens:pad_to] = 0
            slots[num_tokens:pad_to] = -1
            seq_lens[num_seqs:pad_to] = 1
            qsl[num_seqs + 1 : pad_to + 1] = np.arange(num_tokens + 1, pad_to + 1)
            num_tokens = num_seqs = pad_to
        return self._upload(num_tokens, num_seqs, max_blocks, max_q, max_s, offsets, sample_rows)

    def _upload(self, num_tokens, num_seqs, max_blocks, max_q, max_s, offsets, sample_rows) -> ForwardBatch:
        nb = dict(non_blocking=True)
        if self.device.type == "cuda":
            self.input_ids[:num_tokens].copy_(self.h_ids[:num_tokens], **nb)
            self.positions[:num_tokens].copy_(self.h_pos[:num_tokens], **nb)
            self.slot_mapping[:num_tokens].copy_(self.h_slots[:num_tokens], **nb)
            self.block_tables[:num_seqs, :max_blocks].copy_(self.h_tables[:num_seqs, :max_blocks], **nb)
            self.seq_lens[:num_seqs].copy_(self.h_seq_lens[:num_seqs], **nb)
            self.query_start_loc[: num_seqs + 1].copy_(self.h_qsl[: num_seqs + 1], **nb)
            self.logits_indices[: len(sample_rows)].copy_(self.h_logits_idx[: len(sample_rows)], **nb)
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:num_tokens],
            block_tables=self.block_tables[:num_seqs, :max_blocks],
            seq_lens=self.seq_lens[:num_seqs],
            query_start_loc=self.query_start_loc[: num_seqs + 1],
            max_query_len=max_q,
            max_seq_len=max_s,
        )
        return ForwardBatch(
            input_ids=self.input_ids[:num_tokens],
            positions=self.positions[:num_tokens],
            meta=meta,
            logits_indices=self.logits_indices[: len(sample_rows)],
            sample_rows=sample_rows,
            num_tokens=num_tokens,
            num_seqs=num_seqs,
            token_offsets=offsets,
        )
