"""The LoRA adapters of one engine: wrapped layers, a host cache and a device slot cache.

- Host cache (`resolve`, called from `LLM.generate_async` in the caller's thread, so disk reads and
  validation stay off the step loop): up to max_cpu_loras loaded adapters, least recently used evicted.
  A request holds its adapter, so an adapter in use is never lost; the cache finds such an adapter again
  instead of reading it twice.
- Device slots (`prepare`, called by the model runner once per step): max_loras slots in every wrapped
  layer's stacked buffers. An adapter is copied into a slot when a step first needs it; the least recently
  used slot whose adapter no running sequence uses is taken. The scheduler admits a sequence only while
  the running sequences use at most max_loras distinct adapters (`can_admit`), so a slot always exists.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from quanta import envs
from quanta.kernels.lora import group_by_slot
from quanta.lora.adapter import (
    LoRAAdapter,
    LoRAAdapterError,
    adapter_target_names,
    build_target_table,
    load_adapter,
)
from quanta.lora.config import HF_TARGETS, LoraConfig, LoRARequest
from quanta.lora.layers import LoRAContext, LoRALinear

# Projections (attribute names, e.g. "o_proj,down_proj") kept unfolded: their LoRA runs base GEMM + shrink +
# expand instead of one GEMM on the folded weight + one kernel (A/B runs of kernels/lora_folded.py's choice).
FOLD_SKIP = {s for s in envs.get("QUANTA_LORA_FOLD_SKIP").split(",") if s}

logger = logging.getLogger("quanta")


class LoRAManager:
    def __init__(self, model: nn.Module, lora_config: LoraConfig | None, peft_cache_config, device: torch.device,
                 dtype: torch.dtype, max_num_tokens: int, use_kernels: bool = False):
        lc = lora_config if lora_config is not None else LoraConfig(
            max_lora_rank=getattr(peft_cache_config, "max_adapter_size", None) or 64)
        self.config = lc
        self.device = device
        self.dtype = dtype
        self.max_rank = lc.max_lora_rank
        enabled = lc.hf_target_modules
        if not enabled and lc.lora_dir:
            for d in lc.lora_dir:
                enabled += [n for n in adapter_target_names(d) if n in HF_TARGETS and n not in enabled]
        if not enabled:
            enabled = list(HF_TARGETS)
        self.table = build_target_table(model, enabled)
        if not self.table.targets:
            raise ValueError(f"LoRA: the model has none of the target modules {enabled}")
        self.num_slots, self.max_cpu_loras = _cache_sizes(lc, peft_cache_config, self.table)
        self.ctx = LoRAContext(max_num_tokens, self.num_slots, device)
        self.ctx.use_kernels = use_kernels and device.type == "cuda"
        self.layers: dict[str, LoRALinear] = {}
        for path, target in self.table.targets.items():
            parent_path, attr = path.rsplit(".", 1)
            parent = model.get_submodule(parent_path)
            fold = attr not in FOLD_SKIP
            wrapper = LoRALinear(getattr(parent, attr), self.ctx, target.shards, self.max_rank, dtype, device, fold)
            setattr(parent, attr, wrapper)  # module swap: the model file stays as it is
            self.layers[path] = wrapper
        if device.type == "cuda":  # folded layers copied their base weights into w_full: free the old blocks
            torch.cuda.empty_cache()
        # host side (any thread; guarded by the lock)
        self._lock = threading.Lock()
        self._host: OrderedDict[int, LoRAAdapter] = OrderedDict()  # LRU, at most max_cpu_loras
        self._live: weakref.WeakValueDictionary[int, LoRAAdapter] = weakref.WeakValueDictionary()  # held by requests
        self._paths: dict[int, str] = {}  # lora_int_id -> its folder (one id names one folder)
        self._preloaded: dict[str, LoRAAdapter] = {}  # lora_dir adapters, by folder
        # device side (engine thread only)
        self._slot_of: OrderedDict[int, int] = OrderedDict()  # adapter id -> slot, LRU order
        self._free_slots = list(range(self.num_slots - 1, -1, -1))
        self._dirty_tokens = 0  # tokens whose slot entries the last LoRA step wrote
        self._upload_done = torch.cuda.Event() if device.type == "cuda" else None
        self.scheduler = None  # set by the builder: its running sequences pin their adapters' slots
        self.stats = {"host_hits": 0, "disk_loads": 0, "device_loads": 0, "device_evictions": 0}
        for d in lc.lora_dir:
            folder = _norm(d)
            req = LoRARequest(Path(folder).name, -1, folder)
            self._preloaded[folder] = load_adapter(req, self.table, self.max_rank, dtype, pin=device.type == "cuda")
        logger.info("quanta: LoRA on %d projections (%s), max rank %d, %d device slots, %d host adapters",
                    len(self.layers), ", ".join(enabled), self.max_rank, self.num_slots, self.max_cpu_loras)

    # --- host side: requests ------------------------------------------------------------------------
    def resolve(self, req: LoRARequest) -> LoRAAdapter:
        """The loaded adapter of `req` (from the caches, or read and validated now). Raises a ValueError
        that names the adapter and the problem."""
        if not isinstance(req, LoRARequest):
            raise ValueError(f"lora_request must be a LoRARequest(lora_name, lora_int_id, lora_path) or None, "
                             f"got {type(req).__name__}: {req!r:.80}")
        folder = _norm(req.lora_path) if req.lora_path else ""
        with self._lock:
            known = self._paths.get(req.lora_int_id)
            if known is not None and known != folder:
                raise LoRAAdapterError(f"lora_int_id={req.lora_int_id} already names the adapter at {known!r}, "
                                       f"not {req.lora_path!r}: give each adapter its own lora_int_id")
            adapter = self._host.get(req.lora_int_id) or self._live.get(req.lora_int_id)
            if adapter is not None:
                self.stats["host_hits"] += 1
            else:
                pre = self._preloaded.get(folder)
                if pre is not None:
                    adapter = replace(pre, id=req.lora_int_id, name=req.lora_name)
                else:
                    adapter = load_adapter(req, self.table, self.max_rank, self.dtype,
                                           pin=self.device.type == "cuda")
                    self.stats["disk_loads"] += 1
                self._paths[req.lora_int_id] = folder
                self._live[req.lora_int_id] = adapter
            self._host[req.lora_int_id] = adapter
            self._host.move_to_end(req.lora_int_id)
            while len(self._host) > self.max_cpu_loras:
                self._host.popitem(last=False)  # still reachable through _live while a request holds it
            return adapter

    @property
    def host_cached_ids(self) -> list[int]:
        with self._lock:
            return list(self._host)

    # --- scheduler side -----------------------------------------------------------------------------
    def can_admit(self, seq, running) -> bool:
        """Admission gate: a sequence may start while the running ones leave a device slot for its adapter."""
        adapter = getattr(seq.request, "lora_adapter", None)
        if adapter is None:
            return True
        ids = _adapter_ids(running)
        return adapter.id in ids or len(ids) < self.num_slots

    # --- device side: once per step (model runner) -------------------------------------------------
    @property
    def device_slots(self) -> dict[int, int]:
        return dict(self._slot_of)

    def prepare(self, scheduled, num_tokens: int) -> None:
        """Fill the step's token -> slot mapping (`num_tokens` includes CUDA-graph padding rows), loading
        adapters into device slots as needed."""
        ctx = self.ctx
        adapters = [getattr(s.seq.request, "lora_adapter", None) for s in scheduled]
        if self._upload_done is not None:
            self._upload_done.synchronize()  # the last upload has left the pinned staging buffers
        if all(a is None for a in adapters):
            ctx.active = False
            if self._dirty_tokens:
                self._clear()
            return
        step_ids = {a.id for a in adapters if a is not None}
        if len(step_ids) > self.num_slots:
            raise RuntimeError(f"a step uses {len(step_ids)} LoRA adapters but there are only "
                               f"{self.num_slots} device slots (LoraConfig.max_loras)")
        seq_slots = [-1 if a is None else self._slot_for(a, step_ids) for a in adapters]
        counts_per_seq = [s.num_new_tokens for s in scheduled]
        tok = np.full(num_tokens, -1, dtype=np.int64)
        n = sum(counts_per_seq)
        tok[:n] = np.repeat(np.asarray(seq_slots, dtype=np.int64), counts_per_seq)
        idx, counts, starts = group_by_slot(tok, self.num_slots)
        h_slots = ctx.h_slots.numpy()
        h_slots[:num_tokens] = tok
        if self._dirty_tokens > num_tokens:
            h_slots[num_tokens : self._dirty_tokens] = -1
        cleared = max(num_tokens, self._dirty_tokens)
        ctx.h_sorted.numpy()[: len(idx)] = idx
        ctx.h_counts.numpy()[:] = counts
        ctx.h_starts.numpy()[:] = starts
        self._upload(cleared, len(idx))
        ctx.meta.max_count = int(counts.max(initial=0))
        ctx.active = True
        self._dirty_tokens = num_tokens

    def _clear(self) -> None:
        ctx = self.ctx
        ctx.h_slots.numpy()[: self._dirty_tokens] = -1
        ctx.h_counts.numpy()[:] = 0
        self._upload(self._dirty_tokens, 0)
        ctx.meta.max_count = 0
        self._dirty_tokens = 0

    def _upload(self, num_slots_entries: int, num_sorted: int) -> None:
        ctx = self.ctx
        if ctx.device.type != "cuda":
            return  # host buffers are the device buffers
        m, nb = ctx.meta, dict(non_blocking=True)
        m.slots[:num_slots_entries].copy_(ctx.h_slots[:num_slots_entries], **nb)
        if num_sorted:
            m.sorted_idx[:num_sorted].copy_(ctx.h_sorted[:num_sorted], **nb)
        m.counts.copy_(ctx.h_counts, **nb)
        m.starts.copy_(ctx.h_starts, **nb)
        self._upload_done.record()

    def _slot_for(self, adapter: LoRAAdapter, step_ids: set[int]) -> int:
        slot = self._slot_of.get(adapter.id)
        if slot is not None:
            self._slot_of.move_to_end(adapter.id)
            return slot
        if self._free_slots:
            slot = self._free_slots.pop()
        else:
            pinned = step_ids | (_adapter_ids(self.scheduler.running) if self.scheduler is not None else set())
            victim = next((aid for aid in self._slot_of if aid not in pinned), None)
            if victim is None:
                raise RuntimeError("no free LoRA device slot: every slot holds an adapter in use")
            slot = self._slot_of.pop(victim)
            self.stats["device_evictions"] += 1
        for path, layer in self.layers.items():
            layer.set_slot(slot, adapter.weights.get(path))
        self._slot_of[adapter.id] = slot
        self.stats["device_loads"] += 1
        return slot


def _adapter_ids(seqs) -> set[int]:
    ids = set()
    for s in seqs:
        a = getattr(s.request, "lora_adapter", None)
        if a is not None:
            ids.add(a.id)
    return ids


def _norm(path) -> str:
    return str(Path(path).expanduser().resolve())


def _cache_sizes(lc: LoraConfig, peft, table) -> tuple[int, int]:
    """(device slots, host adapters): LoraConfig's max_loras / max_cpu_loras, else PeftCacheConfig's
    module-layer counts divided by the module-layers of one adapter, else 4 and max(max_loras, 4)."""
    per_adapter = max(1, sum(len(t.shards) for t in table.targets.values()))
    slots = lc.max_loras
    if slots is None and peft is not None and getattr(peft, "num_device_module_layer", 0):
        slots = max(1, peft.num_device_module_layer // per_adapter)
    slots = slots or 4
    host = lc.max_cpu_loras
    if host is None and peft is not None and getattr(peft, "num_host_module_layer", 0):
        host = max(1, peft.num_host_module_layer // per_adapter)
    host = host or max(slots, 4)
    return slots, host


def attach_lora(model: nn.Module, args, device: torch.device, dtype: torch.dtype,
                max_num_tokens: int) -> LoRAManager | None:
    """Wrap the model's projections for LoRA when the LLM arguments ask for it (enable_lora / lora_config)."""
    if not (args.enable_lora or args.lora_config is not None):
        return None
    from quanta.layers import fast_ops

    return LoRAManager(model, args.lora_config, args.peft_cache_config, device, dtype, max_num_tokens,
                       use_kernels=fast_ops.use_kernels())
