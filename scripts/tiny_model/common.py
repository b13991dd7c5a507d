"""Run clock, logging, phase timing and the special tokens shared by every phase."""

from __future__ import annotations

import time

# NOTE: set before numpy / torch are imported, so log times and the "startup" phase include them.
T_START = time.time()

from contextlib import contextmanager  # noqa: E402

import torch  # noqa: E402

PAD, BOS, EOS = "<|pad|>", "<s>", "</s>"
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


def log(msg: str) -> None:
    print(f"[{time.time() - T_START:7.1f}s] {msg}", flush=True)


PHASES: dict[str, float] = {}


@contextmanager
def phase(name: str):
    t0 = time.time()
    log(f"=== phase {name} ===")
    try:
        yield
    finally:
        PHASES[name] = round(time.time() - t0, 2)
        log(f"=== phase {name} done in {PHASES[name]:.1f}s ===")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
