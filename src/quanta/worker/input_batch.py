"""SchedulerOutput (CPU, Python) -> one flat ForwardBatch in persistent device buffers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from quanta import envs
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
    """Persistent step-input buffers (device) with pinned host staging, sized for the engine limits.

    packed (env QUANTA_PACKED_INPUTS, default on): a step of n tokens and s sequences lays out its inputs back
    to back in one int64 buffer, [ids n | positions n | slots n | logits indices (<= s, s reserved)], then its
    sequence lengths and query starts as int32 (s + s + 1), so a step uploads them in one copy instead of six;
    the block table is uploaded only when its live part changed. The layout depends on n and s, so a CUDA graph
    captured at batch size bs reads `views(bs, bs)`, the layout its replays upload. Off: one buffer per input."""

    def __init__(self, max_num_tokens: int, max_batch_size: int, max_blocks_per_seq: int, device: torch.device,
                 packed: bool | None = None):
        self.device = device
        self.packed = envs.get("QUANTA_PACKED_INPUTS") if packed is None else packed
        pin = device.type == "cuda"
        t, b = max_num_tokens, max_batch_size

        def pair(shape, dtype):
            host = torch.zeros(shape, dtype=dtype, pin_memory=pin)
            return host, (torch.zeros(shape, dtype=dtype, device=device) if pin else host)

        self.h_tables, self.block_tables = pair((b, max_blocks_per_seq), torch.int32)
        if self.packed:
            self.h_flat, self.flat = pair(3 * t + 2 * b + 1, torch.int64)
            self.uploaded_tables = np.full((b, max_blocks_per_seq), -1, dtype=np.int32)  # what the device holds
            return
        self.h_ids, self.input_ids = pair(t, torch.int64)
        self.h_pos, self.positions = pair(t, torch.int64)
        self.h_slots, self.slot_mapping = pair(t, torch.int64)
        self.h_seq_lens, self.seq_lens = pair(b, torch.int32)
        self.h_qsl, self.query_start_loc = pair(b + 1, torch.int32)
        self.h_logits_idx, self.logits_indices = pair(b, torch.int64)

    def views(self, n: int, s: int, r: int = 0, host: bool = False):
        """(ids, positions, slots, logits indices, seq_lens, query_start_loc) of a step of n tokens, s sequences
        and r sampling rows: the host staging (host) or the device buffers."""
        if self.packed:
            f = self.h_flat if host else self.flat
            f32 = f.view(torch.int32)[2 * (3 * n + s) :]  # the int32 part, after the int64 one
            return f[:n], f[n : 2 * n], f[2 * n : 3 * n], f[3 * n : 3 * n + r], f32[:s], f32[s : 2 * s + 1]
        if host:
            bufs = (self.h_ids, self.h_pos, self.h_slots, self.h_logits_idx, self.h_seq_lens, self.h_qsl)
        else:
            bufs = (self.input_ids, self.positions, self.slot_mapping, self.logits_indices, self.seq_lens,
                    self.query_start_loc)
        return bufs[0][:n], bufs[1][:n], bufs[2][:n], bufs[3][:r], bufs[4][:s], bufs[5][: s + 1]

    def fill_dummy(self, bs: int) -> None:
        """Inert decode inputs for bs sequences (CUDA graph warm-up and capture): token 0 at position 0, no
        cache write (slot -1), one key in block 0."""
        ids, pos, slots, _, lens, qsl = self.views(bs, bs)
        ids.zero_()
        pos.zero_()
        slots.fill_(-1)
        self.block_tables[:bs].zero_()
        lens.fill_(1)
        qsl.copy_(torch.arange(bs + 1, dtype=torch.int32))
        if self.packed:
            self.uploaded_tables[:bs] = 0

    def build(self, out: SchedulerOutput, block_size: int, pad_to: int = 0, skip_ids: bool = False) -> ForwardBatch:
        """Fill the buffers for `out`; with pad_to (decode under a CUDA graph) add inert padding rows; skip_ids:
        leave the device's input ids as they are (the previous graph wrote them: worker/pending.py fed_in_place).

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
        h_ids, h_pos, h_slots, h_logits, h_lens, h_qsl = self.views(num_tokens, num_seqs, len(logits_idx), host=True)
        h_ids.numpy()[:] = ids_l
        h_pos.numpy()[:] = pos_l
        h_slots.numpy()[:] = slot_l
        h_lens.numpy()[:] = lens_l
        h_qsl.numpy()[:] = qsl_l
        h_logits.numpy()[:] = logits_idx
        return self._upload(num_tokens, num_seqs, max_blocks, max_q, max_s, offsets, sample_rows, skip_ids)

    def stale_tables(self, s: int, max_blocks: int) -> bool:
        """packed: whether the block table's live part differs from what the device holds; if so it is noted as
        uploaded (the caller copies it)."""
        live, done = self.h_tables.numpy()[:s, :max_blocks], self.uploaded_tables[:s, :max_blocks]
        if np.array_equal(live, done):
            return False
        done[:] = live
        return True

    def _upload(self, num_tokens, num_seqs, max_blocks, max_q, max_s, offsets, sample_rows, skip_ids=False):
        n, s, r = num_tokens, num_seqs, len(sample_rows)
        if self.device.type == "cuda":
            nb = dict(non_blocking=True)
            if self.packed:  # one copy, and the block table only when its live part changed
                m, lo = 3 * n + s + s + 1, n if skip_ids else 0  # int64 words up to the last query start
                self.flat[lo:m].copy_(self.h_flat[lo:m], **nb)
                if self.stale_tables(s, max_blocks):
                    self.block_tables[:s, :max_blocks].copy_(self.h_tables[:s, :max_blocks], **nb)
            else:
                pairs = list(zip(self.views(n, s, r), self.views(n, s, r, host=True)))
                for dst, src in pairs[1:] if skip_ids else pairs:
                    dst.copy_(src, **nb)
                self.block_tables[:s, :max_blocks].copy_(self.h_tables[:s, :max_blocks], **nb)
        ids, pos, slots, logits_idx, lens, qsl = self.views(n, s, r)
        meta = AttentionMetadata(
            slot_mapping=slots,
            block_tables=self.block_tables[:s, :max_blocks],
            seq_lens=lens,
            query_start_loc=qsl,
            max_query_len=max_q,
            max_seq_len=max_s,
        )
        return ForwardBatch(
            input_ids=ids,
            positions=pos,
            meta=meta,
            logits_indices=logits_idx,
            sample_rows=sample_rows,
            num_tokens=num_tokens,
            num_seqs=num_seqs,
            token_offsets=offsets,
        )
