"""A CPU stand-in for ``core.cuda_graphs.CudaGraphOps`` with CUDA-graph buffer semantics: a replay recomputes the
captured function on the *static* input buffers and writes into the *static* output, in place; the autograd
capture behaves like ``torch.cuda.make_graphed_callables`` (static inputs, outputs handed out as aliases).
Faults: ``bake`` (replays keep the capture call's output, as a capture that baked its inputs in), ``nan``
(replays give NaN), ``fail`` (capturing raises), ``raises`` (capturing raises this exception instance: an
out-of-memory error, ComfyUI's Cancel)."""
from __future__ import annotations

import torch


class FakeGraphOps:
    """CPU stand-in for :class:`core.cuda_graphs.CudaGraphOps` with the same buffer semantics."""

    def __init__(self, free=64 * 2 ** 30, bake=False, nan=False, fail=False, raises=None):
        self.free, self.bake, self.nan, self.fail, self.raises = free, bake, nan, fail, raises
        self.captures = self.replays = self.emptied = 0

    def empty_cache(self):
        self.emptied += 1

    def free_bytes(self):
        return self.free

    def capture(self, fn, static_args):
        if self.raises is not None:
            raise self.raises
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.captures += 1
        out = fn(*static_args)

        def replay():
            self.replays += 1
            if self.bake:  # a capture that baked its inputs in: replays give the capture call's output
                return
            out.copy_(fn(*static_args))
            if self.nan:
                out.fill_(float("nan"))

        return replay, out

    def graph_autograd(self, fn, sample_args):
        if self.raises is not None:
            raise self.raises
        if self.fail:
            raise RuntimeError("capture failed")
        self.captures += 1
        statics = [a.detach().clone().requires_grad_(a.requires_grad) for a in sample_args]
        state = {}
        ops = self

        class Graphed(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *inputs):
                ops.replays += 1
                with torch.no_grad():
                    for s, x in zip(statics, inputs):
                        s.copy_(x)
                with torch.enable_grad():
                    state["out"] = fn(*statics)
                return state["out"].detach()

            @staticmethod
            def backward(ctx, grad):
                wants = [s for s in statics if s.requires_grad]
                grads = iter(torch.autograd.grad(state["out"], wants, grad))
                return tuple(next(grads) if s.requires_grad else None for s in statics)

        return lambda *xs: Graphed.apply(*xs)
