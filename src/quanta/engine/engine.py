"""The engine: one loop, three verbs. step() = schedule -> execute -> update (+ output deltas)."""

from __future__ import annotations

import itertools
import time
from collections import deque

from quanta.config import EngineConfig
from quanta.engine.beam_search import BeamSearch, BeamState
from quanta.engine.detokenizer import IncrementalDetokenizer
from quanta.engine.kv_cache import KVCacheManager
from quanta.engine.output import RequestDelta
from quanta.engine.output_processor import OutputProcessor
from quanta.engine.request import Request, Sequence
from quanta.engine.scheduler import Scheduler
from quanta.errors import RequestFailure
from quanta.sampling.sampler import is_plain_greedy, make_generator

PLACEHOLDER = 0  # token id standing for a token still on the device (overlap scheduling); never read


class LLMEngine:
    def __init__(self, config: EngineConfig, runner, tokenizer):
        self.config = config
        self.kv = KVCacheManager(config.num_kv_blocks, config.tokens_per_block, config.enable_block_reuse,
                                 config.enable_partial_reuse, config.num_host_kv_blocks)
        self.scheduler = Scheduler(config, self.kv)
        self.runner = runner
        self.tokenizer = tokenizer
        self.requests: dict[int, Request] = {}
        self._seq_ids = itertools.count()
        self.beams = BeamSearch(self.scheduler, lambda: next(self._seq_ids))
        self.outputs = OutputProcessor(self.scheduler, self.beams)
        self.stats: deque[dict] = deque(maxlen=1000)
        self.iteration = 0
        # Overlap scheduling (config.overlap_scheduler): the launched step whose tokens the host has not read,
        # and the requests that need the synchronous path (anything but plain greedy)
        self._pending = None
        self._sync_only: set[int] = set()

    # --- requests -------------------------------------------------------------------------------
    def add_request(self, req: Request, streaming: bool = False) -> None:
        p = req.params
        num_seqs = p.best_of or p.n
        need = self.kv.num_blocks_for(min(len(req.prompt_token_ids) + p.max_tokens, req.max_seq_len))
        if p.effective_beam_width > 1:  # beam search: one sequence prefills, then forks into the beams
            req.beam = BeamState.from_request(req, self.kv.block_size)
            num_seqs, need = 1, beam_blocks(req, self.kv.block_size)
        if need > self.kv.num_blocks:
            raise ValueError(
                f"request needs {need * self.kv.block_size} tokens of KV cache but the cache holds "
                f"{self.kv.num_blocks * self.kv.block_size}"
                + (f" ({p.effective_beam_width} beams)" if req.beam is not None else "")
                + "; lower max_tokens or raise KvCacheConfig.max_tokens"
            )
        req.extra["streaming"] = streaming
        if not (is_plain_greedy(p) and req.beam is None and not req.needs_prompt_logits):
            self._sync_only.add(req.request_id)
        for i in range(num_seqs):
            seed = None if p.seed is None else p.seed + i
            seq = Sequence(
                seq_id=next(self._seq_ids), request=req, index=i, token_ids=list(req.prompt_token_ids),
                num_prompt_tokens=len(req.prompt_token_ids),
                generator=make_generator(seed, self.runner.device),
                detokenizer=IncrementalDetokenizer(self.tokenizer, p),
            )
            req.seqs.append(seq)
            self.scheduler.add(seq)
        self.requests[req.request_id] = req

    def _forget(self, request_id: int) -> Request | None:
        self._sync_only.discard(request_id)
        return self.requests.pop(request_id, None)

    def abort_request(self, request_id: int, reason: str = "cancelled") -> RequestDelta | None:
        req = self._forget(request_id)
        if req is None:
            return None
        req.aborted = True
        for seq in req.seqs:
            self.scheduler.finish(seq, reason)
        return self.outputs.final_delta(req)

    def fail_request(self, request_id: int, error: BaseException) -> RequestDelta | None:
        req = self._forget(request_id)
        if req is None:
            return None
        req.error = error
        for seq in req.seqs:
            self.scheduler.finish(seq, "error")
        return RequestDelta(request_id, [], finished=True, error=error)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # --- the loop body --------------------------------------------------------------------------
    def step(self) -> list[RequestDelta]:
        t0 = time.perf_counter()
        overlap = self.config.overlap_scheduler and not self._sync_only
        if self._pending is not None and not overlap:  # a request that needs the host's tokens came in
            return self._finish_pending()
        out = self.scheduler.schedule()
        if out.is_empty and self.beams.release_idle():  # beams waiting for a preempted sibling held the blocks
            out = self.scheduler.schedule()
        if out.is_empty:
            return self._finish_pending() if self._pending is not None else []
        if overlap:
            return self._step_overlapped(out, t0)
        try:
            runner_out = self.runner.execute(out)
        except RequestFailure as e:  # nothing was committed: the others simply run again next step
            delta = self.fail_request(e.request_id, e.cause)
            return [delta] if delta else []
        # NOTE: the step's block copies have run: release their sources now, not at the next step (which
        # may never come: a finished beam request would otherwise hold its last copy sources while idle).
        self.kv.begin_step()
        self.scheduler.update(out)
        deltas = self.outputs.process(out, runner_out, self.requests)
        self._drop_finished(deltas)
        self._record_stats(out, time.perf_counter() - t0)
        return deltas

    def _drop_finished(self, deltas: list[RequestDelta]) -> None:
        for rid, err in self.outputs.failed.items():
            if (d := self.fail_request(rid, err)) is not None:
                deltas.append(d)
        for d in deltas:
            if d.finished:
                self._forget(d.request_id)

    # --- overlap scheduling -----------------------------------------------------------------------
    def _step_overlapped(self, out, t0: float) -> list[RequestDelta]:
        """Launch this step, then read and process the previous one's tokens while the GPU computes.

        Sequences sampled here get a placeholder token at once, so the next schedule() sees them ready to
        decode; the runner copies their real input id on the device. A sequence that the previous step
        finished (EOS, stop string) ran once more for nothing: its result is dropped. One whose placeholder
        is its last token (max_tokens, max_seq_len) is held out of scheduling until it resolves."""
        try:
            pending = self.runner.execute_async(out, self._pending)
        except RequestFailure as e:  # nothing was committed: the others simply run again next step
            delta = self.fail_request(e.request_id, e.cause)
            return [delta] if delta else []
        self.kv.begin_step()
        deltas = self._finish_pending() if self._pending is not None else []
        self.scheduler.update(out)
        hold = self.scheduler.hold
        for seq in pending.seqs:
            if seq.is_finished:
                continue
            seq.token_ids.append(PLACEHOLDER)
            seq.pending_token = True
            if seq.num_output_tokens >= seq.request.params.max_tokens or seq.num_tokens >= seq.request.max_seq_len:
                hold.add(seq.seq_id)
        self._pending = pending
        self._record_stats(out, time.perf_counter() - t0)
        return deltas

    def _finish_pending(self) -> list[RequestDelta]:
        pending, self._pending = self._pending, None
        result = pending.resolve()
        hold = self.scheduler.hold
        if hold:
            for seq in pending.seqs:
                hold.discard(seq.seq_id)
        deltas = self.outputs.process(pending.out, result, self.requests)
        self._drop_finished(deltas)
        return deltas

    def _record_stats(self, out, step_time: float) -> None:
        self.iteration += 1
        num_prefill = sum(1 for s in out.scheduled if not s.do_sample or s.num_new_tokens > 1)
        cs = self.kv.stats
        self.stats.append({
            "iter": self.iteration,
            "timestamp": time.time(),
            "iter_latency_ms": step_time * 1e3,
            "num_scheduled_tokens": out.num_tokens,
            "num_scheduled_seqs": len(out.scheduled),
            "num_context_requests": num_prefill,
            "num_generation_requests": len(out.scheduled) - num_prefill,
            "num_active_requests": len(self.scheduler.running),
            "num_queued_requests": len(self.scheduler.waiting),
            "num_preemptions": self.scheduler.num_preemptions,  # cumulative, as the cache counters below
            "num_reused_tokens": cs.reused_tokens,
            "cache_hit_rate": cs.hit_rate,
            "kv_cache_stats": {
                "max_num_blocks": self.kv.num_blocks,
                "used_num_blocks": self.kv.num_used_blocks,
                "free_num_blocks": self.kv.num_free_blocks,
                "tokens_per_block": self.kv.block_size,
                "cached_num_blocks": self.kv.num_cached_blocks,  # reusable blocks on the device (ref 0 or not)
                "reused_blocks": cs.reused_blocks,
                "missed_blocks": cs.missed_blocks,
                "cache_hit_rate": cs.hit_rate,  # reused / (reused + missed) blocks of admitted sequences
                "reused_tokens": cs.reused_tokens,
                "partial_reuses": cs.partial_reuses,
                "evicted_blocks": cs.evicted_blocks,
                "host_max_num_blocks": self.kv.num_host_blocks,
                "host_cached_num_blocks": self.kv.num_host_cached_blocks,
                "offloaded_blocks": cs.offloaded_blocks,
                "onboarded_blocks": cs.onboarded_blocks,
            },
        })


def beam_blocks(req: Request, block_size: int) -> int:
    """KV blocks a beam request needs at its widest: the full prompt blocks once, the rest per beam."""
    total = min(len(req.prompt_token_ids) + req.params.max_tokens, req.max_seq_len)
    shared = len(req.prompt_token_ids) // block_size
    return shared + req.params.effective_beam_width * (-(-total // block_size) - shared)
