"""Paged KV cache bookkeeping (plain Python): a pool of fixed-size blocks with reference counts,
hash-chained prefix reuse with LRU eviction, an optional host (CPU RAM) tier, and fork for shared prefixes.

A block's life with reuse on: free (ref 0, no hash) -> owned by one or more sequences (ref >= 1) ->
once full AND computed, published under its chain hash -> freed (ref 0) but still cached, evictable in LRU
order -> evicted when a fresh block is needed (its contents go to the host tier when there is one) ->
reused. A new sequence starts from its longest cached prefix (`lookup` then `acquire`).

Chain hash of block i = H(hash of block i-1, its token ids); block 0's parent is a root hash of the
request's `cache_salt` and `adapter_id`, so different salts / adapters never share blocks.

Device work implied by the bookkeeping (block copies for partial reuse, swaps to and from the host tier)
is queued here, drained by the scheduler into SchedulerOutput, and done by the model runner at the top of
the next execute(), in the order swap-out, swap-in, copy (see `take_transfers` for why that order is safe).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field
from itertools import islice

from quanta.engine.request import Sequence

# A partial match (enable_partial_reuse) needs its first two tokens to match; of the cached blocks that
# share them (and the parent), this many of the newest are compared.
PARTIAL_MATCH_CANDIDATES = 16


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _digest(data: bytes) -> bytes:
    # NOTE: a keyed-free cryptographic hash, not Python's hash(): crafted prompts must not be able to
    # collide with another user's blocks (cache_salt isolates tenants only if hashes cannot collide).
    return hashlib.blake2b(data, digest_size=16).digest()


def root_hash(request) -> bytes:
    """Parent hash of a request's first block: its cache_salt and adapter id (None for plain requests)."""
    salt, adapter = getattr(request, "cache_salt", None), getattr(request, "adapter_id", None)
    return _digest(repr(("quanta-kv-root", salt, adapter)).encode())


@dataclass
class PrefixHit:
    """What `lookup` found for a sequence (nothing is taken until `acquire`)."""

    blocks: list[tuple[int, int]] = field(default_factory=list)  # per full block, chain order:
    # (device block, -1) for a block cached on the device, (-1, host slot) for one in the host tier
    partial: tuple[int, int] | None = None  # (cached device block, matched tokens): copied into a fresh block
    num_tokens: int = 0  # tokens covered: full blocks * block_size + partial tokens

    @property
    def num_device_blocks(self) -> int:
        return sum(1 for b, _ in self.blocks if b >= 0)


@dataclass
class CacheStats:
    """Cumulative counters (per engine), reported in get_stats()."""

    num_lookups: int = 0  # sequences admitted with a lookup
    reused_blocks: int = 0  # full or partial blocks taken from the cache at admission
    missed_blocks: int = 0  # blocks of admitted sequences that had to be computed
    reused_tokens: int = 0  # tokens whose computation the cache saved
    partial_reuses: int = 0  # copy-on-write partial matches
    onboarded_blocks: int = 0  # host -> device
    offloaded_blocks: int = 0  # device -> host
    evicted_blocks: int = 0  # cached blocks whose device memory was taken for something else

    @property
    def hit_rate(self) -> float:
        total = self.reused_blocks + self.missed_blocks
        return self.reused_blocks / total if total else 0.0


class KVCacheManager:
    """Block pool. Without reuse (the default here; the engine passes KvCacheConfig's flags) it is a plain
    ref-counted free list, and freed blocks go to the back of it."""

    def __init__(self, num_blocks: int, block_size: int, enable_block_reuse: bool = False,
                 enable_partial_reuse: bool = True, num_host_blocks: int = 0):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_block_reuse = enable_block_reuse
        self.enable_partial_reuse = enable_block_reuse and enable_partial_reuse
        self.num_host_blocks = num_host_blocks if enable_block_reuse else 0
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[bytes | None] = [None] * num_blocks  # set once a block is full and computed
        # ref-0 blocks, popped from the front: unhashed ones first, then cached ones in LRU order
        self.free_block_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[bytes, int] = {}  # chain hash -> the device block published under it
        self._parent: dict[int, bytes] = {}  # published block -> its parent hash
        self._tokens: dict[int, array] = {}  # published block -> its token ids, for partial matches
        # (parent hash, first two tokens) -> published blocks, oldest first: the candidates of a partial match
        self._children: dict[tuple[bytes, int, int], dict[int, None]] = {}
        self._host: OrderedDict[bytes, int] = OrderedDict()  # chain hash -> host slot, LRU order
        self._host_free = list(range(self.num_host_blocks - 1, -1, -1))
        # Copy sources and host slots that queued transfers read: held until those transfers have run
        # (taken by the scheduler into a step, released when the next step begins).
        self._pinned: list[int] = []
        self._pinned_in_flight: list[int] = []
        self._host_busy: set[int] = set()
        self._host_in_flight: set[int] = set()
        self._swap_out: list[tuple[int, int]] = []
        self._swap_in: list[tuple[int, int]] = []
        self._copies: list[tuple[int, int]] = []
        self.stats = CacheStats()

    # --- counts -------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds (cached ones included: they are evicted on demand)."""
        return len(self.free_block_ids)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_block_ids)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def num_host_cached_blocks(self) -> int:
        return len(self._host)

    def num_blocks_for(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    def num_new_blocks(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks `seq` must add to hold `num_new_tokens` more tokens past those already computed."""
        need = self.num_blocks_for(seq.num_computed_tokens + num_new_tokens)
        return max(0, need - len(seq.block_ids))

    # --- plain allocation ---------------------------------------------------------------------------
    def allocate_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """All or nothing: blocks for `num_new_tokens` more tokens, or False and nothing taken."""
        n = self.num_new_blocks(seq, num_new_tokens)
        if n > len(self.free_block_ids):
            return False
        for _ in range(n):
            seq.block_ids.append(self.allocate_block())
        return True

    def allocate_block(self) -> int:
        """One fresh block (ref 1), evicting the least recently used cached block if it comes to that."""
        block_id, _ = self.free_block_ids.popitem(last=False)
        h = self.block_hashes[block_id]
        if h is not None:
            self._evict(block_id, h)
        self.ref_counts[block_id] = 1
        return block_id

    def free(self, seq: Sequence) -> None:
        # NOTE: reversed, so a sequence's tail is evicted before its prefix, which other requests share.
        for block_id in reversed(seq.block_ids):
            self._unref(block_id)
        seq.block_ids = []

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Child shares all of parent's blocks (copy-on-write happens when a shared block is written)."""
        for block_id in parent.block_ids:
            self._ref(block_id)
        child.block_ids = list(parent.block_ids)
        n = len(parent.block_hashes) * self.block_size
        if child.token_ids[:n] == parent.token_ids[:n]:
            child.block_hashes = list(parent.block_hashes)

    def copy_block(self, src: int) -> int:
        """A fresh block that gets `src`'s contents before the next forward. Needs one free block."""
        self._pin(src)
        dst = self.allocate_block()
        self._copies.append((src, dst))
        return dst

    def copy_on_write(self, seq: Sequence) -> bool:
        """Give seq its own copy of its last block, shared since a fork and about to be written (a beam's
        next token); the copy is queued as copy_block's. False, and nothing changed, if no block is free."""
        if not self.free_block_ids:
            return False
        src = seq.block_ids[-1]
        seq.block_ids[-1] = self.copy_block(src)
        self._unref(src)
        return True

    def _ref(self, block_id: int) -> None:
        if self.ref_counts[block_id] == 0:
            del self.free_block_ids[block_id]
        self.ref_counts[block_id] += 1

    def _unref(self, block_id: int) -> None:
        self.ref_counts[block_id] -= 1
        if self.ref_counts[block_id] > 0:
            return
        h = self.block_hashes[block_id]
        self.free_block_ids[block_id] = None  # the back: most recently used
        if h is None or self._cached.get(h) != block_id:
            self.block_hashes[block_id] = None  # worthless: reused before any cached block
            if self.enable_block_reuse:
                self.free_block_ids.move_to_end(block_id, last=False)

    def _pin(self, block_id: int) -> None:
        self._ref(block_id)
        self._pinned.append(block_id)

    # --- prefix reuse -------------------------------------------------------------------------------
    def chain_hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """Chain hashes of the first `num_blocks` full blocks of seq.token_ids (memoized on the seq)."""
        memo, bs = seq.block_hashes, self.block_size
        if len(memo) < num_blocks:
            parent = memo[-1] if memo else root_hash(seq.request)
            for i in range(len(memo), num_blocks):
                parent = _digest(parent + array("i", seq.token_ids[i * bs : (i + 1) * bs]).tobytes())
                memo.append(parent)
        return memo[:num_blocks]

    def lookup(self, seq: Sequence) -> PrefixHit:
        """The longest cached prefix of seq's tokens, never all of them: the last token is always
        computed, so the step produces the logits to sample from."""
        hit = PrefixHit()
        if not self.enable_block_reuse or seq.num_tokens < 2:
            return hit
        bs, limit = self.block_size, seq.num_tokens - 1
        parent = root_hash(seq.request)
        for h in self.chain_hashes(seq, limit // bs):
            b = self._cached.get(h)
            if b is not None:
                hit.blocks.append((b, -1))
            elif h in self._host:
                hit.blocks.append((-1, self._host[h]))
            else:
                break
            parent = h
        hit.num_tokens = len(hit.blocks) * bs
        if self.enable_partial_reuse:
            start = hit.num_tokens
            want = seq.token_ids[start : min(start + bs, limit)]
            if len(want) >= 2:
                best, best_n = -1, 0
                kids = self._children.get((parent, want[0], want[1]), {})
                for b in islice(reversed(kids), PARTIAL_MATCH_CANDIDATES):  # newest first
                    n = _common_prefix(self._tokens[b], want)
                    if n > best_n:
                        best, best_n = b, n
                if best_n:
                    hit.partial = (best, best_n)
                    hit.num_tokens += best_n
        return hit

    def blocks_to_acquire(self, hit: PrefixHit, num_tokens: int) -> int:
        """Free-pool blocks that acquire(hit) plus blocks up to `num_tokens` tokens would take: shared
        blocks nobody holds leave the free pool too; shared blocks in use cost nothing."""
        idle = sum(1 for b, _ in hit.blocks if b >= 0 and self.ref_counts[b] == 0)
        if hit.partial is not None and self.ref_counts[hit.partial[0]] == 0:
            idle += 1  # the copy source is held until the copy has run
        return idle + self.num_blocks_for(num_tokens) - hit.num_device_blocks

    def acquire(self, seq: Sequence, hit: PrefixHit) -> None:
        """Give a sequence (holding no blocks) its cached prefix; seq.num_computed_tokens starts there.
        The caller checked blocks_to_acquire() against num_free_blocks first."""
        assert not seq.block_ids and seq.num_computed_tokens == 0
        hashes = self.chain_hashes(seq, len(hit.blocks))
        # Hold everything the hit reads before allocating anything: a fresh allocation may evict a cached
        # device block, and offloading it may take a host slot.
        for i, (b, slot) in enumerate(hit.blocks):
            if b >= 0:
                self._ref(b)
            else:
                self._host_busy.add(slot)
                self._host.move_to_end(hashes[i])
        if hit.partial is not None:
            self._pin(hit.partial[0])
        for i, (b, slot) in enumerate(hit.blocks):
            if b < 0:  # host tier: a fresh block, filled at the top of the next execute
                b = self.allocate_block()
                self._swap_in.append((slot, b))
                self._publish(b, hashes[i], hashes[i - 1] if i else root_hash(seq.request), seq, i)
                self.stats.onboarded_blocks += 1
            seq.block_ids.append(b)
        if hit.partial is not None:
            dst = self.allocate_block()
            self._copies.append((hit.partial[0], dst))
            seq.block_ids.append(dst)
            self.stats.partial_reuses += 1
        seq.num_computed_tokens = hit.num_tokens
        reused = len(hit.blocks) + (hit.partial is not None)
        self.stats.num_lookups += 1
        self.stats.reused_blocks += reused
        self.stats.missed_blocks += self.num_blocks_for(seq.num_tokens) - reused
        self.stats.reused_tokens += hit.num_tokens

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Publish seq's blocks that are now full and computed (call after the step that computed them)."""
        if not self.enable_block_reuse:
            return
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_ids))
        first = num_full
        while first > 0 and self.block_hashes[seq.block_ids[first - 1]] is None:
            first -= 1
        if first == num_full:
            return
        hashes = self.chain_hashes(seq, num_full)
        for i in range(first, num_full):
            parent = hashes[i - 1] if i else root_hash(seq.request)
            self._publish(seq.block_ids[i], hashes[i], parent, seq, i)

    def _publish(self, block_id: int, h: bytes, parent: bytes, seq: Sequence, index: int) -> None:
        self.block_hashes[block_id] = h
        if h in self._cached:  # computed twice (two sequences at once): the first copy stays the entry
            return
        self._cached[h] = block_id
        self._parent[block_id] = parent
        bs = self.block_size
        if self.enable_partial_reuse and bs > 2:
            tokens = array("i", seq.token_ids[index * bs : (index + 1) * bs])
            self._tokens[block_id] = tokens
            self._children.setdefault((parent, tokens[0], tokens[1]), {})[block_id] = None

    def _evict(self, block_id: int, h: bytes) -> None:
        self.block_hashes[block_id] = None
        if self._cached.get(h) != block_id:
            return
        del self._cached[h]
        parent = self._parent.pop(block_id)
        tokens = self._tokens.pop(block_id, None)
        if tokens is not None:
            key = (parent, tokens[0], tokens[1])
            kids = self._children[key]
            del kids[block_id]
            if not kids:
                del self._children[key]
        self.stats.evicted_blocks += 1
        self._offload(block_id, h)

    # --- host tier ----------------------------------------------------------------------------------
    def _offload(self, block_id: int, h: bytes) -> None:
        if not self.num_host_blocks:
            return
        if h in self._host:  # the host already holds these contents
            self._host.move_to_end(h)
            return
        slot = self._host_slot()
        if slot is None:
            return
        self._host[h] = slot
        self._swap_out.append((block_id, slot))
        self.stats.offloaded_blocks += 1

    def _host_slot(self) -> int | None:
        if self._host_free:
            return self._host_free.pop()
        for h, slot in self._host.items():  # least recently used first
            if slot not in self._host_busy and slot not in self._host_in_flight:
                del self._host[h]
                return slot
        return None

    # --- per step -----------------------------------------------------------------------------------
    def begin_step(self) -> None:
        """The transfers taken by the previous step have run: release what they read."""
        for block_id in self._pinned_in_flight:
            self._unref(block_id)
        self._pinned_in_flight.clear()
        self._host_in_flight.clear()

    def take_transfers(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]], list[tuple[int, int]]]:
        """(swap_out [(device block, host slot)], swap_in [(host slot, device block)], copies [(src, dst)])
        queued since the last take. Run them in this order, before the step's forward: a swapped-out block
        may be the destination of a swap-in or a copy (it was evicted and reallocated), a copy source may
        be a block swapped in this step, and a host slot read this step is never written before the next."""
        out = (self._swap_out, self._swap_in, self._copies)
        self._swap_out, self._swap_in, self._copies = [], [], []
        self._pinned_in_flight += self._pinned
        self._pinned.clear()
        self._host_in_flight |= self._host_busy
        self._host_busy.clear()
        return out


def _common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
