"""Token-count scheduler: no prefill/decode phases, only `num_computed_tokens` vs `num_tokens`.

Each step hands out at most `max_num_tokens` tokens to at most `max_batch_size` sequences: running
sequences first (one decode token each, or the next chunk of a long prompt), then waiting ones in
arrival order. Admission follows the capacity policy (see `_can_admit`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from quanta.config import CapacitySchedulerPolicy, EngineConfig
from quanta.engine.kv_cache import KVCacheManager
from quanta.engine.request import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # tokens fed to the model this step, starting at seq.num_computed_tokens
    do_sample: bool  # True when this step reaches the end of the known tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    num_tokens: int = 0  # sum of num_new_tokens
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: EngineConfig, kv: KVCacheManager):
        self.config = config
        self.kv = kv
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_tokens
        kept: list[Sequence] = []
        while self.running:
            seq = self.running.pop(0)
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if num_new <= 0:
                kept.append(seq)
                continue
            while not self.kv.allocate_slots(seq, num_new):
                victim = self.running.pop() if self.running else seq
                self._preempt(victim, out)
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:
                continue
            kept.append(seq)
            self._emit(out, seq, num_new)
            budget -= num_new
        self.running = kept
        self._schedule_waiting(out, budget)
        return out

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        if self.config.scheduler_policy == CapacitySchedulerPolicy.STATIC_BATCH and self.running:
            return
        while self.waiting and budget > 0 and len(self.running) < self.config.max_batch_size:
            seq = self.waiting[0]
            num_new = seq.num_tokens - seq.num_computed_tokens
            if num_new > budget:
                if not self.config.enable_chunked_prefill:
                    break
                num_new = budget
            if not self._can_admit(seq, num_new) or not self.kv.allocate_slots(seq, num_new):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self._emit(out, seq, num_new)
            budget -= num_new

    def _can_admit(self, seq: Sequence, num_new: int) -> bool:
        if self.config.scheduler_policy == CapacitySchedulerPolicy.MAX_UTILIZATION:
            return self.kv.num_new_blocks(seq, num_new) <= self.kv.num_free_blocks
        # GUARANTEED_NO_EVICT / STATIC_BATCH: the blocks for the whole sequence must stay available,
        # after what running sequences may still claim.
        reserved = sum(self._blocks_to_finish(s) for s in self.running)
        return self._blocks_to_finish(seq) <= self.kv.num_free_blocks - reserved

    def _blocks_to_finish(self, seq: Sequence) -> int:
        return max(0, self.kv.num_blocks_for(seq.max_total_tokens) - len(seq.block_ids))

    def _emit(self, out: SchedulerOutput, seq: Sequence, num_new: int) -> None:
        do_sample = seq.num_computed_tokens + num_new == seq.num_tokens
        out.scheduled.append(ScheduledSeq(seq, num_new, do_sample))
        out.num_tokens += num_new

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        """Recompute-style preemption: drop the KV blocks, requeue at the front."""
        self.kv.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq)

    def update(self, out: SchedulerOutput) -> None:
        """Advance computed-token counts after the runner ran `out`."""
        for s in out.scheduled:
            s.seq.num_computed_tokens += s.num_new_tokens

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        if seq.is_finished:
            return
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv.free(seq)
