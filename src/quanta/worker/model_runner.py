"""The data plane: one flattened forward over every scheduled token, then sampling.

Prefill chunks and decode tokens of many sequences run together in ONE forward; logits are computed only
for the rows that need them. At most one device-to-host transfer point per step (`_to_host`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from quanta.attention.backend import get_backend
from quanta.attention.forward_context import forward_context
from quanta.engine.request import Sequence
from quanta.engine.scheduler import SchedulerOutput
from quanta.layers import fast_ops
from quanta.sampling.beam import PendingBeamRows, beam_candidates
from quanta.sampling.sampler import Sampler, is_plain_greedy
from quanta.sampling.types import SamplingRow
from quanta.worker import kv_transfer
from quanta.worker.input_batch import ForwardBatch, InputBuffers
from quanta.worker.logits_extras import prompt_logits_outputs, topk_to_dicts
from quanta.worker.pending import HostRing, PendingStep, fed_in_place, feed_pending_inputs, joint_base, joint_views


@dataclass
class RunnerOutput:
    sampled_seqs: list[Sequence] = field(default_factory=list)
    sampled_token_ids: list[int] = field(default_factory=list)
    sampled_logprobs: list[float] = field(default_factory=list)
    logprobs: list[dict | None] = field(default_factory=list)  # per sampled row, when asked
    generation_logits: list = field(default_factory=list)  # per sampled row: [vocab] cpu tensor or None
    prompt_logprobs: dict[int, list] = field(default_factory=dict)  # seq_id -> entries for this chunk
    context_logits: dict[int, torch.Tensor] = field(default_factory=dict)  # seq_id -> [n, vocab] cpu
    failed: dict[int, BaseException] = field(default_factory=dict)  # request_id -> error
    beam_rows: PendingBeamRows | None = None  # beam-search rows: their top candidates (sampling/beam.py)


class ModelRunner:
    def __init__(self, model, device: torch.device, dtype: torch.dtype, block_size: int,
                 max_num_tokens: int, max_batch_size: int, max_seq_len: int, backend: str):
        self.model = model
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.max_num_tokens = max_num_tokens
        self.backend = get_backend(backend)
        self.buffers = InputBuffers(max_num_tokens, max_batch_size, -(-max_seq_len // block_size), device)
        self.sampler = Sampler()
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.host_kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []  # host tier (KvCacheConfig.host_cache_size)
        self.max_seq_len = max_seq_len
        self.graphs = None  # CudaGraphRunner once captured
        self.lora = None  # quanta.lora.LoRAManager when LoRA is on: fills the step's token -> adapter slots
        self.ring = HostRing(max_batch_size, device)  # overlap scheduling: sampled tokens -> host
        # NOTE: overlap scheduling builds step N+1's inputs in the pinned staging buffers while step N may not
        # have read them yet: each build first waits for the previous step's uploads (event after them).
        self._uploaded = None

    def capture_cuda_graphs(self, max_batch_size: int) -> None:
        from quanta.worker.cuda_graph import CudaGraphRunner, graph_batch_sizes

        sizes = graph_batch_sizes(min(max_batch_size, self.max_num_tokens))
        lora_ctx = self.lora.ctx if self.lora is not None else None  # with LoRA: graphs with and without it
        self.graphs = CudaGraphRunner(self.model, self.buffers, self.backend, self.max_seq_len, sizes, lora_ctx)
        self.graphs.capture()

    def _graph_bucket(self, out: SchedulerOutput) -> int:
        """The graph batch size for a pure-decode step that a captured graph can run, else 0."""
        g = self.graphs
        if g is None or len(out.scheduled) > g.max_batch_size:
            return 0
        for s in out.scheduled:
            if s.num_new_tokens != 1 or not s.do_sample or s.seq.request.needs_prompt_logits:
                return 0
        return g.bucket(len(out.scheduled))

    def allocate_kv_cache(self, num_blocks: int) -> None:
        # NOTE: on a CPU, empty() maps pages lazily, so a cache sized from free RAM costs nothing until
        # used; the reference attention reads only written slots. On a GPU, zeros keep padded reads finite.
        alloc = torch.zeros if self.device.type == "cuda" else torch.empty
        for attn in self.model.attention_layers():
            shape = (num_blocks, self.block_size, attn.num_kv_heads, attn.head_dim)
            attn.k_cache = alloc(shape, dtype=self.dtype, device=self.device)
            attn.v_cache = alloc(shape, dtype=self.dtype, device=self.device)
            self.kv_caches.append((attn.k_cache, attn.v_cache))

    def allocate_host_cache(self, num_blocks: int) -> None:
        self.host_kv_caches = kv_transfer.allocate_host_cache(self.kv_caches, num_blocks)

    def set_attention_windows(self, windows: list[int | None]) -> None:
        """Per-layer sliding window (KvCacheConfig.max_attention_window / the model's sliding_window)."""
        for attn, window in zip(self.model.attention_layers(), windows):
            attn.window = window

    def _copy_blocks(self, out: SchedulerOutput) -> None:
        """The KV manager's block moves for this step (prefix reuse, host tier, copy-on-write)."""
        if out.blocks_to_swap_out or out.blocks_to_swap_in or out.blocks_to_copy:
            kv_transfer.transfer_blocks(self.kv_caches, self.host_kv_caches, out.blocks_to_swap_out,
                                        out.blocks_to_swap_in, out.blocks_to_copy)

    @torch.inference_mode()
    def profile_peak_bytes(self) -> int:
        """Run a forward at max_num_tokens (no cache) to measure activation memory on a GPU."""
        if self.device.type != "cuda":
            return 0
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        n = self.max_num_tokens
        ids = torch.randint(0, self.model.config.vocab_size, (n,), device=self.device)
        hidden = self.model.model.embed_tokens(ids)
        for layer in self.model.model.layers:  # MLP dominates; attention uses the cache later
            hidden = layer.mlp(hidden)
        self.model.compute_logits(hidden[-min(n, 256) :])
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device) - before

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        if self._uploaded is not None:
            self._uploaded.synchronize()
            self._uploaded = None
        self._copy_blocks(out)
        graph_bs = self._graph_bucket(out)
        batch = self.buffers.build(out, self.block_size, pad_to=graph_bs)
        if self.lora is not None:
            self.lora.prepare(out.scheduled, batch.num_tokens)
        result = RunnerOutput()
        greedy = None
        if graph_bs:
            logits, greedy = self.graphs.replay(graph_bs)
            logits = logits[: len(out.scheduled)]  # [R, vocab] float32
        else:
            with forward_context(batch.meta, self.backend):
                hidden = self.model(batch.input_ids, batch.positions)  # [T, hidden]
            self._prompt_extras(out, batch, hidden, result)
            if not batch.sample_rows:
                return result
            logits = self.model.compute_logits(hidden[batch.logits_indices])  # [R, vocab] float32
        seqs = [out.scheduled[i].seq for i in batch.sample_rows]
        plain = all(_plain_greedy(seq) for seq in seqs)
        if not plain:
            logits = logits.float()  # a graph's logits are in the model's dtype
        seqs, logits, greedy = self._beam_rows(seqs, logits, greedy, result)
        if not seqs:
            return result
        if plain:  # argmax only: skip the sampler
            n = len(seqs)
            ids, lps = (greedy[0][:n], greedy[1][:n]) if greedy is not None else fast_ops.greedy_sample(logits)
            base = joint_base(ids, lps) if ids.is_cuda else None  # the fused greedy's ids + logprobs: one copy
            host = joint_views(_to_host([base])[0], ids, lps) if base is not None else _to_host([ids, lps])
            token_ids, lps = (t.tolist() for t in host)
            result.sampled_seqs, result.sampled_token_ids, result.sampled_logprobs = seqs, token_ids, lps
            result.logprobs, result.generation_logits = [None] * n, [None] * n
            return result
        rows = [self._row(seq) for seq in seqs]
        sampled = self.sampler(logits, rows)
        self._collect(seqs, rows, logits, sampled, result)
        return result

    @torch.inference_mode()
    def execute_async(self, out: SchedulerOutput, prev: PendingStep | None) -> PendingStep:
        """Launch a step whose sampling rows are all plain greedy without waiting for its tokens; rows whose
        input is `prev`'s still-unread token get it on the device. The caller resolves the result later."""
        if self._uploaded is not None:
            self._uploaded.synchronize()
        self._copy_blocks(out)
        graph_bs = self._graph_bucket(out)
        in_place = bool(graph_bs) and fed_in_place(out, prev)  # prev's graph wrote these input ids already
        batch = self.buffers.build(out, self.block_size, pad_to=graph_bs, skip_ids=in_place)
        if not in_place:
            feed_pending_inputs(out, batch.token_offsets, batch.input_ids, prev)
        if self.lora is not None:
            self.lora.prepare(out.scheduled, batch.num_tokens)
        if self.device.type == "cuda":
            self._uploaded = torch.cuda.Event()
            self._uploaded.record()
        seqs = [out.scheduled[i].seq for i in batch.sample_rows]
        rows = {s.seq_id: i for i, s in enumerate(seqs)}
        if graph_bs:
            _, (ids, lps) = self.graphs.replay(graph_bs)
            ids, lps = ids[: len(seqs)], lps[: len(seqs)]
            tokens = self.graphs.tokens
            if tokens is not None:  # the graph wrote them to the host itself: only an event to wait for
                host_ids, host_lps, k = tokens.last(len(seqs))
                event = torch.cuda.Event()
                event.record()
                return PendingStep(out, seqs, ids, host_ids, host_lps, event, rows, (tokens, k))
        else:
            with forward_context(batch.meta, self.backend):
                hidden = self.model(batch.input_ids, batch.positions)  # [T, hidden]
            if not seqs:
                return PendingStep(out, [], None, None, None, None)
            ids, lps = fast_ops.greedy_sample(self.model.compute_logits(hidden[batch.logits_indices], float32=False))
        host_ids, host_lps, event = self.ring.copy_out(ids, lps)
        return PendingStep(out, seqs, ids, host_ids, host_lps, event, rows)

    def _beam_rows(self, seqs, logits, greedy, result: RunnerOutput):
        """Beam-search rows hand their top candidates to the engine instead of sampling (sampling/beam.py);
        returns the other rows (seqs, logits [R', vocab], in-graph argmax or None)."""
        is_beam = [s.request.beam is not None for s in seqs]
        if not any(is_beam):
            return seqs, logits, greedy
        beam = [i for i, b in enumerate(is_beam) if b]
        keep = [i for i, b in enumerate(is_beam) if not b]
        beam_seqs = [seqs[i] for i in beam]
        num_candidates = max(s.request.beam.num_candidates for s in beam_seqs)
        rows = [self._row(s) for s in beam_seqs]
        result.beam_rows = beam_candidates(logits[beam], beam_seqs, rows, num_candidates)
        if greedy is not None:
            greedy = (greedy[0][keep], greedy[1][keep])
        return [seqs[i] for i in keep], logits[keep], greedy

    def _row(self, seq: Sequence) -> SamplingRow:
        req = seq.request
        return SamplingRow(
            request_id=req.request_id,
            params=req.params,
            prompt_token_ids=req.prompt_token_ids,
            output_token_ids=seq.output_token_ids,
            eos_token_ids=req.eos_token_ids,
            stop_token_ids=req.stop_token_ids,
            bad_words_ids=req.bad_words_ids,
            generator=seq.generator,
            state=seq.sampler_state,
        )

    def _collect(self, seqs, rows, logits, sampled, result: RunnerOutput) -> None:
        tensors = [sampled.token_ids, sampled.sampled_logprobs]
        has_topk = sampled.topk_ids is not None
        if has_topk:
            tensors += [sampled.topk_ids, sampled.topk_logprobs, sampled.sampled_ranks]
        host = _to_host(tensors)
        token_ids, lps = host[0].tolist(), host[1].tolist()
        topk = topk_to_dicts(rows, token_ids, lps, *host[2:]) if has_topk else [None] * len(rows)
        want_gen = [r.params.return_generation_logits for r in rows]
        gen_logits = logits.to("cpu") if any(want_gen) else None
        result.sampled_seqs = seqs
        result.sampled_token_ids = token_ids
        result.sampled_logprobs = lps
        result.logprobs = topk
        result.generation_logits = [gen_logits[i] if w else None for i, w in enumerate(want_gen)]

    def _prompt_extras(self, out: SchedulerOutput, batch: ForwardBatch, hidden, result: RunnerOutput) -> None:
        """prompt_logprobs / context logits for sequences whose prompt is (partly) in this step (rare)."""
        for i, s in enumerate(out.scheduled):
            req = s.seq.request
            if not req.needs_prompt_logits or s.seq.index != 0:
                continue
            start = s.seq.num_computed_tokens
            n = min(s.num_new_tokens, max(0, s.seq.num_prompt_tokens - start))
            if n <= 0:
                continue
            off = batch.token_offsets[i]
            logits = self.model.compute_logits(hidden[off : off + n]).to("cpu")  # [n, vocab]
            lp, ctx = prompt_logits_outputs(req, s.seq, start, logits)
            if lp is not None:
                result.prompt_logprobs[s.seq.seq_id] = lp
            if ctx is not None:
                result.context_logits[s.seq.seq_id] = ctx


def _plain_greedy(seq: Sequence) -> bool:
    extra = seq.request.extra
    plain = extra.get("plain_greedy")
    if plain is None:
        plain = extra["plain_greedy"] = is_plain_greedy(seq.request.params)
    return plain


def _to_host(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The step's one device->host synchronization point."""
    if not tensors or tensors[0].device.type != "cuda":
        return tensors
    host = [t.to("cpu", non_blocking=True) for t in tensors]
    torch.cuda.current_stream().synchronize()
    return host
