"""Beam search, control plane (plain Python): pick the best continuations, fork and prune beams, keep
the finished hypotheses, build the outputs.

A beam request's live beams are Sequences of the request (`Request.seqs`, best first) that run in the
same steps as every other sequence. The first beam prefills the prompt; each step every live beam
reports its top candidates (sampling/beam.py) and, once all of them have, `BeamSearch._step` chooses:

- candidates are ranked by cumulative logprob + `beam_search_diversity_rate` * (rank of their beam)
  (TensorRT-LLM's diversity term; 0 by default), and the best C = max(2, 1 + #stop ids) * k are kept;
- a kept candidate that ends its beam (EOS, a stop id or string, max_tokens) enters the finished set if
  it is among the first k, with score cum_logprob / len(output) ** length_penalty; the set keeps the best
  `capacity` hypotheses (Hugging Face's BeamHypotheses);
- the best k candidates that do not end become the next live beams: a parent with several children is
  forked (blocks shared by ref count, its partially filled last block copied on write), a parent with
  none is finished at once and its blocks freed;
- the search ends when no live beam is left, when early_stopping is True and the set is full, or when no
  live beam can beat the worst finished hypothesis (Hugging Face's heuristic: the best live score divided
  by the current length ** length_penalty, or by the longest possible one under "never" with a positive
  length_penalty).

This is transformers' `generate(num_beams=k, do_sample=False)` step for step. Beam width k may change per
step (`beam_width_array`: k = array[min(step, len - 1)]); the finished set holds the largest width.
A beam that reported may be preempted before its siblings report: its candidates stay valid (they depend
on its tokens only) and it recomputes its KV before it runs again.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from quanta.engine.output import SeqDelta
from quanta.engine.request import Request, Sequence

# SamplingParams.length_penalty=None: Hugging Face's default (TensorRT-LLM's runtime default is 0).
DEFAULT_LENGTH_PENALTY = 1.0


def hf_early_stopping(value: int | bool | str | None) -> bool | str:
    """TensorRT-LLM's integer early_stopping as Hugging Face's True / False / "never".

    1 (or True): stop once `beam_width` hypotheses are finished (HF True). 0 (or False) and None (HF's
    default): stop when no live beam can beat the worst finished one, at the current length (HF False).
    Any other int, or "never": the same with the longest possible length when length_penalty > 0.
    """
    if value is None or value is False or value == 0:
        return False
    if value is True or value == 1:
        return True
    return "never"


@dataclass
class Hypothesis:
    """A finished beam (or, while streaming or when cancelled, a live one): one output of the request."""

    token_ids: list[int]  # generated tokens, the final EOS / stop id included
    cumulative_logprob: float
    score: float  # cumulative_logprob / len(token_ids) ** length_penalty
    logprobs: list[dict]
    generation_logits: list
    text: str
    finish_reason: str | None
    stop_reason: int | str | None


@dataclass
class _Candidate:
    parent: Sequence
    token: int
    logprob: float
    score: float  # parent's cumulative logprob + logprob
    logprob_dict: dict | None
    generation_logits: object
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    detokenizer: object = None  # already holds `token` (decoded for the stop-string check)
    seq: Sequence | None = None  # the live beam it becomes


@dataclass
class BeamState:
    """Per-request beam-search state (`Request.beam`)."""

    widths: list[int]  # beam width of each step; the last one holds for the rest
    capacity: int  # finished hypotheses kept (the largest width)
    length_penalty: float
    early_stopping: bool | str
    diversity_rate: float
    max_new_tokens: int
    candidates_per_beam: int  # C / k
    block_size: int
    num_generated: int = 0  # tokens each live beam has generated
    hyps: list[Hypothesis] = field(default_factory=list)  # best first
    pending: dict[int, object] = field(default_factory=dict)  # seq_id -> BeamRowOutput of this step
    done: bool = False
    next_index: int = 1

    @classmethod
    def from_request(cls, req: Request, block_size: int) -> BeamState:
        p = req.params
        widths = list(p.beam_width_array or [p.effective_beam_width])
        p_ids = set(req.stop_token_ids) | (set() if p.ignore_eos else set(req.eos_token_ids))
        return cls(
            widths=widths,
            capacity=max(widths),
            length_penalty=DEFAULT_LENGTH_PENALTY if p.length_penalty is None else p.length_penalty,
            early_stopping=hf_early_stopping(p.early_stopping),
            diversity_rate=p.beam_search_diversity_rate or 0.0,
            max_new_tokens=min(p.max_tokens, req.max_seq_len - len(req.prompt_token_ids)),
            candidates_per_beam=max(2, 1 + len(p_ids)),
            block_size=block_size,
        )

    def width(self, step: int) -> int:
        return self.widths[min(step, len(self.widths) - 1)]

    @property
    def num_candidates(self) -> int:
        """Candidates each live beam reports this step (what the runner's top-k takes)."""
        return self.candidates_per_beam * self.width(self.num_generated)

    def reserved_fork_slots(self, seq: Sequence) -> int:
        """Beams still to be forked (counted on the first live beam only): the widest step to come minus
        the live beams."""
        live = seq.request.seqs
        if self.done or not live or live[0] is not seq:
            return 0
        return max(0, max(self.widths[min(self.num_generated, len(self.widths) - 1) :]) - len(live))

    def reserved_fork_blocks(self, seq: Sequence) -> int:
        """KV blocks the beams still to be forked will claim (counted on the first live beam only)."""
        shared = seq.num_prompt_tokens // self.block_size  # full prompt blocks are shared, never copied
        per_beam = -(-seq.max_total_tokens // self.block_size) - shared
        return self.reserved_fork_slots(seq) * per_beam

    def score(self, cum: float, length: int) -> float:
        return cum / (max(length, 1) ** self.length_penalty)

    def add(self, hyp: Hypothesis) -> None:
        self.hyps.append(hyp)
        self.hyps.sort(key=lambda h: -h.score)  # stable: on a tie the older one stays first
        del self.hyps[self.capacity :]


class BeamSearch:
    """The engine's beam bookkeeping: consumes the runner's beam rows, forks/prunes, builds deltas."""

    def __init__(self, scheduler, new_seq_id: Callable[[], int]):
        self.scheduler = scheduler
        self.kv = scheduler.kv
        self.new_seq_id = new_seq_id

    # --- engine hook ------------------------------------------------------------------------------
    def process(self, pending) -> list[Request]:
        """Store this step's beam rows; step every request whose live beams have all reported."""
        if pending is None:
            return []
        ready: dict[int, Request] = {}
        for row in pending.rows():
            seq = row.seq
            req, state = seq.request, seq.request.beam
            if seq.is_finished or state.done:  # aborted, or pruned while it ran
                continue
            state.pending[seq.seq_id] = row
            if all(s.seq_id in state.pending for s in req.seqs):
                ready[req.request_id] = req
        for req in ready.values():
            self._step(req)
        return list(ready.values())

    def release_idle(self) -> bool:
        """Nothing could be scheduled: every running sequence is a beam that reported and waits for a
        sibling which is queued and cannot come in. Those beams give their blocks back (their candidates stay
        valid; they recompute later, behind the queue). True if any did."""
        running = self.scheduler.running
        idle = [s for s in running if s.request.beam is not None and s.seq_id in s.request.beam.pending]
        for seq in reversed(idle):
            self.scheduler.release(seq)
        return bool(idle)

    # --- one beam-search step of one request ------------------------------------------------------
    def _step(self, req: Request) -> None:
        state, beams = req.beam, list(req.seqs)
        if req.first_token_time is None:
            req.first_token_time = time.monotonic()
        if not req.params.exclude_input_from_output and state.num_generated == 0:
            for seq in beams:
                seq.detokenizer.prime(seq.token_ids)  # the output (and its text) starts with the prompt
        width = state.width(state.num_generated)
        live, ended = self._select(req, beams, width)
        for c in ended:
            state.add(self._hypothesis(c))
        state.pending.clear()
        state.num_generated += 1
        if self._is_done(state, live):  # decided before any fork: a finished search copies nothing
            state.done = True
            live = []
        parents = {id(c.parent) for c in live}
        for seq in beams:  # beams without a continuation free their blocks at once
            if id(seq) not in parents:
                self.scheduler.finish(seq, "pruned")
        continuing: set[int] = set()
        for c in live:  # every fork is taken before any parent changes
            if id(c.parent) in continuing:
                c.seq = self._fork(c.parent)
            else:
                continuing.add(id(c.parent))
                c.seq = c.parent
        for c in live:
            self._append(c)
        if not state.done:
            req.seqs = [c.seq for c in live]

    def _select(self, req: Request, beams: list[Sequence], width: int):
        """The step's ranked candidates -> (next live beams, finished candidates among the first `width`)."""
        state = req.beam
        ranked = []
        for b, seq in enumerate(beams):
            row = state.pending[seq.seq_id]
            bonus = state.diversity_rate * b
            for c, lp in enumerate(row.logprobs):
                score = seq.cumulative_logprob + lp
                if score != float("-inf"):
                    ranked.append((score + bonus, score, b, c))
        ranked.sort(key=lambda t: -t[0])  # stable: ties keep beam, then candidate order
        live: list[_Candidate] = []
        ended: list[_Candidate] = []
        for j, (_, score, b, c) in enumerate(ranked[: state.candidates_per_beam * width]):
            if j >= width and len(live) == width:  # nothing further can finish or continue
                break
            seq = beams[b]
            row = state.pending[seq.seq_id]
            cand = _Candidate(seq, row.token_ids[c], row.logprobs[c], score,
                              None if row.logprob_dicts is None else row.logprob_dicts[c], row.generation_logits)
            self._check_end(cand)
            if cand.finish_reason is not None:
                if j < width:
                    ended.append(cand)
            elif len(live) < width:
                live.append(cand)
        return live, ended

    @staticmethod
    def _check_end(c: _Candidate) -> None:
        """Would appending c.token end its beam? The same conditions as OutputProcessor._append."""
        seq, tok = c.parent, c.token
        req, p = seq.request, seq.request.params
        n_out = seq.num_output_tokens + 1
        can_stop = p.min_tokens is None or n_out >= p.min_tokens
        is_stop_token = can_stop and tok in req.stop_token_ids
        if p.stop:  # stop strings: decode this candidate now (the detokenizer is kept if it is chosen)
            c.detokenizer = _clone_detokenizer(seq.detokenizer)
            matched = _feed(c.detokenizer, tok, can_stop, is_stop_token, p.include_stop_str_in_output)
            if matched is not None:
                c.finish_reason, c.stop_reason = "stop", matched
                return
        if is_stop_token:
            c.finish_reason, c.stop_reason = "stop", tok
        elif can_stop and not p.ignore_eos and tok in req.eos_token_ids:
            c.finish_reason = "stop"
        elif n_out >= p.max_tokens or seq.num_tokens + 1 >= req.max_seq_len:
            c.finish_reason = "length"

    def _is_done(self, state: BeamState, live: list[_Candidate]) -> bool:
        if not live:
            return True
        if len(state.hyps) < state.capacity:
            return False
        if state.early_stopping is True:
            return True
        length = state.num_generated
        if state.early_stopping == "never" and state.length_penalty > 0:
            length = state.max_new_tokens
        best = max(c.score for c in live) / (max(length, 1) ** state.length_penalty)
        return not best > state.hyps[-1].score

    # --- beams --------------------------------------------------------------------------------------
    def _hypothesis(self, c: _Candidate) -> Hypothesis:
        seq, p = c.parent, c.parent.request.params
        detok = c.detokenizer
        if detok is None:
            detok = _clone_detokenizer(seq.detokenizer)
            is_stop_token = c.finish_reason == "stop" and c.stop_reason == c.token
            _feed(detok, c.token, False, is_stop_token, p.include_stop_str_in_output)
        tokens = seq.output_token_ids + [c.token]
        return Hypothesis(
            token_ids=tokens,
            cumulative_logprob=c.score,
            score=seq.request.beam.score(c.score, len(tokens)),
            logprobs=seq.logprobs + ([c.logprob_dict] if c.logprob_dict is not None else []),
            generation_logits=seq.generation_logits + ([c.generation_logits] if c.generation_logits is not None
                                                       else []),
            text=detok.visible_text(True),
            finish_reason=c.finish_reason,
            stop_reason=c.stop_reason,
        )

    def _fork(self, parent: Sequence) -> Sequence:
        """A new beam sharing parent's tokens and KV blocks; its partially filled last block is copied."""
        req = parent.request
        child = Sequence(
            seq_id=self.new_seq_id(), request=req, index=req.beam.next_index, token_ids=list(parent.token_ids),
            num_prompt_tokens=parent.num_prompt_tokens, num_computed_tokens=parent.num_computed_tokens,
            cumulative_logprob=parent.cumulative_logprob, logprobs=list(parent.logprobs),
            generation_logits=list(parent.generation_logits), generator=parent.generator,
            # NOTE: the n-gram cache indexes one history; the child rebuilds its own.
            sampler_state={k: v for k, v in parent.sampler_state.items() if k != "ngrams"},
            detokenizer=_clone_detokenizer(parent.detokenizer), num_preemptions=parent.num_preemptions,
        )
        req.beam.next_index += 1
        self.kv.fork(parent, child)
        # the next token goes into the shared last block unless it starts a new one: copy it on write
        if child.num_computed_tokens % self.kv.block_size and not self.kv.copy_on_write(child):
            self.kv.free(child)  # no free block: recompute this beam's KV instead (like a preemption)
            child.num_computed_tokens = 0
        self.scheduler.add_forked(child)
        return child

    @staticmethod
    def _append(c: _Candidate) -> None:
        seq, p = c.seq, c.seq.request.params
        if c.detokenizer is not None:
            seq.detokenizer = c.detokenizer
        else:
            _feed(seq.detokenizer, c.token, p.min_tokens is None or seq.num_output_tokens + 1 >= p.min_tokens,
                  False, p.include_stop_str_in_output)
        seq.token_ids.append(c.token)
        seq.cumulative_logprob = c.score
        if c.logprob_dict is not None:
            seq.logprobs.append(c.logprob_dict)
        if c.generation_logits is not None:
            seq.generation_logits.append(c.generation_logits)

    # --- outputs ------------------------------------------------------------------------------------
    def seq_deltas(self, req: Request) -> list[SeqDelta]:
        """The best n beams as whole outputs (indexes 0..n-1): the finished hypotheses, and while the
        search runs (streaming) or when it was cancelled, the live beams too."""
        state, p = req.beam, req.params
        items = list(state.hyps)
        if not state.done:
            items += [self._live(seq) for seq in req.seqs]
            items.sort(key=lambda h: -h.score)
        prompt = [] if p.exclude_input_from_output else list(req.prompt_token_ids)
        return [
            SeqDelta(index=i, token_ids=prompt + h.token_ids, text=h.text, logprobs=list(h.logprobs),
                     cumulative_logprob=h.cumulative_logprob, finish_reason=h.finish_reason,
                     stop_reason=h.stop_reason, generation_logits=list(h.generation_logits))
            for i, h in enumerate(items[: p.n])
        ]

    @staticmethod
    def _live(seq: Sequence) -> Hypothesis:
        out = seq.output_token_ids
        return Hypothesis(out, seq.cumulative_logprob, seq.request.beam.score(seq.cumulative_logprob, len(out)),
                          seq.logprobs, seq.generation_logits, seq.detokenizer.visible_text(seq.is_finished),
                          seq.finish_reason, seq.stop_reason)


def _clone_detokenizer(detok):
    clone = copy.copy(detok)
    clone._ids = list(detok._ids)
    return clone


def _feed(detok, tok: int, can_stop: bool, is_stop_token: bool, include_stop: bool) -> str | None:
    """Decode tok as OutputProcessor._append does (a stop id is not text unless include_stop_str_in_output)."""
    if is_stop_token and not include_stop:
        return None
    return detok.add_tokens([tok], check_stop=can_stop)
