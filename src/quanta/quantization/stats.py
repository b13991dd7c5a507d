"""Per-Linear input statistics gathered during calibration (hooks on the layer's input)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# What a calibration pass may ask for.
ABSMAX = "absmax"  # [in] max |x| per input channel (SmoothQuant, static activation scales)
ABSMEAN = "absmean"  # [in] mean |x| per input channel (AWQ)
HESSIAN = "hessian"  # [in, in] sum of x^T x (GPTQ)
SAMPLES = "samples"  # [S, in] a random subset of token rows (AWQ scale and clip searches)


@dataclass
class LinearStats:
    needs: frozenset[str]
    sample_fraction: float = 0.0  # share of each chunk's rows kept as samples
    generator: torch.Generator | None = None
    num_tokens: int = 0
    absmax: torch.Tensor | None = None
    abssum: torch.Tensor | None = None
    hessian: torch.Tensor | None = None
    _samples: list[torch.Tensor] = field(default_factory=list)

    @property
    def absmean(self) -> torch.Tensor:
        return self.abssum / max(self.num_tokens, 1)

    @property
    def act_amax(self) -> torch.Tensor:
        """Scalar max |x| over every token and channel (static per-tensor activation scale)."""
        return self.absmax.max()

    @property
    def samples(self) -> torch.Tensor:  # [S, in] float32
        return torch.cat(self._samples) if self._samples else torch.empty(0)

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        xf = x.float()
        a = xf.abs()
        self.num_tokens += x.shape[0]
        if ABSMAX in self.needs:
            m = a.amax(0)
            self.absmax = m if self.absmax is None else torch.maximum(self.absmax, m)
        if ABSMEAN in self.needs:
            s = a.sum(0)
            self.abssum = s if self.abssum is None else self.abssum + s
        if HESSIAN in self.needs:
            h = xf.t() @ xf
            self.hessian = h if self.hessian is None else self.hessian.add_(h)
        if SAMPLES in self.needs and self.sample_fraction > 0:
            k = min(x.shape[0], max(1, round(self.sample_fraction * x.shape[0])))
            idx = torch.randperm(x.shape[0], generator=self.generator)[:k].to(x.device)
            self._samples.append(xf[idx])

    def divide_inputs(self, s: torch.Tensor) -> None:
        """The layer's input became x / s (a scale folded into the previous op): keep the stats true."""
        s = s.float()
        if self.absmax is not None:
            self.absmax = self.absmax / s
        if self.abssum is not None:
            self.abssum = self.abssum / s
        if self.hessian is not None:
            self.hessian = self.hessian / s[:, None] / s[None, :]
        self._samples = [x / s for x in self._samples]
