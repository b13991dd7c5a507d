"""Token-count scheduler: no prefill/decode phases, only `num_computed_tokens` vs `num_tokens`.

Each step hands out at most `max_num_tokens` tokens to at most `max_batch_size` sequences: first one token
to every running sequence that decodes (so streams keep flowing while long prompts are read), then prompt
chunks to running sequences still reading their prompt and to waiting ones, in arrival order. How the
prompt budget is shared is the context chunking policy (see `_split`); admission follows the capacity
policy (see `_can_admit`). A waiting sequence starts from its longest cached prefix (KVCacheManager.lookup).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from quanta.config import CapacitySchedulerPolicy, ContextChunkingPolicy, EngineConfig
from quanta.engine.kv_cache import KVCacheManager, PrefixHit
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
    # KV block moves the runner does before this step's forward, in this order (KVCacheManager.take_transfers):
    blocks_to_swap_out: list[tuple[int, int]] = field(default_factory=list)  # (device block, host slot)
    blocks_to_swap_in: list[tuple[int, int]] = field(default_factory=list)  # (host slot, device block)
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)  # (src block, dst block)

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
        # Extra admission check, (seq, running) -> bool; LoRA: the running sequences' adapters fit the device slots
        self.admission_gate = None
        # seq_ids not to schedule: their in-flight token (overlap scheduling) is their last one
        self.hold: set[int] = set()
        self.equal_progress = (
            config.enable_chunked_prefill
            and getattr(config, "context_chunking_policy", None) == ContextChunkingPolicy.EQUAL_PROGRESS
        )

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def add_forked(self, seq: Sequence) -> None:
        """A beam forked from a live one (engine/beam_search.py): admitted with its request, it shares its
        parent's blocks and runs at once; one left without KV (to recompute) waits at the queue's front."""
        if seq.num_computed_tokens:
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
        else:
            seq.status = SequenceStatus.WAITING
            self.waiting.appendleft(seq)

    def release(self, seq: Sequence) -> None:
        """Preempt an idle running sequence to the back of the queue (beam search: a beam that waits for a
        preempted sibling gives its blocks back when nothing else can run; it recomputes them later)."""
        self.running.remove(seq)
        self.kv.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.append(seq)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # --- one step -----------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        self.kv.begin_step()
        out = SchedulerOutput()
        candidates = self._waiting_candidates()
        running, plan = self._plan(candidates)
        budget = self._schedule_running(out, running, plan)
        if not out.preempted:  # blocks ran short this step: nothing new comes in
            self._schedule_waiting(out, candidates, plan, budget)
        if out.scheduled:  # an empty step never reaches the runner: its transfers wait for the next one
            out.blocks_to_swap_out, out.blocks_to_swap_in, out.blocks_to_copy = self.kv.take_transfers()
        return out

    def _waiting_candidates(self) -> list[tuple[Sequence, PrefixHit]]:
        """The waiting sequences that may come in this step (arrival order), each with its cached prefix."""
        if not self.waiting or (self.config.scheduler_policy == CapacitySchedulerPolicy.STATIC_BATCH and self.running):
            return []
        room = self.config.max_batch_size - self._num_batch_slots()
        demand, out = 0, []
        for seq in self.waiting:
            if self._waits_for_sibling(seq):
                continue  # it comes in once its first sample has read the prompt (then cached)
            room -= seq.num_batch_slots  # 1, or a beam request's width (its forks skip admission)
            if room < 0 or demand >= self.config.max_num_tokens:
                break
            hit = self._lookup(seq)
            out.append((seq, hit))
            remaining = seq.num_tokens - hit.num_tokens
            demand += min(remaining, self.kv.block_size) if self.equal_progress else remaining
        return out

    def _plan(self, candidates: list[tuple[Sequence, PrefixHit]]) -> tuple[list[Sequence], dict[int, int]]:
        """The running sequences, decodes first, and seq_id -> tokens this step: one per decoding sequence,
        then the prompt budget by policy over running prompts and waiting candidates."""
        budget, plan = self.config.max_num_tokens, {}
        decodes, prompts, others, demands = [], [], [], []
        hold = self.hold
        for seq in self.running:
            remaining = len(seq.token_ids) - seq.num_computed_tokens
            if hold and seq.seq_id in hold:
                others.append(seq)
            elif remaining == 1:
                decodes.append(seq)
            elif remaining > 1:
                prompts.append(seq)
                demands.append(remaining)
            else:
                others.append(seq)
        if len(decodes) > budget:
            for seq in decodes[budget:]:
                plan[seq.seq_id] = 0
        for seq in decodes[:budget]:
            plan[seq.seq_id] = 1
        budget -= min(budget, len(decodes))
        waiting = [seq for seq, _ in candidates]
        demands += [seq.num_tokens - hit.num_tokens for seq, hit in candidates]
        for seq, n in zip(prompts + waiting, self._split(demands, budget)):
            plan[seq.seq_id] = n
        return decodes + prompts + others, plan

    def _split(self, demands: list[int], budget: int) -> list[int]:
        """FIRST_COME_FIRST_SERVED: each prompt takes all it can, in order (without chunked prefill, a
        prompt that does not fit whole stops the queue). EQUAL_PROGRESS: rounds of one block's worth of
        tokens to every prompt in turn, so concurrent prompts advance together."""
        alloc = [0] * len(demands)
        if not self.equal_progress:
            for i, d in enumerate(demands):
                n = min(d, budget)
                if n < d and not self.config.enable_chunked_prefill:
                    break
                alloc[i], budget = n, budget - n
            return alloc
        active, unit = list(range(len(demands))), self.kv.block_size
        while budget > 0 and active:
            still = []
            for i in active:
                give = min(unit, demands[i] - alloc[i], budget)
                alloc[i] += give
                budget -= give
                if alloc[i] < demands[i]:
                    still.append(i)
            active = still
        return alloc

    def _schedule_running(self, out: SchedulerOutput, running: list[Sequence], plan: dict[int, int]) -> int:
        budget, bs = self.config.max_num_tokens, self.kv.block_size
        queue, kept = deque(running), []
        while queue:
            seq = queue.popleft()
            num_new = plan.get(seq.seq_id, 0)
            if num_new <= 0:
                kept.append(seq)
                continue
            while -(-(seq.num_computed_tokens + num_new) // bs) > len(seq.block_ids) and \
                    not self.kv.allocate_slots(seq, num_new):
                victim = queue.pop() if queue else seq  # the newest of those not yet served
                self._preempt(victim, out)
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:
                continue
            kept.append(seq)
            self._emit(out, seq, num_new)
            budget -= num_new
        self.running = kept
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, candidates, plan: dict[int, int], budget: int) -> None:
        if not candidates:
            return
        reserved = None
        slots = self._num_batch_slots()
        for seq, _ in candidates:
            cap = plan.get(seq.seq_id, 0)
            slots += seq.num_batch_slots
            if cap <= 0 or budget <= 0 or slots > self.config.max_batch_size:
                break
            hit = self._lookup(seq)  # again: this step's allocations may have evicted cached blocks
            if reserved is None:
                reserved = self._reserved_blocks()
            # FIRST_COME_FIRST_SERVED: all the budget left (the plan only estimated this prefix hit)
            limit = min(cap, budget) if self.equal_progress else budget
            num_new = self._admissible_tokens(seq, hit, limit, reserved)
            if num_new is None and hit.partial is not None:  # its copy source holds one block more
                hit = PrefixHit(hit.blocks, None, len(hit.blocks) * self.kv.block_size)
                num_new = self._admissible_tokens(seq, hit, limit, reserved)
            if num_new is None:
                break
            if self.admission_gate is not None and not self.admission_gate(seq, self.running):
                break
            if self.waiting[0] is seq:
                self.waiting.popleft()
            else:  # behind samples that wait for their first one
                self.waiting.remove(seq)
            if self._uses_cache(seq):
                self.kv.acquire(seq, hit)
            ok = self.kv.allocate_slots(seq, num_new)
            assert ok, "admission checked the blocks"
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self._emit(out, seq, num_new)
            budget -= num_new
            reserved += self._blocks_to_finish(seq)

    # --- policies -----------------------------------------------------------------------------------
    def _admissible_tokens(self, seq: Sequence, hit: PrefixHit, limit: int, reserved: int) -> int | None:
        """Tokens `seq` may bring in this step from its cached prefix `hit` (at most `limit`), or None."""
        remaining = seq.num_tokens - hit.num_tokens
        num_new = min(remaining, limit)
        if num_new < remaining and not self.config.enable_chunked_prefill:
            return None
        return num_new if self._can_admit(seq, hit, num_new, reserved) else None

    def _can_admit(self, seq: Sequence, hit: PrefixHit, num_new: int, reserved: int) -> bool:
        free = self.kv.num_free_blocks
        if self.kv.blocks_to_acquire(hit, hit.num_tokens + num_new) > free:
            return False
        if self.config.scheduler_policy == CapacitySchedulerPolicy.MAX_UTILIZATION:
            return True
        # GUARANTEED_NO_EVICT / STATIC_BATCH: the blocks for the whole sequence must stay available,
        # after what running sequences may still claim. Blocks shared with running sequences cost nothing.
        need = self.kv.blocks_to_acquire(hit, seq.max_total_tokens) + seq.num_reserved_fork_blocks
        return need <= free - reserved

    def _reserved_blocks(self) -> int:
        if self.config.scheduler_policy == CapacitySchedulerPolicy.MAX_UTILIZATION:
            return 0
        return sum(self._blocks_to_finish(s) for s in self.running)

    def _blocks_to_finish(self, seq: Sequence) -> int:
        own = max(0, self.kv.num_blocks_for(seq.max_total_tokens) - len(seq.block_ids))
        return own + seq.num_reserved_fork_blocks  # beam search: what its forks will claim

    def _num_batch_slots(self) -> int:
        return sum(s.num_batch_slots for s in self.running)

    # --- prefix reuse -------------------------------------------------------------------------------
    def _uses_cache(self, seq: Sequence) -> bool:
        # NOTE: the sequence that returns prompt logprobs / context logits computes its whole prompt.
        req = seq.request
        return self.kv.enable_block_reuse and not (getattr(req, "needs_prompt_logits", False) and seq.index == 0)

    def _lookup(self, seq: Sequence) -> PrefixHit:
        return self.kv.lookup(seq) if self._uses_cache(seq) else PrefixHit()

    def _waits_for_sibling(self, seq: Sequence) -> bool:
        """With reuse on, samples 2..n of a request wait until the first has computed the prompt, then
        find it cached instead of computing it again (STATIC_BATCH keeps a request's samples together)."""
        if not self.kv.enable_block_reuse or seq.index == 0:
            return False
        req = seq.request
        if self.config.scheduler_policy == CapacitySchedulerPolicy.STATIC_BATCH or getattr(req, "beam", None):
            return False
        first = req.seqs[0]
        return first is not seq and not first.is_finished and first.num_computed_tokens < first.num_prompt_tokens

    # --- bookkeeping --------------------------------------------------------------------------------
    def _emit(self, out: SchedulerOutput, seq: Sequence, num_new: int) -> None:
        do_sample = seq.num_computed_tokens + num_new == seq.num_tokens
        out.scheduled.append(ScheduledSeq(seq, num_new, do_sample))
        out.num_tokens += num_new

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        """Recompute-style preemption: drop the KV blocks (they stay cached), requeue at the front."""
        self.kv.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq)

    def update(self, out: SchedulerOutput) -> None:
        """Advance computed-token counts after the runner ran `out`; publish blocks that became full."""
        bs, reuse = self.kv.block_size, self.kv.enable_block_reuse
        for s in out.scheduled:
            seq = s.seq
            if seq.is_finished:  # overlap scheduling: it finished while this step ran
                continue
            seq.num_computed_tokens += s.num_new_tokens
            if reuse and seq.num_computed_tokens // bs != (seq.num_computed_tokens - s.num_new_tokens) // bs:
                self.kv.cache_full_blocks(seq)

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        if seq.is_finished:
            return
        seq.status = SequenceStatus.FINISHED
        seq.drop_placeholder()
        self.hold.discard(seq.seq_id)
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv.free(seq)
