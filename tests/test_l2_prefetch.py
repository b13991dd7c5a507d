"""kernels/l2_prefetch.py host side: which weights a layer asks L2 for (the kernel is GPU-tested in
tests/gpu/test_decode_attention_fused_gpu.py)."""

from __future__ import annotations

import torch
from torch import nn

from quanta.kernels import l2_prefetch


def test_no_regions_on_cpu() -> None:
    assert l2_prefetch.prefetch_regions((nn.Linear(64, 64),), torch.device("cpu")) == []


def test_regions_order_and_budget(monkeypatch) -> None:
    monkeypatch.setattr(l2_prefetch, "_can_prefetch", lambda device: True)
    monkeypatch.setenv("QUANTA_L2_PREFETCH_MB", str(40 / 1024))  # 40 KiB
    o, gate_up = nn.Linear(64, 64, bias=True), nn.Linear(64, 256, bias=False)  # 16 KiB + 256 B, 64 KiB
    regions = l2_prefetch.prefetch_regions((o, gate_up), torch.device("cpu"))
    # o's weight first (its largest tensor), its bias, then gate_up cut to what is left of the budget
    assert [r[1] for r in regions] == [16384, 256, 40 * 1024 - 16384 - 256]
    assert regions[0][0].data_ptr() == o.weight.data_ptr() and regions[0][0].dtype == torch.uint8
    assert regions[2][0].data_ptr() == gate_up.weight.data_ptr()
    monkeypatch.setenv("QUANTA_L2_PREFETCH", "0")
    assert l2_prefetch.prefetch_regions((o, gate_up), torch.device("cpu")) == []


def test_region_args_pad() -> None:
    ph = torch.zeros(1)
    w = torch.zeros(64, dtype=torch.uint8)
    args, npf = l2_prefetch.region_args([(w, 64)], ph)
    assert npf == 1 and args[0] is w and args[1] is ph and args[4:] == [64, 0, 0, 0]
