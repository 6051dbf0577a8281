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
entry keeps their storages alive; and every call compares the addresses (and dtypes) of every weight and buffer with
those at capture (a host-side tuple compare): a moved weight drops the scope's graphs (captured again on the
next calls; after :data:`MAX_RECAPTURES` moves the loop stays eager), and a weight that is not on the device
(ComfyUI's low-VRAM loading) or has no plain storage (a quantized wrapper tensor, whose address reads 0)
keeps the loop eager.

Graphs are off, with one log line, and the eager step runs when: the setting is "off" or ``DP_CUDA_GRAPHS=0``;
the device is not CUDA; "auto" finds less free memory than :data:`FREE_MEMORY_FLOOR` or than
:data:`RESIDENT_HEADROOM` × the activations the loop says a graph keeps resident; a loop or an enclosing block
opens its scope with ``enabled=False`` (MSI with gradient checkpointing, the benchmark's eager reference); an
autocast with a weight cache is active; or a capture, replay or check runs out of memory (for that loop). Any
other failure of a capture, a replay or the check turns graphs off for the rest of the object's life. Exceptions the caller
names as its own (``passthrough``: ComfyUI's Cancel) propagate untouched; errors of the eager step itself are
never caught here.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch

from . import speed

log = logging.getLogger("diff_privacy.speed")

#: accepted values of the cuda_graphs setting: "auto" (on where it works and memory allows), "on" (also with
#: less memory), "off"
GRAPH_SETTINGS = speed.SWITCH_SETTINGS
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
#: moves of the weights under captured graphs after which a loop stays eager (ComfyUI re-loading the UNet at
#: every call would otherwise pay a capture each time)
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

    def empty_cache(self) -> None:
        """Hand the memory of released graphs back before an eager retry."""
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ helpers
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


def live_weights(module: torch.nn.Module) -> Callable[[], Iterator[torch.Tensor]]:
    """The ``weights`` reader of :class:`CudaGraphSteps` for a module: every parameter and buffer, read through
    the slots that hold them (found once), so a tensor replaced in its slot (ComfyUI re-loading or patching a
    weight) is seen, without walking the module tree on every call (1.4 ms for SD1.5's UNet on a slow CPU)."""
    slots: list = []

    def read() -> Iterator[torch.Tensor]:
        if not slots:
            for sub in module.modules():
                slots.extend((sub._parameters, name) for name in sub._parameters)
                slots.extend((sub._buffers, name) for name in sub._buffers)
        for table, name in slots:
            tensor = table.get(name)
            if tensor is not None:
                yield tensor

    return read


def _needs_grad(t: torch.Tensor) -> bool:
    return t.requires_grad and torch.is_grad_enabled()


_OOM_ERRORS = tuple(t for t in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None))
                    if t is not None)


def _is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, _OOM_ERRORS) or "out of memory" in str(err).lower()


@dataclass
class _Entry:
    """One signature's state inside a scope."""
    autograd: bool
    compute_dtype: torch.dtype
    calls: int = 0
    run: Optional[Step] = None  # the graphed step once captured
    verified: bool = False
    pinned: tuple = ()  # the storages the graph reads weights from, alive while it exists
    pending: int = 0  # graphed forwards whose backward has not run yet (their activations fill the pool)


@dataclass
class GraphStats:
    """What the graphs did over the object's life (benchmark, report, tests)."""
    captures: int = 0
    replays: int = 0
    drops: int = 0  # scopes' graphs dropped because a weight moved
    verified: list = field(default_factory=list)  # relative errors measured at the checks
    last_eager: str = ""  # why the latest loop that kept its steps eager did so


@dataclass
class _EagerReference:
    """The eager half of a check: the step on detached copies of the inputs, and its input gradients."""
    out: torch.Tensor
    grads: tuple = ()
    wants: tuple = ()  # indices of the inputs that need gradients
    weight: Optional[torch.Tensor] = None  # the output gradient used for the check


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
        free_bytes: free device memory for the "auto" check (default :func:`core.speed.free_memory_bytes`;
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
        self._free_bytes = free_bytes or (lambda: speed.free_memory_bytes(self.device))
        self._compute_dtype_given = compute_dtype
        self._passthrough = tuple(passthrough)
        self._entries: dict = {}
        self._token: Optional[tuple] = None
        self._depth = 0
        self._suppressed = 0  # nested blocks opened with enabled=False
        self._scope_on = False
        self._scope_moves = 0
        self.stats = GraphStats()
        self.failed: Optional[str] = None  # set once graphs failed: off for the rest of this object's life
        env = speed.env_turns_off("DP_CUDA_GRAPHS")
        if setting == "off":
            self._off = "off (set explicitly)"
        elif env is not None:
            self._off = f"off: DP_CUDA_GRAPHS={env} is set"
        elif self.device.type != "cuda" and ops is None:
            self._off = f"off: CUDA graphs need a CUDA device, this one is {self.device.type}"
        else:
            self._off = None
        if self._off is not None and setting != "off":
            log.info("[Diff-Privacy] CUDA graphs of the %s step %s", what, self._off)

    @property
    def enabled(self) -> bool:
        """Whether loops may capture at all (setting, environment, device; nothing failed)."""
        return self._off is None and self.failed is None

    @property
    def reason(self) -> str:
        """One line for reports and the benchmark: whether graphs run and what they did so far."""
        if self._off is not None:
            return self._off
        if self.failed is not None:
            return f"off after a failure ({self.failed})"
        done = (f"{self.stats.captures} graph(s) captured and checked, {self.stats.replays} replays"
                if self.stats.captures else "no graph captured yet")
        last = f"; last eager loop: {self.stats.last_eager}" if self.stats.last_eager else ""
        return f"{self.setting}: captured per loop and checked against eager; {done}{last}"

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
            self._note_eager(why)
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
        if not self.enabled:
            return False
        if not enabled:
            self._note_eager(why)
            return False
        if self.setting == "auto":
            free = int(self._free_bytes() or 0)
            need = max(FREE_MEMORY_FLOOR, int(RESIDENT_HEADROOM * max(int(resident_bytes), 0)))
            if free < need:
                self._note_eager(f"{free / 2 ** 30:.1f} GiB free < {need / 2 ** 30:.1f} GiB (a graph keeps a step's "
                                 "activations resident; the CLI's --cuda-graphs on overrides)")
                return False
        self._scope_moves = 0
        return True

    def _note_eager(self, why: str) -> None:
        self.stats.last_eager = why
        log.info("[Diff-Privacy] CUDA graphs of the %s step off for this loop: %s", self.what, why)

    def _stay_eager(self, why: str) -> None:
        """The rest of this scope runs eagerly."""
        self._note_eager(why)
        self._scope_on = False
        self._release()

    def _release(self) -> None:
        for entry in self._entries.values():
            entry.run, entry.pinned = None, ()  # drop the graphs (and their pools) even if an entry is still held
        self._entries.clear()
        self._token = None

    @property
    def active(self) -> bool:
        """Whether calls now may replay graphs (inside an enabled scope, nothing failed)."""
        return self._scope_on and not self._suppressed and self.failed is None and not speed.eager_only_active()

    # ------------------------------------------------------------------ calls
    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        if self.active:
            outcome = self._graph_call(args)
            if outcome is not None:
                return outcome
        return self.fn(*args)  # the eager step itself: its own errors (and Cancel) propagate as they are

    def _graph_call(self, args: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
        """The graphed answer to this call, or None for an eager one (deciding, capturing, checking)."""
        why = self._weights_problem()
        if why:
            self._stay_eager(why)
            return None
        autocast = autocast_dtype(self.device.type)
        autograd = any(_needs_grad(a) for a in args)
        if autograd and autocast is not None and torch.is_autocast_cache_enabled():
            self._stay_eager("an autocast with a weight cache is active (cache_enabled=True)")
            return None
        key = (autograd, torch.is_grad_enabled(), torch.is_inference_mode_enabled(), autocast,
               tuple((tuple(a.shape), a.dtype, _needs_grad(a)) for a in args))
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry(autograd, autocast or self._compute_dtype(args))
        entry.calls += 1
        if entry.run is None:
            if entry.calls >= CAPTURE_ON_CALL and self._guarded(lambda: self._capture(entry, args)):
                self.stats.captures += 1
            return None  # the capture call answers eagerly
        if entry.pending:
            return None  # the previous forward's backward has not run: its activations are still needed
        if entry.verified:
            return self._guarded(lambda: self._replay(entry, args))
        reference = self._eager_reference(entry, args)  # outside the guard: eager errors propagate
        checked = self._guarded(lambda: self._check(entry, args, reference))
        if checked is None and not entry.autograd:
            return reference.out  # the check failed: this call's eager answer is already there
        return checked

    def _guarded(self, operation: Callable[[], Optional[torch.Tensor]]):
        """Run a graph operation. On failure release what the graphs hold and return None (the caller answers
        eagerly once this frame is gone, so the failed graph's memory can be freed first)."""
        why, permanent = None, True
        try:
            return operation()
        except self._passthrough:
            self._release()
            raise
        except _Failure as err:
            why, permanent = err.why, err.permanent
        except Exception as err:  # noqa: BLE001 - any failure of a graph means eager
            why, permanent = f"{type(err).__name__}: {str(err)[:200]}", not _is_out_of_memory(err)
        if permanent:
            self.failed = why
            self._release()
            log.warning("[Diff-Privacy] CUDA graphs of the %s step %s; running eagerly", self.what, self.reason)
        else:
            self._stay_eager(why)
        self._ops.empty_cache()
        return None

    def _compute_dtype(self, args: Sequence[torch.Tensor]) -> torch.dtype:
        if self._compute_dtype_given is not None:
            return self._compute_dtype_given
        floats = [a.dtype for a in args if a.is_floating_point()]
        return floats[0] if floats else torch.float32

    def _weights_problem(self) -> str:
        """Why the weights cannot be replayed from now, or "" (a move drops the scope's graphs). Per call only
        the addresses and dtypes are read; devices and storages are checked when they change."""
        token = tuple((w.data_ptr(), w.dtype) for w in self._weights())
        if token == self._token:
            return ""
        for w in self._weights():
            if w.device.type != self.device.type:
                return "a UNet weight is off the compute device (ComfyUI's low-VRAM loading)"
            if w.data_ptr() == 0 and w.numel() > 0:
                return "a UNet weight has no plain storage (a quantized weight type)"
        if self._token is not None:
            if any(entry.run is not None for entry in self._entries.values()):
                self._scope_moves += 1
                self.stats.drops += 1
                if self._scope_moves >= MAX_RECAPTURES:
                    return f"the UNet weights moved {self._scope_moves} times in one loop"
            self._release()
        self._token = token
        return ""

    # ------------------------------------------------------------------ capture, replay and check
    def _capture(self, entry: _Entry, args: Sequence[torch.Tensor]) -> bool:
        entry.pinned = tuple(w.detach() for w in self._weights())  # the storages, even if a Parameter moves
        if entry.autograd:
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

    def _replay(self, entry: _Entry, args: Sequence[torch.Tensor]) -> torch.Tensor:
        """A checked graph's answer; with gradients it counts as pending until its backward starts."""
        self.stats.replays += 1
        out = entry.run(*args)
        if entry.autograd and out.requires_grad:
            entry.pending += 1

            def backward_started(grad):
                entry.pending = max(entry.pending - 1, 0)
                return grad

            out.register_hook(backward_started)
        return out

    def _eager_reference(self, entry: _Entry, args: Sequence[torch.Tensor]) -> _EagerReference:
        if not entry.autograd:
            with torch.no_grad():
                return _EagerReference(self.fn(*args))
        wants = tuple(i for i, a in enumerate(args) if _needs_grad(a))
        inputs = [a.detach().requires_grad_(_needs_grad(a)) for a in args]
        out = self.fn(*inputs)
        weight = out.detach()
        grads = torch.autograd.grad(out, [inputs[i] for i in wants], weight)
        return _EagerReference(out.detach(), tuple(grads), wants, weight)

    def _check(self, entry: _Entry, args: Sequence[torch.Tensor], reference: _EagerReference) -> torch.Tensor:
        """The graph on the same inputs as ``reference``; adopted when they agree (one host sync per signature),
        else :class:`_Failure`."""
        rtol = tolerance_for(entry.compute_dtype)
        if entry.autograd:
            inputs = [a.detach().requires_grad_(_needs_grad(a)) for a in args]
            out = entry.run(*inputs)
            grads = torch.autograd.grad(out, [inputs[i] for i in reference.wants], reference.weight)
            pairs = [(out, reference.out), *zip(grads, reference.grads)]
        else:
            with torch.no_grad():
                out = entry.run(*args)
            pairs = [(out, reference.out)]
        errors = torch.stack([relative_error(g, e) for g, e in pairs])
        worst = float(errors.nan_to_num(float("inf")).max())  # the one sync of a signature
        self.stats.verified.append(worst)
        if not worst <= rtol:
            raise _Failure(f"replay differs from the eager step: relative error {worst:.2e} > {rtol:g}",
                           permanent=True)
        entry.verified = True
        log.info("[Diff-Privacy] CUDA graph of the %s step captured and checked (relative error %.1e)",
                 self.what, worst)
        if not entry.autograd:
            self.stats.replays += 1
            return out
        return self._replay(entry, args)  # the caller's autograd graph must run through its own inputs


def graph_scope(backend, enabled: bool = True, why: str = "", resident_bytes: int = 0):
    """The backend's CUDA-graph scope for one loop (``backend.unet_graphs``), or a no-op for a backend without
    graphs. Loops open it around their steps and nothing else."""
    opener = getattr(backend, "unet_graphs", None)
    return opener(enabled, why, resident_bytes) if callable(opener) else contextlib.nullcontext()
