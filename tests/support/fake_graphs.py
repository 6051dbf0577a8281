"""A CPU stand-in for ``core.cuda_graphs.CudaGraphOps`` with CUDA-graph buffer semantics: capturing runs the
function (as a capture's warm-up does), a replay recomputes it on the *static* input buffers and writes into the
*static* output, in place; the autograd capture behaves like ``torch.cuda.make_graphed_callables`` (static
inputs, outputs handed out as aliases, a backward that uses the activations of the latest forward).

Faults, each for both captures: ``bake`` (replays keep the capture call's output and gradients, as a capture
that baked its inputs in), ``nan`` (replays give NaN), ``skew`` (replays scaled by 1 + skew: a small kernel
difference), ``fail`` (capturing raises), ``raises`` (capturing raises this exception instance: an
out-of-memory error, ComfyUI's Cancel), ``replay_raises`` (replays raise it)."""
from __future__ import annotations

import torch


class FakeGraphOps:
    """CPU stand-in for :class:`core.cuda_graphs.CudaGraphOps` with the same buffer semantics."""

    def __init__(self, bake=False, nan=False, skew=0.0, fail=False, raises=None, replay_raises=None):
        self.bake, self.nan, self.skew, self.fail = bake, nan, skew, fail
        self.raises, self.replay_raises = raises, replay_raises
        self.captures = self.replays = self.emptied = 0

    def empty_cache(self):
        self.emptied += 1

    def _start_capture(self, fn, static_args):
        self.captures += 1
        if self.raises is not None:
            raise self.raises
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        return fn(*static_args)  # the warm-up and the capture run the function

    def _faulty(self, out: torch.Tensor) -> torch.Tensor:
        if self.replay_raises is not None:
            raise self.replay_raises
        if self.nan:
            return torch.full_like(out, float("nan"))
        return out * (1 + self.skew) if self.skew else out

    def capture(self, fn, static_args):
        out = self._start_capture(fn, static_args)

        def replay():
            self.replays += 1
            fresh = out.clone() if self.bake else fn(*static_args)
            out.copy_(self._faulty(fresh))

        return replay, out

    def graph_autograd(self, fn, sample_args):
        statics = [a.detach().clone().requires_grad_(a.requires_grad) for a in sample_args]
        with torch.enable_grad():
            baked = self._start_capture(fn, statics)
        state = {"out": baked}
        ops = self

        class Graphed(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *inputs):
                ops.replays += 1
                if not ops.bake:
                    with torch.no_grad():
                        for s, x in zip(statics, inputs):
                            s.copy_(x)
                    with torch.enable_grad():
                        state["out"] = fn(*statics)
                return ops._faulty(state["out"].detach())

            @staticmethod
            def backward(ctx, grad):
                wants = [s for s in statics if s.requires_grad]
                grads = iter(torch.autograd.grad(state["out"], wants, grad, retain_graph=ops.bake))
                return tuple(ops._faulty(next(grads)) if s.requires_grad else None for s in statics)

        return lambda *xs: Graphed.apply(*xs)
