"""CUDA graphs for decode steps: one graph per batch-size bucket, captured at start, replayed with padding.

A decode step's kernels read every step-dependent value (ids, positions, slots, block tables, lengths)
from the persistent input buffers, so replaying a graph only needs those buffers refreshed. The eager
path (`enforce_eager=True`) is the twin that checks it.

With LoRA enabled (`lora_ctx`), each batch size gets three graphs in the one shared memory pool: the model
body with the LoRA kernels, the body without them (ends by copying its hidden states into the first
body's output) and the head (logits + argmax) reading that output. A step replays one body, chosen by
`lora_ctx.active` (does any token of the step have an adapter?), then the head: steps without adapters
pay nothing for LoRA, and the logits exist once per batch size.
"""

from __future__ import annotations

import bisect
import logging

import torch

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
        self.greedy[bs] = fast_ops.greedy_sample(self.logits[bs])

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
        if ctx is None:
            self.graphs[bs].replay()
        else:
            (self.graphs if ctx.active else self.base_graphs)[bs].replay()
            self.heads[bs].replay()
        return self.logits[bs], self.greedy[bs]
