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
        """Fill the buffers for `out`; with pad_to (decode under a CUDA graph) add inert padding rows.

        NOTE: decode rows (one token) take a pure-Python path: per-row numpy calls cost more than
        the arithmetic at batch sizes in the hundreds.
        """
        num_seqs, num_tokens = len(out.scheduled), out.num_tokens
        tables = self.h_tables.numpy()
        ids_l: list[int] = []
        pos_l: list[int] = []
        slot_l: list[int] = []
        lens_l: list[int] = []
        qsl_l: list[int] = [0]
        offsets, sample_rows, logits_idx = [], [], []
        max_q = max_s = max_blocks = 0
        for i, s in enumerate(out.scheduled):
            seq, n = s.seq, s.num_new_tokens
            start, blocks = seq.num_computed_tokens, seq.block_ids
            offsets.append(len(ids_l))
            if n == 1:
                ids_l.append(seq.token_ids[start])
                pos_l.append(start)
                slot_l.append(blocks[start // block_size] * block_size + start % block_size)
            else:
                p = np.arange(start, start + n)
                ids_l.extend(seq.token_ids[start : start + n])
                pos_l.extend(range(start, start + n))
                b = np.asarray(blocks, dtype=np.int64)
                slot_l.extend((b[p // block_size] * block_size + p % block_size).tolist())
            nb = len(blocks)
            tables[i, :nb] = blocks
            lens_l.append(start + n)
            qsl_l.append(len(ids_l))
            max_q, max_s, max_blocks = max(max_q, n), max(max_s, start + n), max(max_blocks, nb)
            if s.do_sample:
                logits_idx.append(len(ids_l) - 1)
                sample_rows.append(i)
        if pad_to > num_seqs:  # one token each, writes nothing (slot -1), attends to one key
            extra = pad_to - num_seqs
            ids_l += [0] * extra
            pos_l += [0] * extra
            slot_l += [-1] * extra
            lens_l += [1] * extra
            qsl_l += range(num_tokens + 1, pad_to + 1)
            num_tokens = num_seqs = pad_to
        self.h_ids.numpy()[:num_tokens] = ids_l
        self.h_pos.numpy()[:num_tokens] = pos_l
        self.h_slots.numpy()[:num_tokens] = slot_l
        self.h_seq_lens.numpy()[:num_seqs] = lens_l
        self.h_qsl.numpy()[: num_seqs + 1] = qsl_l
        self.h_logits_idx.numpy()[: len(logits_idx)] = logits_idx
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
