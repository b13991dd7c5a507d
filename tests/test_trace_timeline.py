"""benchmarks/trace_timeline.py (profile_step.py --timeline) on a hand-made trace: busy time, gaps, PDL overlap."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from trace_timeline import summarize  # noqa: E402


def test_busy_gaps_and_overlap():
    ev = [dict(ph="X", cat="kernel", name="gemv", ts=0, dur=10), dict(ph="X", cat="kernel", name="norm", ts=8, dur=10),
          dict(ph="X", cat="kernel", name="gemv", ts=20, dur=5), dict(ph="X", cat="cpu_op", name="host", ts=0, dur=99)]
    out = summarize(ev, steps=1)
    # 0-10 and 8-18 overlap by 2, then a 2 us gap before 20-25: busy 23, gaps 2, durations 25
    assert "wall 25.0 us a step, busy 23.0, idle gaps 2.0, sum of durations 25.0 (overlap 2.0)" in out
    gemv = next(line for line in out.splitlines() if line.startswith("gemv"))
    assert gemv.split()[1:] == ["2.0", "7.50", "15.0", "1.00"]
    assert summarize([], steps=1) == "no kernel events in the trace"


def test_copies_count_as_gpu_work():
    ev = [dict(ph="X", cat="gpu_memcpy", name="Memcpy HtoD (Pinned -> Device)", ts=0, dur=2),
          dict(ph="X", cat="kernel", name="gemv", ts=3, dur=5)]
    out = summarize(ev, steps=1)
    assert out.startswith("kernels: 1 + copies / memsets: 1 (2 a step); wall 8.0 us a step, busy 7.0, idle gaps 1.0")
    assert any(line.startswith("Memcpy HtoD (Pinned -> Device)") for line in out.splitlines())


def test_grids_listed_apart():
    ev = [dict(ph="X", cat="kernel", name="gemv", ts=0, dur=4, args={"grid": [768, 1, 1]}),
          dict(ph="X", cat="kernel", name="gemv", ts=5, dur=2, args={"grid": [512, 1, 1]})]
    rows = [line.split() for line in summarize(ev, steps=1).splitlines()[2:]]
    assert rows == [["gemv", "[768,", "1,", "1]", "1.0", "4.00", "4.0", "0.00"],
                    ["gemv", "[512,", "1,", "1]", "1.0", "2.00", "2.0", "1.00"]]
