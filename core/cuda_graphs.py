"""The UNet step replayed as CUDA graphs inside a loop (docs/method.md §8.8, "CUDA graphs").

On a GPU the SD UNet at small batches is bound by kernel launches, not arithmetic: issue 11 measured the
batch-1 forward at 28.6 ms eager and 9.5 ms replayed as a CUDA graph on an H200. A CUDA graph records the
kernels of one call once and replays them with one launch; the arithmetic is the same kernels on the same
addresses, so the math does not change. Capturing costs a few calls (warm-up and the capture itself), not the
minutes a ``torch.compile`` of the UNet takes, which is why this is on by default and compile is not.

:class:`CudaGraphSteps` wraps a step function ``fn(z_t, t, cond) → ε̂`` (all tensors) and keeps one graph per
*signature* — shapes, dtypes, which inputs need gradients, grad/inference mode, autocast — while a **scope** is
open (:func:`graph_scope`, opened by each loop: MSI training, DDIM inversion, guided sampling, recovery). When
the scope closes every graph and its memory pool is released, so a loop's graphs never hold memory the next
phase needs, and a model that ComfyUI moves between node runs is never replayed from stale addresses.

Within a scope, for each signature:

1. call 1 runs eagerly (one-off calls such as probes never pay for a capture);
2. call 2 captures — without gradients a plain ``torch.cuda.CUDAGraph`` behind static input buffers; with
   inputs that need gradients (MSI's conditioning, guidance through x_t) ``torch.cuda.make_graphed_callables``,
   which captures the forward and the backward pass — and answers eagerly;
3. call 3 runs both the graph and the eager step on its (new) inputs and compares output (and, with gradients,
   the input gradients): a relative L2 error above :data:`VERIFY_RTOL` — e.g. a value the capture baked in
   from call 2's inputs — or a non-finite value turns graphs off for good with one warning line, and the eager
   result is used; so no unchecked graph output is ever handed out;
4. later calls copy their inputs into the graph's static buffers, replay, and return a clone of the output
   (a replay must never overwrite a tensor the caller still holds). No host-device synchronisation.

Graphs turn off, with one log line, and the eager step runs when: the setting is "off" or ``DP_CUDA_GRAPHS=0``;
the device is not CUDA; "auto" finds less than :data:`FREE_MEMORY_FLOOR` free (a graph keeps one step's
activations resident for the whole loop); a weight is not on the device (ComfyUI's low-VRAM loading); the
loop opened its scope with ``enabled=False`` (MSI with gradient checkpointing); or capture, replay or
verification fails. A weight that moves inside a scope (its address is checked on every call, a host-side
tuple compare) drops that scope's graphs; the next calls capture again.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch

from . import speed

log = logging.getLogger("diff_privacy.speed")

#: accepted values of the cuda_graphs setting: "auto" (on where it works and memory allows), "on" (also below
#: the memory floor), "off"
GRAPH_SETTINGS = ("auto", "on", "off")
#: "auto" captures only with at least this much free device memory: a graph keeps one step's activations
#: (MSI: forward and backward) resident for its whole loop, where eager execution frees them between calls.
#: Our choice: an 8 GiB consumer card holding SD1.5 has less, an H100 far more.
FREE_MEMORY_FLOOR = 6 * 2 ** 30
#: the call of a signature (within a scope) that captures its graph: a signature seen twice is a loop
CAPTURE_ON_CALL = 2
#: warm-up calls before a capture (cuBLAS/cuDNN workspaces and lazy initialisation must not be captured)
WARMUP_CALLS = 2
#: relative L2 error allowed between a graph's replay and the eager step on the same inputs: float32 steps
#: replay the same kernels (1e-3 leaves room for a different cuBLAS workspace split); bf16/fp16 ones 2e-2.
#: A capture bug (a value baked in from the capture call's inputs) gives errors of order 1.
VERIFY_RTOL = {torch.float32: 1e-3, torch.float64: 1e-6}
VERIFY_RTOL_HALF = 2e-2
#: drops of a scope's graphs because a weight moved before graphs stop for that scope (ComfyUI re-loading the
#: UNet at every call would otherwise pay a capture each time)
MAX_RECAPTURES = 3

Step = Callable[..., torch.Tensor]


# ------------------------------------------------------------------------------------------ CUDA ops
class CudaGraphOps:
    """The two CUDA-graph captures :class:`CudaGraphSteps` uses (tests inject a CPU stand-in with the same
    buffer semantics)."""

    def __init__(self, device: torch.device):
        self.device = device

    def capture(self, fn: Step, static_args: Sequence[torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
        """Warm ``fn`` up on a side stream, then capture ``fn(*static_args)`` into a CUDA graph; returns
        (replay, static output). Replaying re-runs the kernels on the static buffers' current contents."""
        with torch.cuda.device(self.device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(WARMUP_CALLS):
                    fn(*static_args)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = fn(*static_args)
        return graph.replay, static_out

    def graph_autograd(self, fn: Step, sample_args: Sequence[torch.Tensor]) -> Step:
        """``torch.cuda.make_graphed_callables``: forward and backward captured; the result is differentiable
        w.r.t. the inputs that need gradients (their ``requires_grad`` must match ``sample_args``)."""
        with torch.cuda.device(self.device):
            return torch.cuda.make_graphed_callables(fn, tuple(sample_args), num_warmup_iters=WARMUP_CALLS)

    def free_bytes(self) -> int:
        return speed.free_memory_bytes(self.device)


# ------------------------------------------------------------------------------------------ helpers
def graphs_disabled_by_env() -> bool:
    """``DP_CUDA_GRAPHS`` set to 0/off/false/no turns every graph off (for ComfyUI, which has no widget)."""
    return os.environ.get("DP_CUDA_GRAPHS", "").strip().lower() in ("0", "off", "false", "no")


def relative_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """‖a − b‖₂ / max(‖b‖₂, 1e-12) in float32 (a 0-dim tensor; non-finite when either is)."""
    a, b = a.detach().float(), b.detach().float()
    return torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-12)


def tolerance_for(dtype: torch.dtype) -> float:
    """The :data:`VERIFY_RTOL` of a step computed in ``dtype`` (autocast dtype when autocast is on)."""
    return VERIFY_RTOL.get(dtype, VERIFY_RTOL_HALF)


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype of the autocast active for ``device_type`` now, or None (torch < 2.4 has no per-device query:
    its CUDA and CPU functions are used)."""
    try:
        if not torch.is_autocast_enabled(device_type):
            return None
        return torch.get_autocast_dtype(device_type)
    except TypeError:  # torch < 2.4
        if device_type == "cuda":
            return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None


def _needs_grad(t: torch.Tensor) -> bool:
    return t.requires_grad and torch.is_grad_enabled()


@dataclass
class _Entry:
    """One signature's state inside a scope."""
    calls: int = 0
    run: Optional[Step] = None  # the graphed step once captured
    verified: bool = False
    autograd: bool = False
    compute_dtype: torch.dtype = torch.float32


@dataclass
class GraphStats:
    """What the graphs did (for the benchmark and tests): captures, replays, eager calls inside scopes."""
    captures: int = 0
    replays: int = 0
    eager: int = 0
    drops: int = 0
    verified: list = field(default_factory=list)  # relative errors measured at verification


# ------------------------------------------------------------------------------------------ the wrapper
class CudaGraphSteps:
    """``fn(*tensors) → tensor`` replayed as CUDA graphs inside :meth:`scope` (see the module docstring).

    Args:
        fn: the step, e.g. the UNet call of ``predict_eps``; every argument a tensor, one tensor returned.
        device: its device; graphs need CUDA (another device logs why and runs ``fn``).
        setting: "auto", "on" or "off" (:data:`GRAPH_SETTINGS`).
        weights: returns the tensors ``fn`` reads besides its arguments (the UNet's parameters and buffers);
            their addresses are checked on every call, so a moved model is never replayed.
        free_bytes: free device memory for the "auto" floor (default: :func:`core.speed.free_memory_bytes`;
            the ComfyUI bridge passes ComfyUI's view).
        ops: the capture implementation (default :class:`CudaGraphOps`); tests inject a CPU stand-in, which
            also lifts the CUDA-only rule.
        what: the step's name in log lines.

    Raises:
        ValueError: for a setting outside :data:`GRAPH_SETTINGS`.
    """

    def __init__(self, fn: Step, device: torch.device | str, setting: str = "auto", *,
                 weights: Callable[[], Iterable[torch.Tensor]], free_bytes: Optional[Callable[[], int]] = None,
                 ops=None, what: str = "UNet"):
        if setting not in GRAPH_SETTINGS:
            raise ValueError(f"cuda_graphs must be one of {GRAPH_SETTINGS}, got {setting!r}")
        self.fn, self.what, self.setting = fn, what, setting
        self.device = torch.device(device)
        self._weights = weights
        self._ops = ops if ops is not None else CudaGraphOps(self.device)
        self._free_bytes = free_bytes or self._ops.free_bytes
        self._entries: dict = {}
        self._token: Optional[tuple] = None
        self._depth = 0
        self._scope_on = False
        self._scope_recaptures = 0
        self.stats = GraphStats()
        self.failed: Optional[str] = None  # set once graphs failed: off for the rest of this object's life
        if setting == "off":
            self.reason = "off (set explicitly)"
        elif graphs_disabled_by_env():
            self.reason = "off: DP_CUDA_GRAPHS turns it off"
        elif self.device.type != "cuda" and ops is None:
            self.reason = f"off: CUDA graphs need a CUDA device, this one is {self.device.type}"
        else:
            self.reason = f"{setting}: captured per loop on the 2nd call of each shape, checked against eager"
        self._usable = self.reason.startswith(("auto", "on"))

    # ------------------------------------------------------------------ scope
    @contextlib.contextmanager
    def scope(self, enabled: bool = True, why: str = "") -> Iterator[None]:
        """Let the calls inside the block replay graphs (the outermost block decides; nested blocks join it).
        Every graph is released when the outermost block exits. ``enabled=False`` keeps the block eager and
        logs ``why`` once."""
        outermost = self._depth == 0
        if outermost:
            self._scope_on = self._open_scope(enabled, why)
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if outermost:
                self._release()
                self._scope_on = False

    def _open_scope(self, enabled: bool, why: str) -> bool:
        if not self._usable or self.failed is not None:
            return False
        if not enabled:
            log.info("[Diff-Privacy] CUDA graphs of the %s step off for this loop: %s", self.what, why)
            return False
        if self.setting == "auto":
            free = int(self._free_bytes() or 0)
            if free < FREE_MEMORY_FLOOR:
                log.info("[Diff-Privacy] CUDA graphs of the %s step off for this loop: %.1f GiB free < %.0f GiB "
                         "(a graph keeps a step's activations resident; cuda_graphs='on' overrides)",
                         self.what, free / 2 ** 30, FREE_MEMORY_FLOOR / 2 ** 30)
                return False
        self._scope_recaptures = 0
        return True

    def _release(self) -> None:
        self._entries.clear()
        self._token = None

    @property
    def active(self) -> bool:
        """Whether calls now may replay graphs (inside an enabled scope, nothing failed)."""
        return self._scope_on and self.failed is None and not speed._eager_depth

    # ------------------------------------------------------------------ calls
    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return self.fn(*args)
        token = self._weights_token()
        if token is None:
            return self._eager_for_scope(args, "a UNet weight is not on the compute device (low-VRAM loading)")
        if token != self._token:
            if self._token is not None:
                self._entries.clear()
                self.stats.drops += 1
                self._scope_recaptures += 1
                if self._scope_recaptures > MAX_RECAPTURES:
                    return self._eager_for_scope(args, f"the weights moved {MAX_RECAPTURES + 1} times in one loop")
            self._token = token
        autograd = any(_needs_grad(a) for a in args)
        key = (autograd, torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
               autocast_dtype(self.device.type),
               tuple((tuple(a.shape), a.dtype, _needs_grad(a)) for a in args))
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry(autograd=autograd, compute_dtype=self._compute_dtype(args))
        entry.calls += 1
        try:
            if entry.run is None:
                if entry.calls < CAPTURE_ON_CALL:
                    self.stats.eager += 1
                    return self.fn(*args)
                entry.run = self._capture(args, autograd)
                self.stats.captures += 1
                self.stats.eager += 1
                return self.fn(*args)  # nothing unchecked leaves: the capture call's answer is eager
            if not entry.verified:
                return self._verify(entry, args)
            self.stats.replays += 1
            return entry.run(*args)
        except Exception as err:  # noqa: BLE001 - any failure of a graph means eager, for good
            self._fail(f"{type(err).__name__}: {str(err)[:200]}")
            return self.fn(*args)

    def _compute_dtype(self, args: Sequence[torch.Tensor]) -> torch.dtype:
        under_autocast = autocast_dtype(self.device.type)
        if under_autocast is not None:
            return under_autocast
        floats = [a.dtype for a in args if a.is_floating_point()]
        return floats[0] if floats else torch.float32

    def _weights_token(self) -> Optional[tuple]:
        ptrs = []
        for w in self._weights():
            if w.device.type != self.device.type:
                return None
            ptrs.append(w.data_ptr())
        return tuple(ptrs)

    def _eager_for_scope(self, args, why: str) -> torch.Tensor:
        log.info("[Diff-Privacy] CUDA graphs of the %s step off for this loop: %s", self.what, why)
        self._scope_on = False
        self._release()
        return self.fn(*args)

    def _fail(self, why: str) -> None:
        self.failed = why
        self.reason = f"off after a failure ({why})"
        self._release()
        log.warning("[Diff-Privacy] CUDA graphs of the %s step %s; running eagerly", self.what, self.reason)

    # ------------------------------------------------------------------ capture and verification
    def _capture(self, args: Sequence[torch.Tensor], autograd: bool) -> Step:
        if autograd:
            sample = [a.detach().clone().requires_grad_(_needs_grad(a)) for a in args]
            graphed = self._ops.graph_autograd(self.fn, sample)
            return lambda *xs: graphed(*xs).clone()
        static_in = [a.detach().clone() for a in args]
        with torch.no_grad():
            replay, static_out = self._ops.capture(self.fn, static_in)

        def run(*xs: torch.Tensor) -> torch.Tensor:
            for buf, x in zip(static_in, xs):
                buf.copy_(x)
            replay()
            return static_out.clone()

        return run

    def _verify(self, entry: _Entry, args: Sequence[torch.Tensor]) -> torch.Tensor:
        """Graph and eager on the same inputs; adopt the graph when they agree (one host sync per signature)."""
        rtol = tolerance_for(entry.compute_dtype)
        if entry.autograd:
            wants = [i for i, a in enumerate(args) if _needs_grad(a)]
            eager_in = [a.detach().requires_grad_(_needs_grad(a)) for a in args]
            graph_in = [a.detach().requires_grad_(_needs_grad(a)) for a in args]
            eager_out = self.fn(*eager_in)
            weight = eager_out.detach()
            eager_grads = torch.autograd.grad(eager_out, [eager_in[i] for i in wants], weight)
            graph_out = entry.run(*graph_in)
            graph_grads = torch.autograd.grad(graph_out, [graph_in[i] for i in wants], weight)
            pairs = [(graph_out, eager_out), *zip(graph_grads, eager_grads)]
        else:
            with torch.no_grad():
                eager_out = self.fn(*args)
                graph_out = entry.run(*args)
            pairs = [(graph_out, eager_out)]
        errors = torch.stack([relative_error(g, e) for g, e in pairs])
        worst = float(errors.nan_to_num(float("inf")).max())  # the one sync of a signature
        self.stats.verified.append(worst)
        if not worst <= rtol:
            self._fail(f"replay differs from the eager step: relative error {worst:.2e} > {rtol:g}")
            return self.fn(*args) if entry.autograd else eager_out
        entry.verified = True
        log.info("[Diff-Privacy] CUDA graph of the %s step captured and checked (relative error %.1e)",
                 self.what, worst)
        self.stats.replays += 1
        # with gradients the caller's graph must run through the graphed step on its own inputs
        return entry.run(*args) if entry.autograd else graph_out


def graph_scope(backend, enabled: bool = True, why: str = ""):
    """The backend's CUDA-graph scope for one loop (``backend.unet_graphs``), or a no-op for a backend without
    graphs. Loops open it around their steps and nothing else."""
    opener = getattr(backend, "unet_graphs", None)
    return opener(enabled, why) if callable(opener) else contextlib.nullcontext()
