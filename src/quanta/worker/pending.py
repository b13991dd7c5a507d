"""Overlap scheduling, the runner's side: a step whose sampled tokens are still on the device.

The engine launches step N+1 before it reads step N's tokens (TensorRT-LLM's overlap scheduler), so the
host's scheduling, input building and output processing run while the GPU computes. This works for steps
whose every sampling row is plain greedy (argmax, nothing else): their tokens never need the host before
the next forward. A sequence whose last token is still in flight carries a placeholder
(`Sequence.pending_token`); its input id for the next step is copied on the device from the step that
samples it (`feed_pending_inputs`), and the host learns the real id when `PendingStep.resolve` waits for it.

One step's tokens are copied to pinned host memory behind its forward (two buffers, alternating), and an
event marks when they have landed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from quanta.engine.request import Sequence
from quanta.engine.scheduler import SchedulerOutput


@dataclass
class PendingStep:
    out: SchedulerOutput
    seqs: list[Sequence]  # the rows that sampled, in row order
    ids: torch.Tensor | None  # [R] int64 on the device: what the next step's inputs are copied from
    host_ids: torch.Tensor | None  # [>= R] int64 (pinned on CUDA): filled once `event` has passed
    host_lps: torch.Tensor | None  # [>= R] float32
    event: torch.cuda.Event | None
    rows: dict[int, int] = field(default_factory=dict)  # seq_id -> row in ids
    # a CUDA graph's own hand-over (worker/cuda_graph.py GraphTokens, the replay's count): host_ids / host_lps
    # are its slot, and the graph also wrote ids into the input-ids buffer
    handoff: tuple | None = None

    def resolve(self):
        """Wait for the tokens; -> RunnerOutput (plain greedy rows only)."""
        from quanta.worker.model_runner import RunnerOutput

        result = RunnerOutput()
        if not self.seqs:
            return result
        if self.event is not None:
            self.event.synchronize()
        if self.handoff is not None:
            tokens, k = self.handoff
            tokens.check(k)
        n = len(self.seqs)
        result.sampled_seqs = self.seqs
        result.sampled_token_ids = self.host_ids[:n].tolist()
        result.sampled_logprobs = self.host_lps[:n].tolist()
        result.logprobs, result.generation_logits = [None] * n, [None] * n
        return result


def joint_base(ids: torch.Tensor, lps: torch.Tensor) -> torch.Tensor | None:
    """The int64 buffer (a whole storage) that ids (int64) and lps (float32) both lie in (the fused greedy
    kernel's output: ids, then the logprobs' bits), so that one copy brings both to the host; else None."""
    st = ids.untyped_storage()
    ok = (ids.dtype == torch.int64 and lps.dtype == torch.float32 and ids.is_contiguous() and lps.is_contiguous()
          and lps.untyped_storage().data_ptr() == st.data_ptr() and st.nbytes() % 8 == 0)
    return torch.empty(0, dtype=torch.int64, device=ids.device).set_(st, 0, (st.nbytes() // 8,)) if ok else None


def joint_views(host: torch.Tensor, ids: torch.Tensor, lps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ids / lps read from `host`, an int64 copy of their joint_base (same offsets)."""
    n, i, j = ids.shape[0], ids.storage_offset(), lps.storage_offset()
    return host[i : i + n], host.view(torch.float32)[j : j + n]


class HostRing:
    """Two pinned (ids, logprobs) buffers used in turn: a step's copy never overwrites the one the engine has
    yet to read (the previous step's). Each is int64 [2 * size]: ids in the first half, or a copy of the fused
    greedy kernel's joint buffer (one device -> host copy a step instead of two)."""

    def __init__(self, size: int, device: torch.device):
        pin = device.type == "cuda"
        self.size = size
        self.bufs = [torch.zeros(2 * size, dtype=torch.int64, pin_memory=pin) for _ in range(2)]
        self.turn = 0
        self.device = device

    def copy_out(self, ids: torch.Tensor, lps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, object]:
        buf = self.bufs[self.turn]
        self.turn ^= 1
        n, cuda = ids.shape[0], self.device.type == "cuda"
        base = joint_base(ids, lps)
        if base is not None and base.numel() <= buf.numel():
            buf[: base.numel()].copy_(base, non_blocking=cuda)
            host_ids, host_lps = joint_views(buf, ids, lps)
        else:
            host_ids, host_lps = buf[: self.size], buf[self.size :].view(torch.float32)[: self.size]
            host_ids[:n].copy_(ids, non_blocking=cuda)
            host_lps[:n].copy_(lps.float(), non_blocking=cuda)
        if not cuda:
            return host_ids, host_lps, None
        event = torch.cuda.Event()
        event.record()
        return host_ids, host_lps, event


def fed_in_place(out: SchedulerOutput, prev: PendingStep | None) -> bool:
    """Whether prev's CUDA graph already wrote every input id of `out` (a decode step of the same sequences in
    the same rows, each with its token still in flight), so neither the host's ids nor a feed are needed."""
    if prev is None or prev.handoff is None or len(out.scheduled) > len(prev.seqs):
        return False
    rows = prev.rows
    return all(s.seq.pending_token and rows.get(s.seq.seq_id) == i for i, s in enumerate(out.scheduled))


def feed_pending_inputs(out: SchedulerOutput, token_offsets: list[int], input_ids: torch.Tensor,
                        prev: PendingStep | None) -> None:
    """Rows whose input token is still on the device (a placeholder) get it from `prev`'s sampled ids."""
    if prev is None or prev.ids is None:
        return
    dst, src = [], []
    rows = prev.rows
    for i, s in enumerate(out.scheduled):
        if s.seq.pending_token:
            r = rows.get(s.seq.seq_id)
            if r is None:  # cannot happen: a placeholder is always the previous step's sample
                raise RuntimeError(f"overlap scheduling: sequence {s.seq.seq_id} has no token in flight")
            dst.append(token_offsets[i])
            src.append(r)
    if not dst:
        return
    n = len(dst)
    if dst == src == list(range(n)):  # the steady state: same sequences in the same order
        input_ids[:n].copy_(prev.ids[:n])
        return
    dev = input_ids.device
    d = torch.tensor(dst, dtype=torch.int64).to(dev, non_blocking=True)
    s = torch.tensor(src, dtype=torch.int64).to(dev, non_blocking=True)
    input_ids.index_copy_(0, d, prev.ids.index_select(0, s))
