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
   the input gradients): a relative L2 error above :func:`tolerance_for` the compute dtype — e.g. a value the
   capture baked in from call 2's inputs — or a non-finite value turns graphs off for good with one warning
   line, and the eager result is used;
4. later calls copy their inputs into the graph's static buffers, replay, and return a clone of the output
   (a replay must never overwrite a tensor the caller still holds). No host-device synchronisation.

What the check on call 3 does not cover, and how it is handled instead: a graph with gradients keeps the
activations of its *latest* forward for its backward, so a second forward of the same signature before the
first one's backward would give the first wrong gradients — such a forward runs eagerly instead (every loop
here backpropagates each step before the next); its backward reads the UNet weights by address, so the
entry keeps them alive; and every call compares the addresses (and dtypes) of every weight and buffer with
those at capture (a host-side tuple compare): a moved weight drops the scope's graphs (captured again on the
next calls; after :data:`MAX_RECAPTURES` moves the loop stays eager), and a weight that is not on the device
(ComfyUI's low-VRAM loading) or has no plain storage (a quantized wrapper tensor, whose address reads 0)
keeps the loop eager.

Graphs are off, with one log line, and the eager step runs when: the setting is "off" or ``DP_CUDA_GRAPHS=0``;
the device is not CUDA; "auto" finds less free memory than :data:`FREE_MEMORY_FLOOR` or than
:data:`RESIDENT_HEADROOM` × the activations the loop says a graph keeps resident; a loop or an enclosing block
opens its scope with ``enabled=False`` (MSI with gradient checkpointing, the benchmark's eager reference); an
autocast with a weight cache is active; or capturing runs out of memory (for that loop). Any other failure of a
capture, a replay or the check turns graphs off for the rest of the object's life. Exceptions the caller
names as its own (``passthrough``: ComfyUI's Cancel) propagate untouched; errors of the eager step itself are
never caught here.
"""
from __future__ import annotations

import contextlib
import inspect
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
#: "auto" also needs this many times the activations a loop's graph keeps resident (when the loop measured
#: them: MSI): the graph's pool, the eager step of the capture and check calls, and room. Our choice.
RESIDENT_HEADROOM = 3.0
#: the call of a signature (within a scope) that captures its graph: a signature seen twice is a loop
CAPTURE_ON_CALL = 2
#: warm-up calls before a capture (cuBLAS/cuDNN workspaces and lazy initialisation must not be captured)
WARMUP_CALLS = 2
#: relative L2 error allowed between a graph's replay and the eager step on the same inputs: float32 steps
#: replay the same kernels (1e-3 leaves room for a different cuBLAS workspace split and attention backward
#: kernels that accumulate with atomics); bf16/fp16 ones 2e-2. A capture bug (a value baked in from the
#: capture call's inputs) gives errors of order 1.
VERIFY_RTOL = {torch.float32: 1e-3, torch.float64: 1e-6}
VERIFY_RTOL_HALF = 2e-2
#: drops of a scope's graphs because a weight moved before the loop stays eager (ComfyUI re-loading the UNet
#: at every call would otherwise pay a capture each time)
MAX_RECAPTURES = 3

Step = Callable[..., torch.Tensor]


# ------------------------------------------------------------------------------------------ CUDA ops
def _accepts(fn: Callable, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


class CudaGraphOps:
    """The CUDA side of :class:`CudaGraphSteps`: the two captures and freeing memory (tests inject a CPU
    stand-in with the same buffer semantics, tests/support/fake_graphs.py).

    Captures use ``capture_error_mode="thread_local"`` (where this torch has it): another thread of the same
    process (ComfyUI's server) may use CUDA while a capture runs. The calling thread's current stream is
    restored whatever happens (a failed capture would otherwise leave it on the capture stream).
    """

    def __init__(self, device: torch.device):
        self.device = device

    @contextlib.contextmanager
    def _on_device(self) -> Iterator[None]:
        with torch.cuda.device(self.device):
            previous = torch.cuda.current_stream()
            try:
                yield
            finally:
                torch.cuda.set_stream(previous)

    def capture(self, fn: Step, static_args: Sequence[torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
        """Warm ``fn`` up on a side stream, then capture ``fn(*static_args)`` into a CUDA graph; returns
        (replay, static output). Replaying re-runs the kernels on the static buffers' current contents."""
        with self._on_device():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(WARMUP_CALLS):
                    fn(*static_args)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            mode = {"capture_error_mode": "thread_local"} if _accepts(torch.cuda.graph, "capture_error_mode") else {}
            with torch.cuda.graph(graph, **mode):
                static_out = fn(*static_args)
        return graph.replay, static_out

    def graph_autograd(self, fn: Step, sample_args: Sequence[torch.Tensor]) -> Step:
        """``torch.cuda.make_graphed_callables``: forward and backward captured; the result is differentiable
        w.r.t. the inputs that need gradients (their ``requires_grad`` must match ``sample_args``)."""
        maker = torch.cuda.make_graphed_callables
        mode = {"capture_error_mode": "thread_local"} if _accepts(maker, "capture_error_mode") else {}
        with self._on_device():
            return maker(fn, tuple(sample_args), num_warmup_iters=WARMUP_CALLS, **mode)

    def free_bytes(self) -> int:
        return speed.free_memory_bytes(self.device)

    def empty_cache(self) -> None:
        """Hand the memory of released graphs back before an eager retry."""
        torch.cuda.empty_cache()


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


_OOM_ERRORS = tuple(t for t in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None))
                    if t is not None)


def _is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, _OOM_ERRORS) or "out of memory" in str(err).lower()


@dataclass
class _Entry:
    """One signature's state inside a scope."""
    calls: int = 0
    run: Optional[Step] = None  # the graphed step once captured
    verified: bool = False
    autograd: bool = False
    compute_dtype: torch.dtype = torch.float32
    weights: tuple = ()  # the weights the graph reads by address, kept alive while it exists
    pending: int = 0  # graphed forwards whose backward has not run yet (their activations fill the pool)


@dataclass
class GraphStats:
    """What the graphs did (for the benchmark and tests): captures, replays, eager calls inside scopes."""
    captures: int = 0
    replays: int = 0
    eager: int = 0
    drops: int = 0
    verified: list = field(default_factory=list)  # relative errors measured at verification


class _Failure(Exception):
    """A graph operation failed: ``permanent`` turns graphs off for good, else only for the loop."""

    def __init__(self, why: str, permanent: bool):
        super().__init__(why)
        self.why, self.permanent = why, permanent


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
        compute_dtype: the dtype ``fn`` computes in when no autocast is active and it differs from the
            inputs' (ComfyUI casts float32 inputs to the model's fp16/bf16 inside): sets the check's tolerance.
        passthrough: exception classes raised inside a capture that are the caller's, not a graph failure
            (ComfyUI's InterruptProcessingException: Cancel); they propagate untouched.
        ops: the capture implementation (default :class:`CudaGraphOps`); tests inject a CPU stand-in, which
            also lifts the CUDA-only rule.
        what: the step's name in log lines.

    Raises:
        ValueError: for a setting outside :data:`GRAPH_SETTINGS`.
    """

    def __init__(self, fn: Step, device: torch.device | str, setting: str = "auto", *,
                 weights: Callable[[], Iterable[torch.Tensor]], free_bytes: Optional[Callable[[], int]] = None,
                 compute_dtype: Optional[torch.dtype] = None, passthrough: tuple = (), ops=None,
                 what: str = "UNet"):
        if setting not in GRAPH_SETTINGS:
            raise ValueError(f"cuda_graphs must be one of {GRAPH_SETTINGS}, got {setting!r}")
        self.fn, self.what, self.setting = fn, what, setting
        self.device = torch.device(device)
        self._weights = weights
        self._ops = ops if ops is not None else CudaGraphOps(self.device)
        self._free_bytes = free_bytes or self._ops.free_bytes
        self._compute_dtype_given = compute_dtype
        self._passthrough = tuple(passthrough)
        self._entries: dict = {}
        self._token: Optional[tuple] = None
        self._depth = 0
        self._suppressed = 0  # nested blocks opened with enabled=False
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
    def scope(self, enabled: bool = True, why: str = "", resident_bytes: int = 0) -> Iterator[None]:
        """Let the calls inside the block replay graphs. The outermost block opens the scope (and releases
        every graph when it exits); a nested block joins it, except that a block opened with
        ``enabled=False`` keeps its calls eager (``why`` is logged). ``resident_bytes``: the activations a
        graph of this loop keeps resident, when measured (MSI), for the "auto" memory check."""
        outermost = self._depth == 0
        if outermost:
            self._scope_on = self._open_scope(enabled, why, resident_bytes)
        elif not enabled and self._scope_on:
            log.info("[Diff-Privacy] CUDA graphs of the %s step off for this loop: %s", self.what, why)
        suppress = not outermost and not enabled
        self._depth += 1
        self._suppressed += suppress
        try:
            yield
        finally:
            self._depth -= 1
            self._suppressed -= suppress
            if outermost:
                self._release()
                self._scope_on = False

    def _open_scope(self, enabled: bool, why: str, resident_bytes: int) -> bool:
        if not self._usable or self.failed is not None:
            return False
        if not enabled:
            log.info("[Diff-Privacy] CUDA graphs of the %s step off for this loop: %s", self.what, why)
            return False
        if self.setting == "auto":
            free = int(self._free_bytes() or 0)
            need = max(FREE_MEMORY_FLOOR, int(RESIDENT_HEADROOM * max(int(resident_bytes), 0)))
            if free < need:
                log.info("[Diff-Privacy] CUDA graphs of the %s step off for this loop: %.1f GiB free < %.1f GiB "
                         "(a graph keeps a step's activations resident; cuda_graphs='on' overrides)",
                         self.what, free / 2 ** 30, need / 2 ** 30)
                return False
        self._scope_recaptures = 0
        return True

    def _release(self) -> None:
        self._entries.clear()
        self._token = None

    @property
    def active(self) -> bool:
        """Whether calls now may replay graphs (inside an enabled scope, nothing failed)."""
        return (self._scope_on and not self._suppressed and self.failed is None and not speed._eager_depth)

    # ------------------------------------------------------------------ calls
    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return self.fn(*args)
        token = self._weights_token()
        if token is None:
            return self._eager_for_scope(args, "a UNet weight is off the compute device (low-VRAM loading) or "
                                               "has no plain storage (quantized)")
        if token != self._token:
            if self._token is not None:
                self._entries.clear()
                self.stats.drops += 1
                self._scope_recaptures += 1
                if self._scope_recaptures > MAX_RECAPTURES:
                    return self._eager_for_scope(args, f"the weights moved {MAX_RECAPTURES + 1} times in one loop")
            self._token = token
        autograd = any(_needs_grad(a) for a in args)
        if autograd and autocast_dtype(self.device.type) is not None and torch.is_autocast_cache_enabled():
            return self._eager_for_scope(args, "an autocast with a weight cache is active (cache_enabled=True)")
        key = (autograd, torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
               autocast_dtype(self.device.type),
               tuple((tuple(a.shape), a.dtype, _needs_grad(a)) for a in args))
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry(autograd=autograd, compute_dtype=self._compute_dtype(args))
        entry.calls += 1
        if entry.run is None and entry.calls >= CAPTURE_ON_CALL:
            if self._guarded(lambda: self._capture(entry, args, autograd)):
                self.stats.captures += 1
        elif entry.run is not None and not self._backward_pending(entry):
            result = self._guarded(lambda: self._verified_call(entry, args) if entry.verified
                                   else self._verify(entry, args))
            if result is not None:
                return result
        self.stats.eager += 1
        return self.fn(*args)  # the eager step itself: its own errors (and Cancel) propagate as they are

    def _guarded(self, operation: Callable[[], object]):
        """Run a graph operation; on failure release what it held and return None (the caller runs eagerly,
        outside this frame, so the failed graph's memory can be freed first)."""
        failure: Optional[_Failure] = None
        try:
            return operation()
        except self._passthrough:
            self._release()
            raise
        except _Failure as err:
            failure = err
        except Exception as err:  # noqa: BLE001 - any failure of a graph means eager
            failure = _Failure(f"{type(err).__name__}: {str(err)[:200]}", permanent=not _is_out_of_memory(err))
        if failure.permanent:
            self._fail(failure.why)
        else:
            self._eager_for_scope(None, failure.why)
        self._ops.empty_cache()
        return None

    def _compute_dtype(self, args: Sequence[torch.Tensor]) -> torch.dtype:
        under_autocast = autocast_dtype(self.device.type)
        if under_autocast is not None:
            return under_autocast
        if self._compute_dtype_given is not None:
            return self._compute_dtype_given
        floats = [a.dtype for a in args if a.is_floating_point()]
        return floats[0] if floats else torch.float32

    def _weights_token(self) -> Optional[tuple]:
        token = []
        for w in self._weights():
            ptr = w.data_ptr()
            if w.device.type != self.device.type or (ptr == 0 and w.numel() > 0):
                return None
            token.append((ptr, w.dtype, w.device.index))
        return tuple(token)

    def _eager_for_scope(self, args, why: str):
        log.info("[Diff-Privacy] CUDA graphs of the %s step off for this loop: %s", self.what, why)
        self._scope_on = False
        self._release()
        return None if args is None else self.fn(*args)

    def _fail(self, why: str) -> None:
        self.failed = why
        self.reason = f"off after a failure ({why})"
        self._release()
        log.warning("[Diff-Privacy] CUDA graphs of the %s step %s; running eagerly", self.what, self.reason)

    # ------------------------------------------------------------------ capture, replay and verification
    def _capture(self, entry: _Entry, args: Sequence[torch.Tensor], autograd: bool) -> bool:
        entry.weights = tuple(self._weights())
        entry.autograd = autograd
        if autograd:
            sample = [a.detach().clone().requires_grad_(_needs_grad(a)) for a in args]
            graphed = self._ops.graph_autograd(self.fn, sample)
            entry.run = lambda *xs: graphed(*xs).clone()
            return True
        static_in = [a.detach().clone() for a in args]
        with torch.no_grad():
            replay, static_out = self._ops.capture(self.fn, static_in)

        def run(*xs: torch.Tensor) -> torch.Tensor:
            for buf, x in zip(static_in, xs):
                buf.copy_(x)
            replay()
            return static_out.clone()

        entry.run = run
        return True

    @staticmethod
    def _backward_pending(entry: _Entry) -> bool:
        """Whether a forward of this (autograd) graph still waits for its backward: its saved activations
        live in the graph's pool, so another forward now would overwrite them. A forward whose output never
        gets a backward keeps the signature eager for the rest of the scope (safe, only slower)."""
        return entry.pending > 0

    @staticmethod
    def _track(entry: _Entry, out: torch.Tensor) -> torch.Tensor:
        """Count a graphed forward pending until the gradient reaches its output (its backward then runs)."""
        if entry.autograd and out.requires_grad:
            entry.pending += 1

            def done(grad):
                entry.pending = max(entry.pending - 1, 0)
                return grad

            out.register_hook(done)
        return out

    def _verified_call(self, entry: _Entry, args: Sequence[torch.Tensor]) -> torch.Tensor:
        self.stats.replays += 1
        return self._track(entry, entry.run(*args))

    def _verify(self, entry: _Entry, args: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
        """Graph and eager on the same inputs; adopt the graph when they agree (one host sync per signature).
        Raises :class:`_Failure` when they do not."""
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
            raise _Failure(f"replay differs from the eager step: relative error {worst:.2e} > {rtol:g}",
                           permanent=True)
        entry.verified = True
        log.info("[Diff-Privacy] CUDA graph of the %s step captured and checked (relative error %.1e)",
                 self.what, worst)
        self.stats.replays += 1
        # with gradients the caller's graph must run through the graphed step on its own inputs
        return self._track(entry, entry.run(*args)) if entry.autograd else graph_out


def graph_scope(backend, enabled: bool = True, why: str = "", resident_bytes: int = 0):
    """The backend's CUDA-graph scope for one loop (``backend.unet_graphs``), or a no-op for a backend without
    graphs. Loops open it around their steps and nothing else."""
    opener = getattr(backend, "unet_graphs", None)
    return opener(enabled, why, resident_bytes) if callable(opener) else contextlib.nullcontext()
