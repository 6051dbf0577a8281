"""Face-recognition networks used by the identity energies, and the differentiable face crops feeding them.

Two recognizers:

* ArcFace IR-SE50 (anonymize preset): an in-house module whose state-dict names and shapes equal the public
  ``model_ir_se50.pth`` checkpoint (the IR-SE50 ``Backbone`` of TreB1eN/InsightFace_Pytorch used by pSp), so
  that file loads with ``strict=True``. Input [B,3,112,112] in [−1,1].
* FaceNet InceptionResnetV1 (VIH preset) from facenet-pytorch, loaded from the local
  ``20180402-114759-vggface2.pt`` file. Input [B,3,160,160] in [−1,1] (``fixed_image_standardization`` range).

Both give L2-normalised float32 embeddings [B,512]. Weights are read from local files only, through
:func:`core.weights.read_state_dict`; nothing is ever downloaded.

Crops take images [B,3,H,W] in [−1,1] and are differentiable w.r.t. the image:

* ``ffhq_identity_crop``: the official pSp/Diff-Privacy ID-loss crop for FFHQ-aligned faces,
* ``whole_image_crop``: the official VIH input (the whole image resized),
* ``box_crop``: a fixed pixel box (found once by a detector on the source) sampled bilinearly.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .autograd import normal_tensors
from .errors import IncompatibleWeightsError
from .weights import read_state_dict

EMBEDDING_DIM = 512
ARCFACE_NAME = "arcface_ir_se50"
FACENET_NAME = "facenet_vggface2"
ARCFACE_INPUT_SIZE = 112
FACENET_INPUT_SIZE = 160

#: (depth, number of units) of the four IR-SE50 stages; the first unit of each stage has stride 2.
IRSE50_STAGES: tuple[tuple[int, int], ...] = ((64, 3), (128, 4), (256, 14), (512, 3))
IRSE_STEM_CHANNELS = 64
SE_REDUCTION = 16
#: Spatial size of the last IR-SE50 feature map for 112×112 input (four stride-2 stages: 112 / 16).
IRSE50_FINAL_GRID = 7

FFHQ_ID_RESIZE = 256
#: Rows 35:223 and columns 32:220 of the 256×256 image: the pSp ID-loss crop for FFHQ-aligned faces.
FFHQ_ID_ROWS = (35, 223)
FFHQ_ID_COLS = (32, 220)
RESIZE_MODES = ("nearest", "bilinear", "area")
CROP_MODES = ("ffhq", "whole", "box")


# ---------------------------------------------------------------------------------------------------------
# ArcFace IR-SE50
# ---------------------------------------------------------------------------------------------------------

def irse50_units(stages: Sequence[tuple[int, int]] = IRSE50_STAGES) -> list[tuple[int, int, int]]:
    """(in_channels, depth, stride) of every IR-SE unit, in ``body`` order (24 units for IR-SE50)."""
    units = []
    in_channels = IRSE_STEM_CHANNELS
    for depth, num_units in stages:
        for i in range(num_units):
            units.append((in_channels if i == 0 else depth, depth, 2 if i == 0 else 1))
        in_channels = depth
    return units


class SqueezeExcite(nn.Module):
    """Channel gate x · σ(fc2(relu(fc1(avgpool(x))))) with bias-free 1×1 convs (reduction 16)."""

    def __init__(self, channels: int, reduction: int = SE_REDUCTION):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, kernel_size=1, bias=False)
        self.fc2 = nn.Conv2d(channels // reduction, channels, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = x.mean(dim=(2, 3), keepdim=True)
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(gate))))
        return x * gate


class IRSEUnit(nn.Module):
    """Improved-residual unit with squeeze-excitation: res_layer(x) + shortcut_layer(x).

    The residual branch is BN → conv3×3 → PReLU → conv3×3 (stride) → BN → SE. The shortcut is a 1×1 conv + BN
    when the channel count changes, else a parameter-free ``MaxPool2d(1, stride)`` (plain subsampling).
    """

    def __init__(self, in_channels: int, depth: int, stride: int):
        super().__init__()
        if in_channels == depth:
            self.shortcut_layer = nn.MaxPool2d(kernel_size=1, stride=stride)
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(in_channels, depth, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(depth),
            )
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, depth, kernel_size=3, stride=1, padding=1, bias=False),
            nn.PReLU(depth),
            nn.Conv2d(depth, depth, kernel_size=3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(depth),
            SqueezeExcite(depth),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class ArcFaceIRSE50(nn.Module):
    """ArcFace IR-SE50 embedding network, parameter-compatible with the public ``model_ir_se50.pth``.

    Input [B,3,112,112] in [−1,1]; output L2-normalised [B,512] in the input's dtype.
    """

    def __init__(self, drop_ratio: float = 0.4):
        super().__init__()
        self.input_layer = nn.Sequential(
            nn.Conv2d(3, IRSE_STEM_CHANNELS, kernel_size=3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(IRSE_STEM_CHANNELS),
            nn.PReLU(IRSE_STEM_CHANNELS),
        )
        self.body = nn.Sequential(*(IRSEUnit(c_in, depth, stride) for c_in, depth, stride in irse50_units()))
        final = IRSE50_STAGES[-1][0]
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(final),
            nn.Dropout(drop_ratio),
            nn.Flatten(),
            nn.Linear(final * IRSE50_FINAL_GRID ** 2, EMBEDDING_DIM),
            nn.BatchNorm1d(EMBEDDING_DIM, affine=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.output_layer(self.body(self.input_layer(x)))
        return F.normalize(features, p=2, dim=1)


# ---------------------------------------------------------------------------------------------------------
# FaceNet
# ---------------------------------------------------------------------------------------------------------

def build_facenet() -> nn.Module:
    """facenet-pytorch ``InceptionResnetV1`` without weights or classifier head, in eval mode.

    Imported lazily: ``facenet_pytorch`` pulls in torchvision. Never passes ``pretrained=`` (that downloads).
    """
    from facenet_pytorch import InceptionResnetV1

    with normal_tensors():
        return InceptionResnetV1(pretrained=None, classify=False).eval()


# ---------------------------------------------------------------------------------------------------------
# Wrapper
# ---------------------------------------------------------------------------------------------------------

class FaceRecognizer(nn.Module):
    """A frozen face-recognition network: faces [B,3,S,S] in [−1,1] → L2-normalised [B,512].

    Always in eval mode (``train()`` is ignored), so BatchNorm uses its running statistics and batch 1 works.
    Parameters never require grad, but the output is differentiable w.r.t. the input faces. The network
    computes in its parameter dtype (float32 unless ``compute_dtype`` is given); the embedding is returned
    and normalised in float32 (float64 when the network itself runs in float64). Moving or casting the
    module (``.to``, ``.cuda``, ``.half``) always creates normal tensors, even under
    ``torch.inference_mode()``, so gradients can be taken later.
    """

    def __init__(self, network: nn.Module, name: str, input_size: int, compute_dtype: torch.dtype | None = None):
        super().__init__()
        self.network = network
        self.name = name
        self.input_size = int(input_size)
        self.network.requires_grad_(False)
        if compute_dtype is not None:
            self.to(dtype=compute_dtype)
        self.train(False)

    def train(self, mode: bool = True) -> FaceRecognizer:
        return super().train(False)

    def _apply(self, fn, *args, **kwargs):
        with normal_tensors():
            return super()._apply(fn, *args, **kwargs)

    @property
    def compute_dtype(self) -> torch.dtype:
        return next(self.network.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        if faces.ndim != 4 or faces.shape[1] != 3 or faces.shape[2:] != (self.input_size, self.input_size):
            raise ValueError(
                f"{self.name} expects faces of shape [B,3,{self.input_size},{self.input_size}], "
                f"got {list(faces.shape)}; crop them with a FaceCrop of size {self.input_size}."
            )
        embedding = self.network(faces.to(device=self.device, dtype=self.compute_dtype))
        return F.normalize(embedding.to(torch.promote_types(embedding.dtype, torch.float32)), p=2, dim=1)


# ---------------------------------------------------------------------------------------------------------
# Loading weights from local files
# ---------------------------------------------------------------------------------------------------------

_ARCFACE_MARKERS = ("input_layer.0.weight", "body.0.res_layer.1.weight", "output_layer.3.weight")
_FACENET_MARKERS = ("conv2d_1a.conv.weight", "block8.conv2d.weight", "last_linear.weight")


def _strip_module_prefix(key: str) -> str:
    """Drop DataParallel ``module.`` prefixes (checkpoints saved from a wrapped network)."""
    while key.startswith("module."):
        key = key[len("module."):]
    return key


def detect_recognizer_kind(state_dict: Mapping[str, torch.Tensor]) -> str:
    """The recognizer kind ("arcface" or "facenet") a state dict belongs to, from its key names.

    Raises IncompatibleWeightsError when it is neither.
    """
    if all(k in state_dict for k in _ARCFACE_MARKERS):
        return "arcface"
    if all(k in state_dict for k in _FACENET_MARKERS):
        return "facenet"
    raise IncompatibleWeightsError(
        "The weight file is neither ArcFace IR-SE50 (model_ir_se50.pth) nor FaceNet InceptionResnetV1 "
        f"(20180402-114759-vggface2.pt); its first keys are {list(state_dict)[:5]}."
    )


def _check_compatible(network: nn.Module, state_dict: Mapping[str, torch.Tensor], name: str, path: Path) -> None:
    expected = network.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[:4]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:4]})")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches (e.g. {mismatched[:3]})")
        raise IncompatibleWeightsError(
            f"'{path.name}' does not match the {name} architecture: " + "; ".join(parts)
            + ". Choose the recognizer this file belongs to, or use the original checkpoint."
        )


def load_recognizer(
    path: str | Path,
    kind: str = "auto",
    *,
    device: torch.device | str | None = None,
    compute_dtype: torch.dtype | None = None,
) -> FaceRecognizer:
    """Build a FaceRecognizer from a local weight file, loaded with ``strict=True``.

    kind: "arcface" (``model_ir_se50.pth``), "facenet" (``20180402-114759-vggface2.pt``; its ``logits.*``
    classifier keys are dropped) or "auto" (detected from the key names). DataParallel ``module.`` prefixes
    are stripped. The modules are built under core.autograd.normal_tensors() so they hold normal tensors even
    when the caller runs in inference mode.

    Raises WeightsNotFoundError or IncompatibleWeightsError from :func:`core.weights.read_state_dict`, and
    IncompatibleWeightsError when the tensors do not fit the chosen architecture.
    """
    if kind not in ("auto", "arcface", "facenet"):
        raise ValueError(f"kind must be 'auto', 'arcface' or 'facenet', got {kind!r}")
    path = Path(path)
    raw = read_state_dict(path, what="face-recognition weight file")
    state_dict = {_strip_module_prefix(k): v for k, v in raw.items()}
    if kind == "auto":
        kind = detect_recognizer_kind(state_dict)
    with normal_tensors():
        if kind == "arcface":
            network, name, size = ArcFaceIRSE50(), ARCFACE_NAME, ARCFACE_INPUT_SIZE
        else:
            network, name, size = build_facenet(), FACENET_NAME, FACENET_INPUT_SIZE
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith("logits.")}
        # Checkpoints saved before PyTorch 0.4.1 have no BatchNorm step counters; they are unused in eval.
        for key, value in network.state_dict().items():
            if key.endswith("num_batches_tracked") and key not in state_dict:
                state_dict[key] = torch.zeros_like(value)
        _check_compatible(network, state_dict, name, path)
        network.load_state_dict(state_dict, strict=True)
        recognizer = FaceRecognizer(network.eval(), name, size, compute_dtype=compute_dtype)
        if device is not None:
            recognizer.to(device)
    return recognizer


# ---------------------------------------------------------------------------------------------------------
# Differentiable face crops (images [B,3,H,W] in [−1,1])
# ---------------------------------------------------------------------------------------------------------

def _check_images(images: torch.Tensor) -> None:
    if images.ndim != 4:
        raise ValueError(f"expected images [B,C,H,W], got shape {list(images.shape)}")


def _resize(images: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {mode!r}")
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    if mode == "bilinear":
        downscaling = images.shape[-2] > size[0] or images.shape[-1] > size[1]
        return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=downscaling)
    return F.interpolate(images, size=size, mode=mode)


def ffhq_identity_crop(
    images: torch.Tensor, size: int = ARCFACE_INPUT_SIZE, resize_mode: str = "nearest"
) -> torch.Tensor:
    """Official pSp / Diff-Privacy ID-loss crop for FFHQ-aligned faces → [B,C,size,size].

    Resize to 256×256 ("nearest" is what the official code does, "bilinear"/"area" give smoother
    gradients), keep rows 35:223 and columns 32:220 (188×188), adaptive-average-pool to ``size``.
    """
    _check_images(images)
    resized = _resize(images, (FFHQ_ID_RESIZE, FFHQ_ID_RESIZE), resize_mode)
    cropped = resized[:, :, FFHQ_ID_ROWS[0]:FFHQ_ID_ROWS[1], FFHQ_ID_COLS[0]:FFHQ_ID_COLS[1]]
    return F.adaptive_avg_pool2d(cropped, (size, size))


def whole_image_crop(
    images: torch.Tensor, size: int = FACENET_INPUT_SIZE, resize_mode: str = "nearest"
) -> torch.Tensor:
    """Official VIH input: the whole image resized to [B,C,size,size] (official mode: "nearest")."""
    _check_images(images)
    return _resize(images, (size, size), resize_mode)


def _box_tensor(box, batch: int) -> torch.Tensor:
    boxes = torch.as_tensor(box, dtype=torch.float64).reshape(-1, 4)
    if boxes.shape[0] == 1:
        boxes = boxes.expand(batch, 4)
    if boxes.shape[0] != batch:
        raise ValueError(f"expected one box or {batch} boxes, got {boxes.shape[0]}")
    if not torch.isfinite(boxes).all() or ((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])).any():
        raise ValueError(f"boxes must be finite with x1 > x0 and y1 > y0, got {boxes.tolist()}")
    return boxes


def expand_box(boxes: torch.Tensor, margin: float) -> torch.Tensor:
    """Grow boxes [N,4] (x0,y0,x1,y1) by ``margin`` × their width/height on every side."""
    grow = torch.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], dim=1) * margin
    return boxes + torch.cat([-grow, grow], dim=1)


def box_to_theta(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Affine ``theta`` [N,2,3] for ``F.affine_grid(align_corners=False)`` that maps the output square onto
    each box. Boxes are in continuous pixel coordinates (pixel i spans [i, i+1))."""
    x0, y0, x1, y1 = boxes.unbind(dim=1)
    zeros = torch.zeros_like(x0)
    row_x = torch.stack([(x1 - x0) / width, zeros, (x0 + x1) / width - 1.0], dim=1)
    row_y = torch.stack([zeros, (y1 - y0) / height, (y0 + y1) / height - 1.0], dim=1)
    return torch.stack([row_x, row_y], dim=1)


def _average_downsample(images: torch.Tensor, factor: int) -> torch.Tensor:
    """k×k box-filter downsampling; pooled pixel j covers source pixels [jk, (j+1)k), so coordinates scale
    exactly by 1/k (the last < k rows/columns are dropped)."""
    h, w = images.shape[-2] // factor * factor, images.shape[-1] // factor * factor
    return F.avg_pool2d(images[..., :h, :w], kernel_size=factor)


def box_crop(
    images: torch.Tensor,
    box,
    size: int,
    margin: float = 0.0,
    antialias: bool = True,
) -> torch.Tensor:
    """Bilinear crop of a fixed pixel box → [B,C,size,size], differentiable w.r.t. ``images``.

    box: (x0, y0, x1, y1) in the image's own pixel coordinates (floats; pixel i spans [i, i+1)), one box for
    the whole batch or one per image ([B,4]). ``margin`` grows the box by that fraction of its width/height
    on each side. The box is stretched to a square (detector boxes are nearly square). With ``antialias``,
    boxes more than twice the output size are first box-filtered by an integer factor so that every pixel
    contributes to the crop (and its gradient). Samples outside the image reflect at the border.
    """
    _check_images(images)
    batch, _, height, width = images.shape
    if isinstance(box, tuple) and all(isinstance(v, (int, float)) for v in box):
        # one fixed box (the "detect" crop, every guided step): the plan is made once per shape and device
        factor, theta = _fixed_box_plan(box, batch, height, width, size, float(margin), antialias,
                                        images.device, images.dtype)
    else:
        factor, theta = _box_plan(box, batch, height, width, size, margin, antialias, images.device, images.dtype)
    if factor > 1:
        images = _average_downsample(images, factor)
    grid = F.affine_grid(theta, [batch, images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _box_plan(box, batch: int, height: int, width: int, size: int, margin: float, antialias: bool,
              device: torch.device, dtype: torch.dtype) -> tuple[int, torch.Tensor]:
    """(box-filter factor, affine theta [B,2,3] on ``device``) of :func:`box_crop`, computed on the host."""
    boxes = expand_box(_box_tensor(box, batch), margin)
    factor = 1
    if antialias:
        side = float(torch.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]).min())
        factor = max(1, int(side // size))
        if factor > 1:
            boxes = boxes / factor
            height, width = height // factor, width // factor
    return factor, box_to_theta(boxes, height, width).to(device=device, dtype=dtype)


@functools.lru_cache(maxsize=64)
def _fixed_box_plan(box: tuple, batch: int, height: int, width: int, size: int, margin: float, antialias: bool,
                    device: torch.device, dtype: torch.dtype) -> tuple[int, torch.Tensor]:
    with normal_tensors():  # reused across calls, also outside inference mode
        return _box_plan(box, batch, height, width, size, margin, antialias, device, dtype)


@dataclass(frozen=True)
class FaceCrop:
    """How a recognizer sees an image: mode "ffhq" (official ArcFace crop), "whole" (official VIH) or "box"
    (a fixed detector box, reused for every generated image). Callable: images [B,3,H,W] → [B,3,size,size]."""

    mode: str = "ffhq"
    size: int = ARCFACE_INPUT_SIZE
    resize_mode: str = "nearest"
    box: tuple[float, float, float, float] | None = None
    margin: float = 0.0

    def __post_init__(self):
        if self.mode not in CROP_MODES:
            raise ValueError(f"crop mode must be one of {CROP_MODES}, got {self.mode!r}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if self.mode == "box" and self.box is None:
            raise ValueError("crop mode 'box' needs a box (x0, y0, x1, y1) in source pixel coordinates")
        if self.size < 1:
            raise ValueError(f"crop size must be positive, got {self.size}")

    @classmethod
    def official(cls, recognizer: FaceRecognizer | str) -> FaceCrop:
        """The crop the released code uses with this recognizer (ArcFace: FFHQ 112, FaceNet: whole 160)."""
        name = recognizer if isinstance(recognizer, str) else recognizer.name
        if name == ARCFACE_NAME:
            return cls("ffhq", ARCFACE_INPUT_SIZE)
        if name == FACENET_NAME:
            return cls("whole", FACENET_INPUT_SIZE)
        raise ValueError(f"no official crop for recognizer {name!r}")

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.mode == "ffhq":
            return ffhq_identity_crop(images, self.size, self.resize_mode)
        if self.mode == "whole":
            return whole_image_crop(images, self.size, self.resize_mode)
        return box_crop(images, self.box, self.size, margin=self.margin)


@dataclass(frozen=True)
class FaceCrops:
    """One :class:`FaceCrop` per source face, for a sample-major batch of several faces' samples (sample b of
    face i at row b·N + i, N = len(crops)): row k is cropped with crops[k % N]. Needed where the crop depends
    on the face (mode "box": each face's own detector box). Callable: images [N·B,3,H,W] → [N·B,3,S,S]; every
    crop must have the same output size S.

    Raises:
        ValueError: no crops, crops of different sizes (when constructed), or a batch that is not a multiple
            of N (when called).
    """

    crops: tuple[FaceCrop, ...]

    def __post_init__(self):
        object.__setattr__(self, "crops", tuple(self.crops))
        if not self.crops:
            raise ValueError("FaceCrops needs at least one crop")
        if len({c.size for c in self.crops}) != 1:
            raise ValueError(f"every face's crop must have the same size, got {[c.size for c in self.crops]}")

    @property
    def size(self) -> int:
        return self.crops[0].size

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        n = len(self.crops)
        if images.shape[0] % n:
            raise ValueError(f"a batch of {images.shape[0]} images cannot hold the same number of samples of "
                             f"{n} faces")
        parts = [crop(images[i::n]) for i, crop in enumerate(self.crops)]
        return torch.stack(parts, dim=1).reshape(-1, *parts[0].shape[1:])  # [B,N,...] → row b·N + i


def reference_embedding(recognizer: FaceRecognizer, crop: FaceCrop, image: torch.Tensor) -> torch.Tensor:
    """Identity embedding of a reference image [3,H,W] or [B,3,H,W] in [−1,1] → float32 [1,512], no grad.

    Several images (B > 1, e.g. photos of one person) give the re-normalised mean of their embeddings.
    Computed outside inference mode, so the result is a normal tensor usable in a later backward pass.
    """
    if image.ndim == 3:
        image = image.unsqueeze(0)
    with normal_tensors(grad=False):
        embeddings = recognizer(crop(image.to(recognizer.device)))
        return F.normalize(embeddings.mean(dim=0, keepdim=True), p=2, dim=1)


def face_embeddings(recognizer: FaceRecognizer, crop: FaceCrop, images: torch.Tensor) -> torch.Tensor:
    """Identity embedding of each of N faces [N,3,H,W] in [−1,1] → float32 [N,512], L2-normalised, no grad, in
    one recognizer call (row i is :func:`reference_embedding` of image i alone). Computed outside inference
    mode, like :func:`reference_embedding`."""
    if images.ndim != 4:
        raise ValueError(f"face images must be [N,3,H,W], got {tuple(images.shape)}")
    with normal_tensors(grad=False):
        return F.normalize(recognizer(crop(images.to(recognizer.device))).float(), p=2, dim=1)
