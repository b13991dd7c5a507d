"""Paged KV cache bookkeeping: a pool of fixed-size blocks with reference counts (plain Python).

Blocks carry a ref count so that forks (beams, n samples) can share them and copy on write, and a slot
for a content hash so hash-chained prefix reuse can be layered on without changing callers.
"""

from __future__ import annotations

from collections import deque

from quanta.engine.request import Sequence


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[int | None] = [None] * num_blocks
        self.free_block_ids: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_block_ids)

    def num_blocks_for(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    def num_new_blocks(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks `seq` must add to hold `num_new_tokens` more tokens past those already computed."""
        need = self.num_blocks_for(seq.num_computed_tokens + num_new_tokens)
        return max(0, need - len(seq.block_ids))

    def allocate_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        n = self.num_new_blocks(seq, num_new_tokens)
        if n > len(self.free_block_ids):
            return False
        for _ in range(n):
            block_id = self.free_block_ids.popleft()
            self.ref_counts[block_id] = 1
            seq.block_ids.append(block_id)
        return True

    def free(self, seq: Sequence) -> None:
        # NOTE: reversed, so the tail of a sequence is reused first and its prefix stays longest.
        for block_id in reversed(seq.block_ids):
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self.block_hashes[block_id] = None
                self.free_block_ids.append(block_id)
        seq.block_ids = []

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Child shares all of parent's blocks (copy-on-write happens when a shared block is written)."""
        for block_id in parent.block_ids:
            self.ref_counts[block_id] += 1
        child.block_ids = list(parent.block_ids)
