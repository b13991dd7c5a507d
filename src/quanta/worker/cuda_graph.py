"""CUDA graphs for decode steps: one graph per batch-size bucket, captured at start, replayed with padding.

A decode step's kernels read every step-dependent value (ids, positions, slots, block tables, lengths)
from the persistent input buffers, so replaying a graph only needs those buffers refreshed. The eager
path (`enforce_eager=True`) is the twin that checks it.

With LoRA enabled (`lora_ctx`), each batch size gets three graphs in the one shared memory pool: the model
body with the LoRA kernels, the body without them (ends by copying its hidden states into the first
body's output) and the head (logits + argmax) reading that output. A step replays one body, chosen by
`lora_ctx.active` (does any token of the step have an adapter?), then the head: steps without adapters
pay nothing for LoRA, and the logits exist once per batch size.

Token hand-over (GraphTokens; env QUANTA_GRAPH_TOKENS, default on): the graph's greedy kernels write a replay's
ids and log-probabilities straight into pinned host memory (slot replay % 2, tagged with the replay's count) and
its ids into the input-ids buffer, so an overlapped steady-state step needs neither a device -> host copy after
the graph nor a device -> device input feed before it (worker/model_runner.py execute_async).
"""

from __future__ import annotations

import bisect
import logging

import torch

from quanta import envs
from quanta.attention.forward_context import forward_context
from quanta.attention.metadata import AttentionMetadata
from quanta.layers import fast_ops

logger = logging.getLogger("quanta")


def graph_batch_sizes(max_batch_size: int, limit: int = 1024) -> list[int]:
    top = min(max_batch_size, limit)
    sizes = [b for b in (1, 2, 4, 8) if b <= top]
    sizes += list(range(16, min(top, 256) + 1, 16)) + list(range(288, min(top, 512) + 1, 32))
    sizes += list(range(576, top + 1, 64))
    if sizes[-1] != top:
        sizes.append(top)
    return sorted(set(sizes))


class CudaGraphRunner:
    def __init__(self, model, buffers, backend, max_seq_len: int, batch_sizes: list[int], lora_ctx=None):
        self.model = model
        self.buffers = buffers
        self.backend = backend
        self.max_seq_len = max_seq_len
        self.batch_sizes = batch_sizes
        self.lora_ctx = lora_ctx  # quanta.lora.layers.LoRAContext when LoRA is enabled
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}  # the whole step; with LoRA: the body with LoRA
        self.base_graphs: dict[int, torch.cuda.CUDAGraph] = {}  # with LoRA: the body without LoRA
        self.heads: dict[int, torch.cuda.CUDAGraph] = {}  # with LoRA: logits + argmax from the body's hidden
        self.logits: dict[int, torch.Tensor] = {}  # static outputs [bs, vocab] in the model's dtype
        self.greedy: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # argmax ids, their logprobs [bs]
        self.tokens = GraphTokens(self.max_batch_size, buffers.device) if envs.get("QUANTA_GRAPH_TOKENS") else None

    @property
    def max_batch_size(self) -> int:
        return self.batch_sizes[-1] if self.batch_sizes else 0

    def bucket(self, num_seqs: int) -> int:
        return self.batch_sizes[bisect.bisect_left(self.batch_sizes, num_seqs)]

    def _body(self, bs: int) -> torch.Tensor:
        """The model on the input buffers' views of a bs-sequence decode step (the layout build(pad_to=bs) fills)."""
        b = self.buffers
        ids, pos, slots, _, lens, qsl = b.views(bs, bs)
        meta = AttentionMetadata(slot_mapping=slots, block_tables=b.block_tables[:bs], seq_lens=lens,
                                 query_start_loc=qsl, max_query_len=1, max_seq_len=self.max_seq_len)
        with forward_context(meta, self.backend):
            return self.model(ids, pos)

    def _head(self, bs: int, hidden: torch.Tensor) -> None:
        self.logits[bs] = self.model.compute_logits(hidden, float32=False)
        # NOTE: argmax in the graph saves plain-greedy steps the sampler's launches
        t = self.tokens
        handoff = None if t is None else (t.count, t.host_ids, t.host_lps, self.buffers.views(bs, bs)[0])
        self.greedy[bs] = fast_ops.greedy_sample(self.logits[bs], handoff)

    @torch.inference_mode()
    def capture(self) -> None:
        n = self.max_batch_size
        pool = torch.cuda.graph_pool_handle()
        ctx = self.lora_ctx
        was_active = ctx.active if ctx is not None else False
        for bs in reversed(self.batch_sizes):
            self.buffers.fill_dummy(bs)
            if ctx is not None:
                ctx.active = True  # warm up and capture with the LoRA kernels (grids cover any grouping)
            self.model.compute_logits(self._body(bs), float32=False)  # warm up: Triton compiles, cuBLAS picks
            torch.cuda.synchronize()
            self.graphs[bs] = graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                hidden = self._body(bs)
                if ctx is None:
                    self._head(bs, hidden)
            if ctx is None:
                continue
            self.heads[bs] = head = torch.cuda.CUDAGraph()
            with torch.cuda.graph(head, pool=pool):
                self._head(bs, hidden)
            ctx.active = False  # the same body without LoRA (same shapes: no second warm-up)
            self.base_graphs[bs] = base = torch.cuda.CUDAGraph()
            with torch.cuda.graph(base, pool=pool):
                hidden.copy_(self._body(bs))
        if ctx is not None:
            ctx.active = was_active
        torch.cuda.synchronize()
        logger.info("quanta: captured CUDA graphs for %d decode batch sizes up to %d%s", len(self.graphs), n,
                    " (each with and without LoRA)" if ctx is not None else "")

    def replay(self, bs: int) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Run the graph(s); returns (logits [bs, vocab] in the model's dtype, (argmax ids [bs], their logprobs)).
        With LoRA: the body with the LoRA kernels only when a token of the step has an adapter."""
        ctx = self.lora_ctx
        if self.tokens is not None:
            self.tokens.replays += 1
        if ctx is None:
            self.graphs[bs].replay()
        else:
            (self.graphs if ctx.active else self.base_graphs)[bs].replay()
            self.heads[bs].replay()
        return self.logits[bs], self.greedy[bs]


class GraphTokens:
    """The greedy kernels' hand-over buffers (kernels/greedy.py): a device replay counter and two pinned host slots
    [count, ids...] / [logprobs...]. Replay k writes slot k % 2; the engine reads step N's slot after step N's
    event and launches step N + 2 (the next writer of that slot) only after it has read step N."""

    def __init__(self, max_rows: int, device: torch.device):
        self.count = torch.zeros(1, dtype=torch.int64, device=device)
        self.host_ids = torch.zeros(2, max_rows + 1, dtype=torch.int64, pin_memory=True)
        self.host_lps = torch.zeros(2, max_rows, dtype=torch.float32, pin_memory=True)
        self.replays = 0  # what count will read once the replays launched so far have run

    def last(self, n: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(host ids [n], host logprobs [n], the count their slot must carry) of the latest replay."""
        k = self.replays
        return self.host_ids[k % 2, 1 : n + 1], self.host_lps[k % 2, :n], k

    def check(self, k: int) -> None:
        got = int(self.host_ids[k % 2, 0])
        if got != k:
            raise RuntimeError(f"CUDA graph token hand-over: slot {k % 2} holds replay {got}, expected {k}")
