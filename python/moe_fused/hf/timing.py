"""How much of a training step the MoE experts take: hooks around every experts module.

    timer = ExpertsTimer(model)
    with timer:                      # hooks only inside (full backward hooks cost a little)
        loss = model(**batch).loss
        loss.backward()
    fwd_ms, bwd_ms = timer.collect_ms()

CUDA events on a GPU (the GPU time between the module's entry and exit, forward and
backward), perf_counter on the CPU.
"""
from __future__ import annotations

import time

import torch

from .patch import find_experts_modules


class ExpertsTimer:
    def __init__(self, model: torch.nn.Module):
        self.modules = [m for _, m in find_experts_modules(model)]
        if not self.modules:
            raise ValueError(f"{type(model).__name__} has no MoE experts module to time")
        p = next(self.modules[0].parameters(), None)
        self.cuda = p is not None and p.device.type == "cuda"
        self.handles: list = []
        self.pairs: list = []  # (kind, start, end)
        self._open: dict = {}

    def _mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def _start(self, key):
        self._open[key] = self._mark()

    def _stop(self, key):
        if key in self._open:
            self.pairs.append((key[0], self._open.pop(key), self._mark()))

    def attach(self):
        if self.handles:
            return self
        for m in self.modules:
            k = id(m)
            self.handles += [
                m.register_forward_pre_hook(lambda mod, a, k=k: self._start(("f", k))),
                m.register_forward_hook(lambda mod, a, o, k=k: self._stop(("f", k))),
                m.register_full_backward_pre_hook(lambda mod, g, k=k: self._start(("b", k))),
                m.register_full_backward_hook(lambda mod, gi, go, k=k: self._stop(("b", k))),
            ]
        return self

    def detach(self):
        for h in self.handles:
            h.remove()
        self.handles = []

    def __enter__(self):
        return self.attach()

    def __exit__(self, *exc):
        self.detach()
        return False

    def collect_ms(self) -> tuple[float, float]:
        """(forward ms, backward ms) of all experts modules since the last call."""
        if self.cuda:
            torch.cuda.synchronize()
            ms = [(kind, s.elapsed_time(e)) for kind, s, e in self.pairs]
        else:
            ms = [(kind, 1e3 * (e - s)) for kind, s, e in self.pairs]
        self.pairs, self._open = [], {}
        return sum(t for k, t in ms if k == "f"), sum(t for k, t in ms if k == "b")
