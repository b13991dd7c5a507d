"""After a step: append sampled tokens, detokenize, apply stop conditions, build per-request deltas."""

from __future__ import annotations

import time

from quanta.engine.output import RequestDelta, SeqDelta
from quanta.engine.request import Request, Sequence
from quanta.engine.scheduler import Scheduler, SchedulerOutput


class OutputProcessor:
    def __init__(self, scheduler: Scheduler, beams=None):
        self.scheduler = scheduler
        self.beams = beams  # BeamSearch (engine/beam_search.py): beam rows carry candidates, not tokens
        self.failed: dict[int, BaseException] = {}

    def process(self, out: SchedulerOutput, runner_out, requests: dict[int, Request]) -> list[RequestDelta]:
        touched: dict[int, Request] = {}
        self.failed: dict[int, BaseException] = {}  # request_id -> its own error (tokenizer, stop handling)
        self._add_prompt_extras(out, runner_out)
        rows = zip(runner_out.sampled_seqs, runner_out.sampled_token_ids, runner_out.sampled_logprobs,
                   runner_out.logprobs, runner_out.generation_logits)
        for seq, tok, lp, lp_dict, gen in rows:
            rid = seq.request.request_id
            if seq.is_finished or rid in self.failed:  # aborted while the step ran, or already failed
                continue
            try:
                self._append(seq, tok, lp, lp_dict, gen)
            except Exception as e:  # one request's detokenizer / stop handling: only it fails
                self.failed[rid] = e
                continue
            touched[rid] = seq.request
        if self.beams is not None:
            for req in self.beams.process(getattr(runner_out, "beam_rows", None)):
                touched[req.request_id] = req
        deltas = []
        for rid, req in touched.items():
            if rid in self.failed:
                continue
            try:
                d = self._delta(req)
            except Exception as e:
                self.failed[rid] = e
                continue
            if d is not None:
                deltas.append(d)
        return deltas

    @staticmethod
    def _add_prompt_extras(out: SchedulerOutput, runner_out) -> None:
        """Prompt logprobs / context logits of this step's prompt chunks, each prompt position once.

        A sequence preempted by recompute prefills its prompt again: positions already held are skipped.
        """
        if not runner_out.prompt_logprobs and not runner_out.context_logits:
            return
        for s in out.scheduled:
            seq_id, req = s.seq.seq_id, s.seq.request
            start = s.seq.num_computed_tokens - s.num_new_tokens  # update() has already advanced it
            entries = runner_out.prompt_logprobs.get(seq_id)
            if entries is not None:  # entries cover list indexes from (start + 1), or from 0 with its None
                first = 0 if start == 0 else start + 1
                req.prompt_logprobs.extend(entries[max(0, len(req.prompt_logprobs) - first) :])
            logits = runner_out.context_logits.get(seq_id)  # [n, vocab]: prompt positions start .. start+n-1
            if logits is not None:
                held = sum(t.shape[0] for t in req.context_logits)
                if held < start + logits.shape[0]:
                    req.context_logits.append(logits[max(0, held - start) :])

    def _append(self, seq: Sequence, tok: int, lp: float, lp_dict, gen) -> None:
        req, p = seq.request, seq.request.params
        seq.drop_placeholder()  # overlap scheduling: the token it stood for is `tok`
        if req.first_token_time is None:
            req.first_token_time = time.monotonic()
        if not p.exclude_input_from_output and seq.num_output_tokens == 0:
            seq.detokenizer.prime(seq.token_ids)  # the output (and its text) starts with the prompt
        seq.token_ids.append(tok)
        seq.cumulative_logprob += lp
        if lp_dict is not None:
            seq.logprobs.append(lp_dict)
        if gen is not None:
            seq.generation_logits.append(gen)
        n_out = seq.num_output_tokens
        can_stop = p.min_tokens is None or n_out >= p.min_tokens
        is_stop_token = can_stop and tok in req.stop_token_ids
        if not (is_stop_token and not p.include_stop_str_in_output):
            matched = seq.detokenizer.add_tokens([tok], check_stop=can_stop)
        else:
            matched = None
        if matched is not None:
            self.scheduler.finish(seq, "stop", matched)
        elif is_stop_token:
            self.scheduler.finish(seq, "stop", tok)
        elif can_stop and not p.ignore_eos and tok in req.eos_token_ids:
            self.scheduler.finish(seq, "stop", None)
        elif n_out >= p.max_tokens or seq.num_tokens >= req.max_seq_len:
            self.scheduler.finish(seq, "length")

    def _delta(self, req: Request) -> RequestDelta | None:
        finished = req.is_finished
        if req.beam is not None and not finished:  # each update carries the current best beams, whole
            if not req.extra.get("streaming"):
                return None
            return RequestDelta(req.request_id, self.beams.seq_deltas(req), finished=False,
                                prompt_logprobs=self._prompt_lp_once(req), final_replace=True)
        # NOTE: best_of > n streams nothing until the end: which n sequences are returned is known only
        # then, and streamed deltas must add up to the final text.
        if not finished and (not req.extra.get("streaming") or len(req.seqs) > req.params.n):
            return None
        if finished:
            return self.final_delta(req)
        return RequestDelta(req.request_id, [self._seq_delta(s) for s in req.seqs], finished=False,
                            prompt_logprobs=self._prompt_lp_once(req))

    def final_delta(self, req: Request) -> RequestDelta:
        p = req.params
        seqs = req.seqs
        replace = len(seqs) > p.n or req.beam is not None
        if req.beam is not None:  # beam search: the best n hypotheses (engine/beam_search.py)
            deltas = self.beams.seq_deltas(req)
        else:
            if replace:  # best_of > n: top n by cumulative logprob
                seqs = sorted(seqs, key=lambda s: s.cumulative_logprob, reverse=True)[: p.n]
            deltas = [self._seq_delta(s, finished=True, full=replace) for s in seqs]
        if replace:
            for i, d in enumerate(deltas):
                d.index = i
        ctx = None
        if req.context_logits:
            import torch

            ctx = torch.cat(req.context_logits, dim=0)
        return RequestDelta(req.request_id, deltas, finished=True, prompt_logprobs=self._prompt_lp_once(req),
                            context_logits=ctx, final_replace=replace)

    @staticmethod
    def _prompt_lp_once(req: Request):
        if req.params.prompt_logprobs is None or req.extra.get("prompt_lp_sent"):
            return None
        if len(req.prompt_logprobs) < len(req.prompt_token_ids):
            return None
        req.extra["prompt_lp_sent"] = True
        return req.prompt_logprobs

    @staticmethod
    def _seq_delta(seq: Sequence, finished: bool = False, full: bool = False) -> SeqDelta:
        sent = seq.sent_offsets  # tokens, text chars, logprobs, generation logits already sent
        if full:
            sent[:] = [0, 0, 0, 0]
        # exclude_input_from_output=False: token_ids (and text) hold prompt + generated, as in TensorRT-LLM
        out_ids = seq.output_token_ids if seq.request.params.exclude_input_from_output else seq.token_ids
        text = seq.detokenizer.visible_text(finished or seq.is_finished)
        d = SeqDelta(
            index=seq.index,
            token_ids=out_ids[sent[0] :],
            text=text[sent[1] :],
            logprobs=seq.logprobs[sent[2] :],
            cumulative_logprob=seq.cumulative_logprob if seq.request.params.logprobs is not None else None,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
            generation_logits=seq.generation_logits[sent[3] :],
        )
        sent[:] = [len(out_ids), len(text), len(seq.logprobs), len(seq.generation_logits)]
        return d
