"""Speed switches that keep the math: memory-driven gradient checkpointing, low-precision autocast on CUDA and a
guarded compiled UNet step (docs/method.md §8.8).

Every switch is decided once, before a loop starts, by a small pure function that tests can drive on a CPU:

* :func:`decide_checkpointing` — UNet activation checkpointing only when the activations of one MSI step
  (measured by :func:`saved_activation_bytes`) would not fit ``CHECKPOINTING_HEADROOM`` times into the free
  memory (:func:`free_memory_bytes`). Checkpointing recomputes the forward pass during backward: same
  gradients, ~1.4× the time of an MSI step (measured on a CPU, full-size SD1.5 weights, 64 px).
* :func:`resolve_autocast_dtype` — "auto" is bfloat16 on a CUDA device that supports it, else no autocast.
* :class:`GuardedCompile` — ``torch.compile`` of a module's forward on CUDA with one shape-specialised graph per
  input shape; any failure (or a CPU device) turns it off with one log line and the eager module runs.

Nothing here synchronises with the device inside a loop: the decisions read memory and flags once.
"""
from __future__ import annotations

import contextlib
import logging
import os
import weakref
from typing import Any, Callable, Iterator, Optional, Union

import torch
from torch import nn

log = logging.getLogger("diff_privacy.speed")

#: the activations of one MSI step must fit this many times into free memory before checkpointing is skipped:
#: room for the optimiser, the text encoder's activations, allocator fragmentation and other models. Our choice.
CHECKPOINTING_HEADROOM = 2.0
#: accepted values of MSIOptions.grad_checkpointing
CHECKPOINTING_SETTINGS = (True, False, "auto")
#: accepted strings for autocast/compile settings
AUTO = "auto"
#: the values of an on/off switch that can also decide for itself: the compiled UNet step, CUDA graphs
SWITCH_SETTINGS = ("auto", "on", "off")
COMPILE_SETTINGS = SWITCH_SETTINGS
#: torch.compile mode of the UNet step: CUDA graphs on top of Inductor kernels. The UNet at batch 1 is
#: launch-bound on an H200 (eager forward 28.6 ms vs 9.5 ms replayed as a CUDA graph, issue 11).
COMPILE_MODE = "reduce-overhead"

CheckpointSetting = Union[bool, str]
_eager_depth = 0  # > 0 while eager_only() is active: compiled steps and CUDA graphs run eagerly


def eager_only_active() -> bool:
    """Whether an :func:`eager_only` block is open."""
    return _eager_depth > 0


def env_turns_off(name: str) -> Optional[str]:
    """The value of environment variable ``name`` when it turns a switch off (0/off/false/no), else None."""
    value = os.environ.get(name, "").strip()
    return value if value.lower() in ("0", "off", "false", "no") else None


# ------------------------------------------------------------------------------------------ memory
def free_memory_bytes(device: torch.device | str) -> int:
    """Bytes a new allocation on ``device`` can use now.

    CUDA: the driver's free memory plus what PyTorch's caching allocator holds but does not use. CPU: the
    kernel's ``MemAvailable`` (Linux), else psutil's available memory, else 0 (unknown: callers then take the
    memory-saving choice).
    """
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        free, _ = torch.cuda.mem_get_info(index)
        cached = torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index)
        return int(free + max(cached, 0))
    if device.type == "cpu":
        try:
            with open("/proc/meminfo", encoding="ascii") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            import psutil
            return int(psutil.virtual_memory().available)
        except ImportError:
            return 0
    return 0


def backend_free_bytes(backend) -> int:
    """Free memory on a backend's device: its own ``free_memory_bytes()`` when it has one (ComfyUI's view, which
    counts models it can unload), else :func:`free_memory_bytes` of ``backend.device``."""
    own = getattr(backend, "free_memory_bytes", None)
    return int(own()) if callable(own) else free_memory_bytes(backend.device)


def saved_activation_bytes(fn: Callable[[], Any]) -> int:
    """Bytes autograd would keep for backward while ``fn()`` runs (a forward pass with grad enabled).

    Every tensor autograd saves is counted once per storage and then dropped at once (the pack hook keeps
    nothing), so the probe itself needs only inference-sized memory; ``fn``'s graph cannot be backpropagated.
    Module parameters (``nn.Parameter``) are not counted: they exist anyway. A storage is known by its address
    only while a saved tensor on it is alive: once they are gone the allocator may hand the address to a new
    tensor, which is then counted as the new storage it is (a storage saved again after its saved tensors died
    is counted twice: an overestimate, the safe side).
    """
    live: dict[int, int] = {}  # storage address → saved tensors on it still alive
    total = 0

    def release(key: int) -> None:
        live[key] -= 1
        if not live[key]:
            del live[key]

    def pack(t: torch.Tensor):
        nonlocal total
        if isinstance(t, nn.Parameter):
            return None
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in live:
            live[key] = 0
            total += storage.nbytes()
        live[key] += 1
        weakref.finalize(t, release, key)
        return None

    def unpack(_):
        raise RuntimeError("saved_activation_bytes: the probe's graph cannot be backpropagated")

    with eager_only(), torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        fn()
    return total


@contextlib.contextmanager
def eager_only() -> Iterator[None]:
    """Run every :class:`GuardedCompile` and :class:`core.cuda_graphs.CudaGraphSteps` eagerly inside the block
    (measurement probes: a compiled step or a graph would save and hold its tensors differently from the eager
    run they stand for)."""
    global _eager_depth
    _eager_depth += 1
    try:
        yield
    finally:
        _eager_depth -= 1


def decide_checkpointing(setting: CheckpointSetting, *, free_bytes: int, activation_bytes: int,
                         headroom: float = CHECKPOINTING_HEADROOM) -> tuple[bool, str]:
    """Whether to checkpoint the UNet's activations, and why (one line for the log and the MSI config).

    ``setting`` True/False is obeyed; "auto" checkpoints exactly when ``activation_bytes × headroom`` exceeds
    ``free_bytes`` (unknown free memory, 0, counts as too little).

    Raises:
        ValueError: for a setting other than True, False or "auto".
    """
    if setting is True or setting is False:
        return bool(setting), f"{'on' if setting else 'off'} (set explicitly)"
    if setting != AUTO:
        raise ValueError(f"grad_checkpointing must be True, False or 'auto', got {setting!r}")
    need = int(activation_bytes * headroom)
    verdict = need > free_bytes
    mib = 1024 * 1024
    return verdict, (f"{'on' if verdict else 'off'} (auto: activations {activation_bytes / mib:.0f} MiB "
                     f"× {headroom:g} {'>' if verdict else '≤'} free {free_bytes / mib:.0f} MiB)")


def faces_that_fit(count: int, bytes_per_face: int, free_bytes: int,
                   headroom: float = CHECKPOINTING_HEADROOM) -> tuple[int, str]:
    """How many of ``count`` faces to run in one batch, and why: the most whose activations
    (``bytes_per_face`` each, measured) fit ``headroom`` times into ``free_bytes``, at least 1 and at most
    ``count``. Unknown free memory (0) or a measurement of 0 bytes (no autograd ran: e.g. inside inference
    mode) gives 1, the choice that needs least memory.

    Raises:
        ValueError: for count < 1 or negative byte counts.
    """
    if count < 1 or bytes_per_face < 0 or free_bytes < 0:
        raise ValueError(f"need count ≥ 1 and byte counts ≥ 0, got {count}, {bytes_per_face}, {free_bytes}")
    if bytes_per_face == 0 or free_bytes == 0:
        unknown = "free memory" if free_bytes == 0 else "activations per face (nothing was measured)"
        return 1, f"one at a time: {unknown} unknown"
    chosen = max(1, min(count, int(free_bytes // (bytes_per_face * headroom))))
    mib = 1024 * 1024
    return chosen, (f"auto: {bytes_per_face / mib:.0f} MiB of activations per face × {headroom:g} against "
                    f"{free_bytes / mib:.0f} MiB free")


# ------------------------------------------------------------------------------------------ precision
def bf16_supported(device: torch.device | str) -> bool:
    """Whether ``device`` is CUDA with native bfloat16 (compute capability ≥ 8.0: Ampere, Hopper…)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        return bool(torch.cuda.is_bf16_supported())
    except (RuntimeError, AssertionError):
        return False


def resolve_autocast_dtype(setting: Optional[Union[str, torch.dtype]], device: torch.device | str
                           ) -> Optional[torch.dtype]:
    """The autocast dtype for the UNet (and VAE) calls on ``device``: "auto" → bfloat16 on a CUDA device with
    bf16 support, else None (no autocast: CPUs run float32, where bf16 is slower and less exact); a dtype or
    None is returned as given.

    Raises:
        ValueError: for any other string.
    """
    if setting is None or isinstance(setting, torch.dtype):
        return setting
    if setting != AUTO:
        raise ValueError(f"autocast_dtype must be a torch dtype, None or 'auto', got {setting!r}")
    return torch.bfloat16 if bf16_supported(device) else None


def resolve_compute_dtype(setting: str, device: torch.device | str) -> torch.dtype:
    """Weight dtype for the CLI/diffusers backend: "auto" → bfloat16 on CUDA with bf16 support, float16 on older
    CUDA devices, float32 on a CPU; "fp32" / "fp16" / "bf16" as named.

    Raises:
        ValueError: for another name.
    """
    named = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if setting in named:
        return named[setting]
    if setting != AUTO:
        raise ValueError(f"dtype must be 'auto', 'fp32', 'fp16' or 'bf16', got {setting!r}")
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.bfloat16 if bf16_supported(device) else torch.float16
    return torch.float32


# ------------------------------------------------------------------------------------------ compile
def compile_available() -> tuple[bool, str]:
    """Whether torch.compile with Inductor can run here (it needs Triton for CUDA kernels), and why not."""
    value = env_turns_off("DP_COMPILE")
    if value is not None:
        return False, f"DP_COMPILE={value} is set"
    if not hasattr(torch, "compile"):
        return False, "this torch has no torch.compile"
    try:
        import triton  # noqa: F401
    except ImportError:
        return False, "Triton is not installed"
    return True, "available"


class GuardedCompile:
    """A module's forward, compiled on CUDA when allowed, eager otherwise; never fails because of compiling.

    ``setting``: "on" / "auto" try ``torch.compile(module, mode=COMPILE_MODE, dynamic=False)`` on a CUDA
    device (one static-shape graph per input shape: MSI's batch of timesteps, the sampler's B samples,
    inversion's 1); "off" never does. A CPU device, a missing Triton, ``DP_COMPILE=0`` or any exception from
    the compiled call switches it off for good with one log line, and that call is re-run eagerly (an error
    of the eager module itself then propagates as usual). Outputs are cloned so that a CUDA-graph replay can
    never overwrite a tensor the caller still holds.

    ``compile_fn`` (default ``torch.compile``) is injectable so tests can drive the switch logic on a CPU.
    """

    def __init__(self, module: nn.Module, device: torch.device | str, setting: str = "off", *,
                 compile_fn: Optional[Callable[..., Callable]] = None, what: str = "UNet"):
        if setting not in COMPILE_SETTINGS:
            raise ValueError(f"compile must be one of {COMPILE_SETTINGS}, got {setting!r}")
        self.module = module
        self.what = what
        self.device = torch.device(device)
        self.compiled: Optional[Callable] = None
        self.reason = ""
        self.active = False
        if setting == "off":
            self.reason = "off (set explicitly)"
        elif self.device.type != "cuda":
            self.reason = f"off: compiled {what} steps need a CUDA device, this one is {self.device.type}"
        else:
            ok, why = (True, "injected") if compile_fn is not None else compile_available()
            if not ok:
                self.reason = f"off: {why}"
            else:
                try:
                    self.compiled = (compile_fn or torch.compile)(module, mode=COMPILE_MODE, dynamic=False)
                    self.active = True
                    self.reason = f"on: torch.compile(mode={COMPILE_MODE!r}, dynamic=False)"
                except Exception as err:  # noqa: BLE001 - any failure means eager
                    self.reason = f"off: torch.compile failed ({type(err).__name__}: {err})"
        log.info("[Diff-Privacy] compiled %s step %s", what, self.reason)

    def __call__(self, *args, **kwargs):
        if self.active and not _eager_depth:
            try:
                out = self.compiled(*args, **kwargs)
            except Exception as err:  # noqa: BLE001 - fall back to eager for good, once
                self.active = False
                self.reason = f"off after a failure ({type(err).__name__}: {str(err)[:200]})"
                log.warning("[Diff-Privacy] compiled %s step %s; running eagerly", self.what, self.reason)
            else:
                return _clone_outputs(out)
        return self.module(*args, **kwargs)


def _clone_outputs(out):
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, tuple):
        return tuple(_clone_outputs(o) for o in out)
    if isinstance(out, list):
        return [_clone_outputs(o) for o in out]
    return out
