"""Count the host reads of tensor values that the pack's own code makes: each one makes the host wait for the
device on a GPU (``.item()``, ``float(t)``, ``bool(t)``, ``.tolist()``, ``.cpu()``…).

On a CPU nothing waits, so the reads are counted where they are written: :func:`count_host_reads` patches the
``torch.Tensor`` methods behind them and records a read when the method's *immediate* caller is a file under
``core/`` or ``nodes/`` of this checkout. Reads that PyTorch makes internally (e.g. the CPU optimiser's step
counters, which stay on the host on a GPU too) are not ours and are not counted. Implicit synchronisations
inside PyTorch kernels (boolean-mask indexing, ``nonzero``) cannot be seen this way; on a CUDA machine
``torch.cuda.set_sync_debug_mode`` catches those.
"""
from __future__ import annotations

import contextlib
import os
import sys
from collections import Counter
from typing import Iterator

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
OWN_CODE = tuple(os.path.join(REPO_ROOT, part) + os.sep for part in ("core", "nodes"))
#: methods that read values on the host whatever the tensor's device (a read of a host-side table inside a loop
#: counts too: it costs a tensor lookup per step, and the same code on a device tensor would wait for the device)
READERS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")


class HostReads:
    """Where the pack's code read tensor values on the host: a Counter of "file:line (method)"."""

    def __init__(self):
        self.sites: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.sites.values())

    def __repr__(self) -> str:
        return f"HostReads({dict(self.sites)})"


def _is_cpu_target(args, kwargs) -> bool:
    target = kwargs.get("device", args[0] if args else None)
    if isinstance(target, str):
        return target.startswith("cpu")
    return isinstance(target, torch.device) and target.type == "cpu"


@contextlib.contextmanager
def count_host_reads() -> Iterator[HostReads]:
    """Patch the reading methods of torch.Tensor for the block; yields the :class:`HostReads` it fills."""
    reads = HostReads()
    resolved: dict[str, str] = {}
    originals = {name: getattr(torch.Tensor, name) for name in READERS + ("to", "cpu")}

    def record(name: str) -> None:
        caller = sys._getframe(2)
        name = caller.f_code.co_filename
        path = resolved.get(name) or resolved.setdefault(name, os.path.realpath(name))  # ComfyUI: via a symlink
        if path.startswith(OWN_CODE):
            reads.sites[f"{os.path.relpath(path, REPO_ROOT)}:{caller.f_lineno} ({name})"] += 1

    def wrap(name: str):
        original = originals[name]

        def reader(self, *args, **kwargs):
            record(name)
            return original(self, *args, **kwargs)
        return reader

    # copies to the host only count from another device (on a CPU run they are no-ops)
    def to(self, *args, **kwargs):
        if self.device.type != "cpu" and _is_cpu_target(args, kwargs):
            record("to cpu")
        return originals["to"](self, *args, **kwargs)

    def cpu(self, *args, **kwargs):
        if self.device.type != "cpu":
            record("cpu")
        return originals["cpu"](self, *args, **kwargs)

    try:
        for name in READERS:
            setattr(torch.Tensor, name, wrap(name))
        torch.Tensor.to = to
        torch.Tensor.cpu = cpu
        yield reads
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
