"""benchmarks/sass_sig.py's loop_order on hand-made SASS: loads L and math H of the first loop that has both, else
the whole kernel's."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from sass_sig import loop_order  # noqa: E402


def test_loop_order_loop_then_whole_kernel():
    loop = [(0x00, "LDG.E R2, [R4]"), (0x10, "MOV R1, R2"), (0x20, "LDG.E.128 R8, [R6]"), (0x30, "HFMA2 R1, R2, R3, R1"),
            (0x40, "LDG.E R9, [R6]"), (0x50, "HMMA.16816.F32 R10, R8, R2, R10"), (0x60, "@P0 BRA 0x20"),
            (0x70, "FFMA R1, R1, R2, R3")]
    assert loop_order(loop) == "1L 1H 1L 1H"  # 0x20-0x60; the load before the loop is not counted
    assert loop_order(loop, r"FFMA") == "all: 3L 1H"  # no FFMA in the loop: the whole kernel
    straight = [(0x00, "LDG.E R2, [R4]"), (0x10, "LDG.E R3, [R4]"), (0x20, "FFMA R1, R2, R3, R1")]
    assert loop_order(straight, r"FFMA") == "all: 2L 1H"
    assert loop_order([(0x0, "MOV R1, R2")]) == "no loads and math"
