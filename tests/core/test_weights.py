"""core.weights.read_state_dict: the one weight-file reader (safetensors, or torch pickles read weights-only)."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from core.errors import IncompatibleWeightsError, WeightsNotFoundError
from core.weights import read_state_dict

WHAT = "test weight file"


def tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "layer.weight": torch.randn(6, 5, generator=gen),
        "layer.bias": torch.randn(6, generator=gen).to(torch.float16),
        "norm.num_batches_tracked": torch.tensor(7),
    }


def assert_same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(expected)
    for k, v in expected.items():
        assert got[k].dtype == v.dtype and got[k].device.type == "cpu", k
        assert torch.equal(got[k], v), k


@pytest.mark.parametrize("suffix", [".safetensors", ".sft", ".SafeTensors"])
def test_safetensors_files(tmp_path, suffix):
    path = tmp_path / f"w{suffix}"
    save_file(tensors(), str(path))
    assert_same(read_state_dict(path, what=WHAT), tensors())


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".ckpt", ".bin", ".pkl"])
def test_pickles_are_read_weights_only(tmp_path, monkeypatch, suffix):
    path = tmp_path / f"w{suffix}"
    torch.save(tensors(), path)
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    assert_same(read_state_dict(str(path), what=WHAT), tensors())
    assert calls == [True]


@pytest.mark.parametrize("wrapper", ["state_dict", "model_state_dict"])
def test_training_checkpoints_are_unwrapped(tmp_path, wrapper):
    path = tmp_path / "trained.ckpt"
    torch.save({wrapper: tensors(), "global_step": 470000, "epoch": 3, "note": "trained"}, path)
    assert_same(read_state_dict(path, what=WHAT), tensors())


def test_read_under_inference_mode_gives_normal_tensors(tmp_path):
    st, pt = tmp_path / "w.safetensors", tmp_path / "w.pt"
    save_file(tensors(), str(st))
    torch.save(tensors(), pt)
    with torch.inference_mode():
        loaded = [read_state_dict(st, what=WHAT), read_state_dict(pt, what=WHAT)]
    assert not any(v.is_inference() for sd in loaded for v in sd.values())


def test_missing_file(tmp_path):
    path = tmp_path / "models" / "model_ir_se50.pth"
    with pytest.raises(WeightsNotFoundError, match="test weight file") as info:
        read_state_dict(path, what=WHAT)
    assert isinstance(info.value, FileNotFoundError)
    assert str(path) in str(info.value)
    with pytest.raises(WeightsNotFoundError):
        read_state_dict(tmp_path, what=WHAT)  # a folder is not a weight file


@pytest.mark.parametrize("name", ["weights.onnx", "weights.pt2", "weights"])
def test_unsupported_file_types_are_refused(tmp_path, name):
    path = tmp_path / name
    torch.save(tensors(), path)
    with pytest.raises(IncompatibleWeightsError, match="unsupported file type") as info:
        read_state_dict(path, what=WHAT)
    assert str(path) in str(info.value)


UNPICKLED = []


def _record_unpickling():
    UNPICKLED.append(True)
    return 0


class Payload:
    """An object whose unpickling would run code: a weights_only load must refuse it."""

    def __reduce__(self):
        return (_record_unpickling, ())


def test_pickled_objects_are_refused_without_running_them(tmp_path):
    plain = tmp_path / "evil.pt"
    with open(plain, "wb") as fh:
        pickle.dump({"layer.weight": Payload()}, fh, protocol=2)
    mixed = tmp_path / "evil2.pt"
    torch.save({"layer.weight": torch.zeros(2), "extra": Payload()}, mixed)
    for path in (plain, mixed):
        with pytest.raises(IncompatibleWeightsError, match="not a plain state dict") as info:
            read_state_dict(path, what=WHAT)
        message = str(info.value)
        assert str(path) in message and "refused for safety" in message
        assert "weights_only=False" not in message  # torch's advice to load unsafely is not passed on
    assert UNPICKLED == []


@pytest.mark.parametrize("content, match", [
    ({"layer.weight": 3.0}, r"\['layer.weight'\] are not tensors"),
    ({"layer.weight": torch.zeros(2), "step": 5}, r"\['step'\] are not tensors"),
    ({"state_dict": {"layer.weight": torch.zeros(2), "ema": {"w": torch.zeros(2)}}}, r"\['ema'\] are not tensors"),
    ({0: torch.zeros(2)}, "not strings"),
    ([torch.zeros(2)], "holds a list"),
    (torch.zeros(2), "holds a Tensor"),
    ({}, "holds no tensors"),
])
def test_content_that_is_not_a_state_dict_is_refused(tmp_path, content, match):
    path = tmp_path / "odd.pt"
    torch.save(content, path)
    with pytest.raises(IncompatibleWeightsError, match=match) as info:
        read_state_dict(path, what=WHAT)
    assert str(path) in str(info.value)


def _cut_points(size: int) -> list[int]:
    return sorted({0, 1, 7, 8, 20, size // 3, size // 2, size - 1})


@pytest.mark.parametrize("kind", ["safetensors", "zip pickle", "legacy pickle"])
def test_truncated_files(tmp_path, kind):
    full = tmp_path / ("full.safetensors" if kind == "safetensors" else "full.pt")
    if kind == "safetensors":
        save_file(tensors(), str(full))
    else:
        torch.save(tensors(), full, _use_new_zipfile_serialization=kind == "zip pickle")
    data = full.read_bytes()
    for cut in _cut_points(len(data)):
        path = tmp_path / f"cut{cut}{full.suffix}"
        path.write_bytes(data[:cut])
        with pytest.raises(IncompatibleWeightsError) as info:
            read_state_dict(path, what=WHAT)
        message = str(info.value)
        assert str(path) in message and WHAT in message, cut
        assert ("safetensors file" if kind == "safetensors" else "PyTorch checkpoint") in message, cut
        if cut >= 20:  # a few bytes are too little to tell a truncated checkpoint from another file
            assert "damaged or truncated" in message, cut


def test_garbage_files(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a weight file")
    with pytest.raises(IncompatibleWeightsError, match="is not a safetensors file"):
        read_state_dict(junk, what=WHAT)
    junk_pt = tmp_path / "junk.pth"
    junk_pt.write_bytes(b"\x00\x01garbage")
    with pytest.raises(IncompatibleWeightsError, match="junk.pth"):
        read_state_dict(junk_pt, what=WHAT)


# ------------------------------------------------------------------------------------------ legacy .ckpt files
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy-format"])
def test_lightning_checkpoints_of_the_original_releases_are_read(tmp_path, zip_format):
    """The original SD 1.x .ckpt layout: weights under state_dict next to Lightning's callback state (its class as a
    dict key, a numpy 1.x float64 score), optimizer and scheduler states. The weights come back; nothing else."""
    from tests.support.model_families import write_lightning_ckpt

    path = write_lightning_ckpt(tmp_path / "sd-v1-4.ckpt", tensors(), zip_format=zip_format)
    raw = path.read_bytes()
    assert b"pytorch_lightning.callbacks.model_checkpoint" in raw and b"numpy.core.multiarray" in raw
    assert_same(read_state_dict(path, what=WHAT), tensors())


def test_the_legacy_globals_build_numbers_only():
    from core.weights import LEGACY_CHECKPOINT_GLOBALS, LightningCallbackState

    names = {name for _, name in LEGACY_CHECKPOINT_GLOBALS}
    assert "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint" in names
    assert not [name for name in names if name.startswith(("builtins", "os", "posix", "subprocess", "torch"))]
    scalar = dict((name, obj) for obj, name in LEGACY_CHECKPOINT_GLOBALS)["numpy.core.multiarray.scalar"]
    assert scalar(np.dtype("f8"), np.float64(0.25).tobytes()) == 0.25
    with pytest.raises(pickle.UnpicklingError):
        scalar(np.dtype("O"), b"\x00" * 8)  # an object "scalar" is an arbitrary Python object
    dtype = dict((name, obj) for obj, name in LEGACY_CHECKPOINT_GLOBALS)["numpy.dtype"]
    for spec in ("O", "U8", "V16"):
        with pytest.raises(pickle.UnpicklingError):
            dtype(spec, False, True)
    assert LightningCallbackState().__dict__ == {}


@pytest.mark.parametrize("how", ["os.system", "eval"])
def test_code_in_a_checkpoint_never_runs(tmp_path, how):
    from tests.support.model_families import write_malicious_ckpt

    marker = tmp_path / "the-payload-ran"
    path = write_malicious_ckpt(tmp_path / "evil.ckpt", marker, how)
    assert how.split(".")[-1].encode() in path.read_bytes()  # the payload is in the file
    with pytest.raises(IncompatibleWeightsError, match="refused for safety") as info:
        read_state_dict(path, what=WHAT)
    assert not marker.exists()
    assert "weights_only=False" not in str(info.value)


@pytest.mark.parametrize("change, words", [
    (lambda data: data[:-10], ["is a damaged or truncated safetensors file", "the file is truncated"]),
    (lambda data: data[: len(data) // 2], ["damaged or truncated", "the file is truncated"]),
    (lambda data: data[:30], ["damaged or truncated", "inside its", "header"]),
    (lambda data: data + b"\x00" * 17, ["is a damaged or truncated safetensors file", "17 extra bytes"]),
    (lambda data: data + data, ["damaged or truncated", "extra bytes"]),
    (lambda data: b"<!DOCTYPE html><html>Not Found</html>", ["is not a safetensors file"]),
])
def test_damaged_safetensors_say_what_is_wrong(tmp_path, change, words):
    full = tmp_path / "full.safetensors"
    save_file(tensors(), str(full))
    path = tmp_path / "damaged.safetensors"
    path.write_bytes(change(full.read_bytes()))
    with pytest.raises(IncompatibleWeightsError) as info:
        read_state_dict(path, what="SD1.x checkpoint")
    message = str(info.value)
    assert f"The SD1.x checkpoint '{path}'" in message
    for word in words:
        assert word in message
    assert "SafetensorError" not in message and "incomplete metadata" not in message


@pytest.mark.parametrize("name", ["w.safetensors", "w.sft", "w.pt", "legacy.ckpt"])
def test_tensor_shapes_without_reading_the_data(tmp_path, name, monkeypatch):
    from core.weights import read_tensor_shapes

    path = tmp_path / name
    if path.suffix in (".safetensors", ".sft"):
        save_file(tensors(), str(path))
        import safetensors.torch

        # the header is enough: the tensor loader is never called
        monkeypatch.setattr(safetensors.torch, "load_file", lambda *a, **k: pytest.fail("tensor data was read"))
    elif name == "legacy.ckpt":
        from tests.support.model_families import write_lightning_ckpt

        write_lightning_ckpt(path, tensors(), zip_format=False)
    else:
        torch.save(tensors(), path)
    assert read_tensor_shapes(path, what=WHAT) == {k: tuple(v.shape) for k, v in tensors().items()}


def test_tensor_shapes_apply_the_same_refusals(tmp_path):
    from core.weights import read_tensor_shapes
    from tests.support.model_families import write_malicious_ckpt

    full = tmp_path / "full.safetensors"
    save_file(tensors(), str(full))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(full.read_bytes()[:-3])
    with pytest.raises(IncompatibleWeightsError, match="damaged or truncated safetensors file"):
        read_tensor_shapes(cut, what=WHAT)
    marker = tmp_path / "ran"
    with pytest.raises(IncompatibleWeightsError, match="refused for safety"):
        read_tensor_shapes(write_malicious_ckpt(tmp_path / "evil.ckpt", marker, "os.system"), what=WHAT)
    assert not marker.exists()
    with pytest.raises(WeightsNotFoundError):
        read_tensor_shapes(tmp_path / "missing.safetensors", what=WHAT)
    with pytest.raises(IncompatibleWeightsError, match="unsupported file type"):
        read_tensor_shapes(full.rename(tmp_path / "w.onnx"), what=WHAT)
