"""Where a step's time goes: engine phases (host timers) and the top GPU kernels (torch.profiler).

    python benchmarks/profile_step.py CONFIG_OR_MODEL --batch 1 --steps 64 [--trace --eager] [--quant-algo W4A16_AWQ]
    python benchmarks/profile_step.py CONFIG_OR_MODEL --bubble   # the step vs its CUDA graph replayed back to back
"""

from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict
from pathlib import Path

import torch

from quanta import LLM, SamplingParams


def _wrap(obj, name, acc, sync):
    fn = getattr(obj, name)

    def timed(*a, **k):
        if sync:
            torch.cuda.synchronize()
        t = time.perf_counter()
        r = fn(*a, **k)
        if sync:
            torch.cuda.synchronize()
        acc[name] += time.perf_counter() - t
        return r

    setattr(obj, name, timed)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--trace", action="store_true")
    ap.add_argument("--eager", action="store_true", help="no CUDA graphs (kernels show in the trace)")
    ap.add_argument("--quant-algo", default=None, help="quantize at load (random-token calibration), e.g. W4A16_AWQ")
    ap.add_argument("--bubble", action="store_true", help="what the engine adds to the graph's replay: the step's "
                    "upload, input feed and token download around back-to-back replays, one at a time")
    ap.add_argument("--timeline", action="store_true", help="with --trace: kernel time line of the traced steps "
                    "(busy time, gaps, overlap, per-kernel durations; benchmarks/trace_timeline.py)")
    a = ap.parse_args()
    dummy = a.model.endswith(".json")
    kw = {}
    if a.quant_algo:
        from quanta.config import CalibConfig, QuantConfig

        kw = dict(quant_config=QuantConfig(quant_algo=a.quant_algo),
                  calib_config=CalibConfig(calib_dataset="random", calib_batches=4, calib_max_seq_length=512))
    llm = LLM(a.model, load_format="dummy" if dummy else "auto", skip_tokenizer_init=dummy,
              max_batch_size=max(a.batch, 8), enforce_eager=a.eager, **kw)
    llm.shutdown()  # drive the engine synchronously from here
    eng = llm.engine
    vocab = llm._built.hf_config.vocab_size
    params = SamplingParams(max_tokens=3 * a.steps + 64, ignore_eos=True)
    g = torch.Generator().manual_seed(0)
    for i in range(a.batch):
        ids = torch.randint(10, vocab - 10, (a.input_len,), generator=g).tolist()
        eng.add_request(llm._input.make_request(10_000 + i, None, ids, params))
    # prefill until every sequence decodes, then a few warm decode steps
    while any(s.num_computed_tokens < s.num_tokens - 1 for s in eng.scheduler.waiting) or \
            any(s.num_computed_tokens < s.num_tokens - 1 for s in eng.scheduler.running) or eng.iteration < 4:
        eng.step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(a.steps):
        eng.step()
    torch.cuda.synchronize()
    step = (time.perf_counter() - t) / a.steps
    print(f"batch {a.batch}: {step * 1e3:.3f} ms/step, {a.batch / step:.0f} tok/s (no phase timers)")
    runner = eng.runner
    if eng._pending is not None:  # read the launched step first: the replays below reuse its token slots
        eng._finish_pending()
    if runner.graphs is not None:  # the GPU's own step time: the step's graph replayed back to back, no host work
        bs = runner.graphs.bucket(a.batch)
        t = time.perf_counter()
        for _ in range(a.steps):
            runner.graphs.replay(bs)
        torch.cuda.synchronize()
        gpu = (time.perf_counter() - t) / a.steps
        print(f"graph replays back to back: {gpu * 1e3:.3f} ms/step; the engine's step {(step - gpu) * 1e6:.1f} us "
              f"({(step - gpu) / step:.1%}) longer")
        if a.bubble:
            _bubble(runner, a.batch, a.steps, step)
    acc: dict[str, float] = defaultdict(float)
    _wrap(eng.scheduler, "schedule", acc, True)
    _wrap(runner.buffers, "build", acc, True)
    _wrap(runner, "_collect", acc, True)
    _wrap(eng.outputs, "process", acc, True)
    if runner.graphs is not None:
        _wrap(runner.graphs, "replay", acc, True)
    samp = runner.sampler
    runner.sampler = lambda logits, rows, _s=samp: _timed_call(_s, logits, rows, acc)
    t = time.perf_counter()
    for _ in range(a.steps):
        eng.step()
    total = (time.perf_counter() - t) / a.steps
    print(f"with synced phase timers: {total * 1e3:.3f} ms/step")
    for k, v in sorted(acc.items(), key=lambda kv: -kv[1]):
        print(f"  {k:12s} {v / a.steps * 1e3:8.3f} ms")
    if a.trace:
        from torch.profiler import ProfilerActivity, profile

        trace_steps = 8
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(trace_steps):
                eng.step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=int(os.environ.get("PROF_ROWS", "15")), max_name_column_width=60))
        if a.timeline:
            import json
            import tempfile

            from trace_timeline import summarize

            with tempfile.NamedTemporaryFile(suffix=".json") as f:
                prof.export_chrome_trace(f.name)
                events = json.loads(Path(f.name).read_text())["traceEvents"]
            print(summarize(events, steps=trace_steps))


def _bubble(runner, batch: int, steps: int, engine_step: float) -> None:
    """ms a step of back-to-back graph replays with the engine's per-step stream work added one piece at a time."""
    g, bufs = runner.graphs, runner.buffers
    bs = g.bucket(batch)
    ids, lps = g.greedy[bs]
    inp = bufs.views(bs, bs)[0]
    m = 5 * bs + 1 if bufs.packed else 0

    def upload():
        if m:
            bufs.flat[:m].copy_(bufs.h_flat[:m], non_blocking=True)

    def feed():
        inp[:batch].copy_(ids[:batch])

    def feed_kernel():
        torch.add(ids[:batch], 0, out=inp[:batch])

    def download():
        return runner.ring.copy_out(ids[:batch], lps[:batch])[2]

    pieces = {
        "replay": [],
        "+ download (DtoH, event)": [download],
        "+ upload (HtoD)": [upload, download],
        "+ feed (DtoD)": [upload, feed, download],
        "+ feed as a kernel": [upload, feed_kernel, download],
    }
    for name, fns in pieces.items():
        for overlapped in (False, True):
            prev = None
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(steps):
                ev = None
                for fn in fns:
                    if fn is download:
                        continue
                    fn()
                g.replay(bs)
                if download in fns:
                    ev = download()
                if overlapped and prev is not None:
                    prev.synchronize()  # the engine waits for the step before the one it just launched
                prev = ev
            torch.cuda.synchronize()
            dt = (time.perf_counter() - t) / steps
            tag = " + host waits a step behind" if overlapped else ""
            print(f"  {name + tag:52s} {dt * 1e3:.3f} ms/step (engine {engine_step * 1e3:.3f})")
            if not fns:
                break


def _timed_call(sampler, logits, rows, acc):
    torch.cuda.synchronize()
    t = time.perf_counter()
    r = sampler(logits, rows)
    torch.cuda.synchronize()
    acc["sampler"] += time.perf_counter() - t
    return r


if __name__ == "__main__":
    main()
