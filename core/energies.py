"""Identity energies, guidance step sizes and the guidance gradient of Diff-Privacy (docs/method.md §4, §8.4).

Embeddings are face-recognition feature vectors f [B, D] (D = 512 for ArcFace/FaceNet) and a source
reference f_src [1, D] or [D] — or, for a batch holding the samples of several faces, one row per face
[faces, D] with the batch in sample-major order (sample b of face i at row b·faces + i). The energies
normalise their inputs themselves, so they are correct (values *and* gradients) for embeddings that are not
unit-norm; callers need not normalise first.

Energies are computed in at least float32 (float64 inputs stay float64 so finite-difference checks work).
The guidance gradient is taken w.r.t. the clean-latent estimate x̂₀ (official, "x0") or w.r.t. the noisy
latent through the denoiser ("xt"); the sampler (core/sampling.py) applies it.

The gradients work when the caller runs under ``torch.inference_mode()`` (ComfyUI): they use the helpers of
core/autograd.py, which explains why they are needed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .autograd import explain_inference_error, normal_tensors, prepare_for_autograd
from .diffusion import STAGE_WIDTH, seeded_noise

MODES = ("anonymize", "hide")
TARGETS = ("x0", "xt")
_PREPARE_HINT = ("list the modules behind `decode` (and behind the denoiser for target 'xt') in "
                 "IdentityGuidance.autograd_modules so their weights are cloned for autograd")


# ------------------------------------------------------------------------------------------ energies
def _loss_dtype(t: torch.Tensor) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs, float64 for float64 (losses never run in half precision)."""
    return torch.promote_types(t.dtype, torch.float32)


def _check_faces(faces: int) -> int:
    if isinstance(faces, bool) or int(faces) != faces or faces < 1:
        raise ValueError(f"faces must be an integer ≥ 1, got {faces!r}")
    return int(faces)


def _as_reference(f_src: torch.Tensor, f: torch.Tensor, faces: int = 1) -> torch.Tensor:
    """Reference embeddings on f's device in f's dtype, checked against f [B, D].

    One face (``faces`` = 1): f_src [1, D] or [D] → [1, D], the reference of every sample. Several faces:
    f_src [faces, D] → [B, D] with row k = f_src[k % faces], for a sample-major batch (sample b of face i at
    row b·faces + i, the order in which ComfyUI tiles a conditioning of batch ``faces`` over the latent
    batch); B must be a multiple of ``faces``.
    """
    faces = _check_faces(faces)
    if f.dim() != 2:
        raise ValueError(f"embeddings must have shape [B, D], got {tuple(f.shape)}")
    ref = f_src.reshape(1, -1) if f_src.dim() == 1 else f_src
    if ref.dim() != 2 or ref.shape[0] != faces or ref.shape[1] != f.shape[1]:
        expected = f"[1, {f.shape[1]}] or [{f.shape[1]}]" if faces == 1 else f"[{faces}, {f.shape[1]}]"
        raise ValueError(
            f"source embedding must have shape {expected} for {faces} face(s), got {tuple(f_src.shape)}; "
            "compute it with the same face recognizer as the guidance"
        )
    if f.shape[0] % faces:
        raise ValueError(f"a batch of {f.shape[0]} samples cannot hold the same number of samples of each of "
                         f"{faces} faces")
    ref = ref.to(device=f.device, dtype=f.dtype)
    return ref if faces == 1 else ref.repeat(f.shape[0] // faces, 1)


def cosine_to_source(f: torch.Tensor, f_src: torch.Tensor, faces: int = 1) -> torch.Tensor:
    """cos(f_k, source of sample k) for embeddings f [B, D] → [B] in [−1, 1] (≥ float32).

    ``f_src`` is [1, D] or [D] for one face, or [faces, D] for a sample-major batch of several faces (sample k
    belongs to face k % faces; see :func:`_as_reference`).
    """
    f = f.to(_loss_dtype(f))
    ref = _as_reference(f_src, f, faces)
    return (F.normalize(f, dim=-1) * F.normalize(ref, dim=-1)).sum(dim=-1)


def pairwise_cosines(f: torch.Tensor) -> torch.Tensor:
    """Gram matrix of cosines cos(f_i, f_j) for f [B, D] → [B, B] (≥ float32)."""
    u = F.normalize(f.to(_loss_dtype(f)), dim=-1)
    return u @ u.transpose(0, 1)


def same_face_pairs(batch: int, faces: int = 1, device=None) -> torch.Tensor:
    """[B, B] bool: True where samples k and l of a sample-major batch belong to the same face (k ≡ l mod faces)."""
    k = torch.arange(batch, device=device)
    return (k[:, None] % faces) == (k[None, :] % faces)


def anonymization_energy(f: torch.Tensor, f_src: torch.Tensor, diversity_weight: float = 1.0,
                         faces: int = 1) -> torch.Tensor:
    """E_anon = Σ_k relu(cos(f_k, f_src)) + λ_div·Σ_{k<l} relu(cos(f_k, f_l)) → scalar ≥ 0.

    The first sum pushes every sample away from the source identity; the hinge stops at orthogonality.
    The second (official λ_div = 1) pushes the B samples of one run apart. With several ``faces`` (f_src
    [faces, D], a sample-major batch) each sample is pushed away from its own face and only the samples of the
    same face are pushed apart, so the energy is the sum of the faces' own energies.
    """
    faces = _check_faces(faces)
    energy = cosine_to_source(f, f_src, faces).relu().sum()
    if diversity_weight != 0.0 and f.shape[0] > 1:
        # strict upper triangle: each unordered pair once; the zeroed entries contribute relu(0) = 0
        gram = pairwise_cosines(f).triu(diagonal=1)
        if faces > 1:
            gram = gram * same_face_pairs(f.shape[0], faces, f.device)
        energy = energy + diversity_weight * gram.relu().sum()
    return energy


def hiding_energy(f: torch.Tensor, f_src: torch.Tensor, faces: int = 1) -> torch.Tensor:
    """E_hide = Σ_k (1 − cos(f_k, f_src)) → scalar in [0, 2B]; pulls every sample toward the source identity
    (its own face's with several ``faces``, see :func:`cosine_to_source`)."""
    return (1.0 - cosine_to_source(f, f_src, faces)).sum()


# ---------------------------------------------------------------------------------------- step sizes
@dataclass(frozen=True)
class StepSizeSchedule:
    """Piecewise-constant guidance step size ρ(t) over integer DDPM timesteps.

    ``steps`` holds (t_threshold, ρ) pairs meaning "ρ for t > t_threshold"; they are kept sorted by threshold,
    highest first, and the first match wins. ``default`` applies where no threshold is exceeded.
    """

    steps: tuple[tuple[int, float], ...] = ()
    default: float = 1.0

    def __post_init__(self):
        pairs = tuple(sorted(((int(t), float(r)) for t, r in self.steps), key=lambda p: -p[0]))
        for _, rho in pairs + ((0, float(self.default)),):
            if not math.isfinite(rho) or rho < 0.0:
                raise ValueError(f"guidance step sizes must be finite and ≥ 0, got {rho}")
        object.__setattr__(self, "steps", pairs)
        object.__setattr__(self, "default", float(self.default))

    @classmethod
    def preset(cls, task: str) -> "StepSizeSchedule":
        """Official ρ(t): ``anonymize`` 1.0 at every step; ``hide`` 1.5 for t > 600 and 2.5 for t ≤ 600."""
        if task == "anonymize":
            return cls((), 1.0)
        if task == "hide":
            return cls(((600, 1.5),), 2.5)
        raise ValueError(f"unknown guidance task {task!r}; expected one of {list(MODES)}")

    @classmethod
    def constant(cls, rho: float) -> "StepSizeSchedule":
        """ρ(t) = rho everywhere (0 turns guidance off)."""
        return cls((), rho)

    def scaled(self, factor: float) -> "StepSizeSchedule":
        """The same schedule with every ρ multiplied by ``factor``."""
        return StepSizeSchedule(tuple((t, r * factor) for t, r in self.steps), self.default * factor)

    def __call__(self, t: int) -> float:
        for threshold, rho in self.steps:
            if t > threshold:
                return rho
        return self.default


def straight_through_clamp(image: torch.Tensor, low: float = -1.0, high: float = 1.0) -> torch.Tensor:
    """Clamp in the forward pass, identity in the backward pass (gradient flows where the clamp saturates)."""
    return image + (image.clamp(low, high) - image).detach()


def _module_dtype(module: nn.Module) -> torch.dtype | None:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


# -------------------------------------------------------------------------------------- the guidance
@dataclass(eq=False)
class IdentityGuidance:
    """Identity-energy guidance of a DDIM sampler.

    ``decode``: scaled latent [B,4,h,w] → image [B,3,H,W] ≈ [−1,1], differentiable, not clamped.
    ``recognizer``: face crop [B,3,S,S] → embedding [B,D]. ``crop``: image [B,3,H,W] → [B,3,S,S]
    (official ArcFace crop: nearest resize + fixed box; smoother resizes give smoother gradients).
    ``source_embedding``: f_src [1,D] or [D] from the same recognizer and crop; [faces,D] for several faces.
    ``faces``: how many source faces one batch holds (≥ 1). With several, the batch is sample-major: sample b
    of face i is row b·faces + i (how ComfyUI tiles a conditioning of batch ``faces`` over the latent batch), each
    sample is guided toward/away from its own face's embedding, and diversity acts within a face's samples only.
    ``target``: "x0" (official) differentiates w.r.t. x̂₀ through decoder and recognizer only; "xt" also
    through the denoiser (see :meth:`gradient_through`).
    ``clamp_decoded``: straight-through clamp of the decoded image to [−1,1] (official: off).
    ``max_grad_norm``: per-sample L2 clip of the gradient (official: none).
    ``decode_dtype``: cast x̂₀ to this dtype before decoding (None: as given); the energy stays ≥ float32.
    ``autograd_modules``: modules behind ``decode`` (and the denoiser, for "xt") whose inference-mode weights
    must be swapped for normal clones before differentiating; the recognizer is always included.
    """

    decode: Callable[[torch.Tensor], torch.Tensor]
    recognizer: nn.Module
    crop: Callable[[torch.Tensor], torch.Tensor]
    source_embedding: torch.Tensor
    mode: str = "anonymize"
    diversity_weight: float = 1.0
    step_size: StepSizeSchedule | None = None
    target: str = "x0"
    clamp_decoded: bool = False
    max_grad_norm: float | None = None
    decode_dtype: torch.dtype | None = None
    autograd_modules: tuple[nn.Module, ...] = ()
    faces: int = 1
    _references: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"guidance mode must be one of {list(MODES)}, got {self.mode!r}")
        if self.target not in TARGETS:
            raise ValueError(f"guidance target must be one of {list(TARGETS)}, got {self.target!r}")
        if self.step_size is None:
            self.step_size = StepSizeSchedule.preset(self.mode)
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm}")
        self.faces = _check_faces(self.faces)
        emb = self.source_embedding
        if (not isinstance(emb, torch.Tensor) or emb.dim() not in (1, 2) or (emb.dim() == 1 and self.faces != 1)
                or (emb.dim() == 2 and emb.shape[0] != self.faces)):
            shape = tuple(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__
            expected = "[1, D] or [D]" if self.faces == 1 else f"[{self.faces}, D]"
            raise ValueError(f"source_embedding must be a tensor of shape {expected} for {self.faces} face(s), "
                             f"got {shape}")
        self.autograd_modules = tuple(self.autograd_modules)

    # -- forward pieces
    def embeddings(self, x0: torch.Tensor) -> torch.Tensor:
        """Recognizer embeddings of the decoded clean latents x̂₀ [B,4,h,w] → [B,D] (≥ float32)."""
        z = x0 if self.decode_dtype is None else x0.to(self.decode_dtype)
        image = self.decode(z)
        if self.clamp_decoded:
            image = straight_through_clamp(image)
        face = self.crop(image)
        rec_dtype = _module_dtype(self.recognizer)
        if rec_dtype is not None and face.dtype != rec_dtype:
            face = face.to(rec_dtype)
        f = self.recognizer(face)
        return f.to(_loss_dtype(f))

    def _reference(self, f: torch.Tensor) -> torch.Tensor:
        # a normal clone, made once per device and dtype: the stored embedding may be an inference tensor, and
        # the cosine saves it for backward
        key = (f.device, f.dtype)
        cached = self._references.get(key)
        if cached is None:
            with normal_tensors():
                cached = self._references[key] = self.source_embedding.detach().to(device=f.device,
                                                                                   dtype=f.dtype).clone()
        return cached

    def energy_of_embeddings(self, f: torch.Tensor) -> torch.Tensor:
        """The task's energy of embeddings f [B,D] → scalar."""
        ref = self._reference(f)
        if self.mode == "anonymize":
            return anonymization_energy(f, ref, self.diversity_weight, self.faces)
        return hiding_energy(f, ref, self.faces)

    def energy(self, x0: torch.Tensor) -> torch.Tensor:
        """E(x̂₀) for clean latents [B,4,h,w] → scalar tensor (float32, or float64 for float64 models)."""
        return self.energy_of_embeddings(self.embeddings(x0))

    @torch.no_grad()
    def similarities(self, x0: torch.Tensor) -> torch.Tensor:
        """cos(f(x̂₀_k), source of sample k) → [B], without gradient (for reporting); with several faces the
        batch is sample-major (face of sample k: k % faces)."""
        f = self.embeddings(x0)
        return cosine_to_source(f, self._reference(f), self.faces)

    def image_similarities(self, images: torch.Tensor) -> torch.Tensor:
        """:meth:`similarities` of images the caller already decoded, [B,3,H,W] in [−1,1] (``decode`` of the
        latents): the results are decoded once, for the gate and the output alike."""
        if self.clamp_decoded:
            images = images.clamp(-1.0, 1.0)
        face = self.crop(images)
        rec_dtype = _module_dtype(self.recognizer)
        if rec_dtype is not None and face.dtype != rec_dtype:
            face = face.to(rec_dtype)
        f = self.recognizer(face)
        f = f.to(_loss_dtype(f))
        return cosine_to_source(f, self._reference(f), self.faces)

    # -- gradients
    def _prepare_modules(self) -> None:
        prepare_for_autograd(self.recognizer, *self.autograd_modules)

    def clip(self, g: torch.Tensor) -> torch.Tensor:
        """Per-sample L2 clip of g [B,...] to ``max_grad_norm`` (identity when None). No host sync."""
        if self.max_grad_norm is None:
            return g
        norms = g.flatten(1).norm(dim=1).clamp_min(1e-12)
        scale = (self.max_grad_norm / norms).clamp(max=1.0)
        return g * scale.view(-1, *([1] * (g.dim() - 1)))

    def gradient(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """g = ∂E/∂x̂₀ through decoder and recognizer (official target "x0").

        ``x0`` [B,4,h,w] may be an inference tensor and may be called from inside ``inference_mode()``.
        Returns (g [B,4,h,w] float32, clipped if ``max_grad_norm``; E detached scalar tensor).
        """
        self._prepare_modules()
        with normal_tensors(grad=True):
            leaf = x0.detach().clone().requires_grad_(True)
            try:
                energy = self.energy(leaf)
                (g,) = torch.autograd.grad(energy, leaf)
            except RuntimeError as err:
                raise explain_inference_error(err, _PREPARE_HINT) from err
            return self.clip(g.float()), energy.detach()

    def gradient_through(
        self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """g = ∂E(fn(x))/∂x for target "xt": ``fn`` maps a latent leaf (e.g. x_σ) to x̂₀ through the denoiser.

        Returns (g shaped like x, float32, clipped if ``max_grad_norm``; E detached; x̂₀ = fn(x) detached), so
        the sampler needs one denoiser call per step. ``x`` may be an inference tensor.
        """
        self._prepare_modules()
        with normal_tensors(grad=True):
            leaf = x.detach().clone().requires_grad_(True)
            try:
                x0 = fn(leaf)
                energy = self.energy(x0)
                (g,) = torch.autograd.grad(energy, leaf)
            except RuntimeError as err:
                raise explain_inference_error(err, _PREPARE_HINT) from err
            return self.clip(g.float()), energy.detach(), x0.detach()


# ------------------------------------------------------------------------------- background paste
def mask_to_latent(mask: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Pixel-space mask [H,W], [B,H,W] or [B,1,H,W] in [0,1] → latent-resolution [B|1,1,h,w], nearest (official).

    1 marks background to keep (pasted back from the source latent), 0 the region to regenerate.
    """
    if mask.dim() == 2:
        mask = mask[None, None]
    elif mask.dim() == 3:
        mask = mask[:, None]
    elif mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask must have shape [H,W], [B,H,W] or [B,1,H,W], got {tuple(mask.shape)}")
    mask = mask.float()
    lo, hi = float(mask.min()), float(mask.max())
    if lo < 0.0 or hi > 1.0 or not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"mask values must lie in [0, 1], got range [{lo}, {hi}]")
    return F.interpolate(mask, size=tuple(int(s) for s in latent_hw), mode="nearest")


@dataclass(eq=False)
class BackgroundPaste:
    """Paste the source latent back into the background during the last steps (official anonymization).

    ``mask`` [1|B,1,h,w] latent-resolution in [0,1] (1 = background to keep); ``z0`` the scaled source latent
    [1|B,C,h,w]. Active while ⌊t/100⌋ < ⌊below_timestep/100⌋ (official: ⌊t/100⌋ < 3, t = current timestep).
    Official rule in VP space x_{t−1} ← (1−m)·x_{t−1} + m·z₀ (the *clean* latent); in σ space that is
    x_σ' ← (1−m)·x_σ' + m·z₀·√(1+σ'²). ``renoise`` pastes q_sample(z₀, ε, t') instead, i.e. z₀ + σ'·ε in σ space,
    with one fixed noise ε (seeded by ``noise_seed``, per sample) for the whole run.
    """

    mask: torch.Tensor
    z0: torch.Tensor
    below_timestep: int = 300
    renoise: bool = False
    noise_seed: int = 0
    _cache: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        if self.mask.dim() != 4 or self.mask.shape[1] != 1:
            raise ValueError(f"background mask must have shape [1|B,1,h,w], got {tuple(self.mask.shape)}; "
                             "use mask_to_latent() for a pixel-space mask")
        if self.z0.dim() != 4:
            raise ValueError(f"source latent must have shape [1|B,C,h,w], got {tuple(self.z0.shape)}")
        if self.mask.shape[-2:] != self.z0.shape[-2:]:
            raise ValueError(f"background mask is {tuple(self.mask.shape[-2:])} but the latent is "
                             f"{tuple(self.z0.shape[-2:])}; resize it with mask_to_latent(mask, latent_hw)")

    def active(self, t: int) -> bool:
        """Whether the paste applies after the step at integer timestep t."""
        return int(t) // STAGE_WIDTH < int(self.below_timestep) // STAGE_WIDTH

    def _on(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (x.device, x.dtype)
        if key not in self._cache:
            self._cache[key] = (self.mask.to(device=x.device, dtype=x.dtype), self.z0.to(device=x.device, dtype=x.dtype))
        return self._cache[key]

    def _fixed_noise(self, x: torch.Tensor) -> torch.Tensor:
        key = ("noise", tuple(x.shape), x.device, x.dtype)
        if key not in self._cache:
            eps = torch.stack([seeded_noise(tuple(x.shape[1:]), self.noise_seed, b) for b in range(x.shape[0])])
            self._cache[key] = eps.to(device=x.device, dtype=x.dtype)
        return self._cache[key]

    def apply(self, x: torch.Tensor, t_current: int, sigma_next: float, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Paste into the σ-space latent x [B,C,h,w] that sits at σ_next after the step at ``t_current``."""
        if not self.active(t_current):
            return x
        m, z0 = self._on(x)
        if self.renoise:
            eps = self._fixed_noise(x) if noise is None else noise.to(device=x.device, dtype=x.dtype)
            keep = z0 + sigma_next * eps
        else:
            keep = z0 * math.sqrt(1.0 + sigma_next * sigma_next)
        return (1.0 - m) * x + m * keep
