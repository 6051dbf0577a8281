"""The bad-input matrix: one row per kind of input people actually have, and what each path must do with it.

A :class:`Row` holds the input generator (``make(folder) -> Path``), the paths it goes through ("cli": the CLI's
own stage functions in this process, and a real subprocess for some; "nodes": ComfyUI in this process — Load
Image, Load Checkpoint or the keys folder, then the pack's nodes; "server": the same graph through a real ComfyUI
server) and the expected :class:`Outcome` (the input works, or the error class and key words of its message).
Where the CLI and the nodes must differ, the row says why (``why``).

The rows are grouped (``group``); README.md's "Supported inputs" table has one line per group, and
tests/test_inputs_matrix.py checks that table against :func:`group_outcomes`.

Runners: tests/test_inputs_matrix.py (CLI path, README check) and tests/nodes/test_inputs_matrix.py (nodes and
server paths). Rows stop at the first stage that proves their outcome: decoding and the size policy for photos
(plus the face detector where the pixels decide), the checkpoint's header (family and parts) for checkpoints, and
the key file's own checks before any model loads.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import model_families as mf
from . import photos

# --------------------------------------------------------------------------------------------- outcomes


@dataclass(frozen=True)
class Outcome:
    """``error`` None: the input works. Otherwise the exception's class name and words its message contains."""

    error: str | None = None
    words: tuple[str, ...] = ()

    @property
    def works(self) -> bool:
        return self.error is None

    def label(self) -> str:
        """How README.md writes it: "works" or "refused (`ClassName`)"."""
        return "works" if self.error is None else f"refused (`{self.error}`)"


WORKS = Outcome()
#: The ``error`` of an outcome decided by ComfyUI's own loader (Load Image, Load Checkpoint) before any pack node
#: runs: any exception that is not one of the pack's (its class and text are ComfyUI's and vary between versions).
COMFY_ERROR = "ComfyUI error"


def pack_error_names() -> set[str]:
    """Class names of every error the pack raises on purpose (core.errors)."""
    import inspect

    from core import errors

    return {name for name, obj in vars(errors).items() if inspect.isclass(obj) and issubclass(obj, Exception)}


def matches(expected: "Outcome", error: str | None, message: str) -> bool:
    """Whether an observed (error class name, message) is ``expected``."""
    if expected.error == COMFY_ERROR:
        ok = error is not None and error not in pack_error_names()
    else:
        ok = error == expected.error
    return ok and all(word in message for word in expected.words)


def refused(error: str, *words: str) -> Outcome:
    return Outcome(error, tuple(words))


@dataclass(frozen=True)
class Row:
    """One kind of input. ``make(folder)`` writes it and returns its path. ``expect`` is the CLI's outcome and the
    nodes' too unless ``nodes`` is given (its own words; another error class needs ``why``). ``reference()`` gives
    the upright uint8 pixels a decoded photo must equal (``tolerance``: mean absolute error in 8-bit steps), and
    ``nodes_reference()`` what Load Image gives when that differs; ``detect`` runs the face detector and alignment
    on the decoded photo. ``nodes_input`` describes what the nodes get when it is not the same file (e.g. a MODEL
    built by ComfyUI itself). ``server`` rows also run through the real server."""

    id: str
    group: str
    kind: str  # "photo", "checkpoint", "keyfile", "argument"
    make: Callable[[Path], Path]
    expect: Outcome
    nodes: Outcome | None = None
    why: str = ""
    paths: tuple[str, ...] = ("cli", "nodes")
    server: bool = False
    reference: Callable[[], np.ndarray] | None = None
    tolerance: float = 0.0
    nodes_reference: Callable[[], np.ndarray] | None = None
    detect: bool = False
    nodes_input: str = ""
    extra: dict = field(default_factory=dict)
    #: ComfyUI ≥ 0.33 decodes Load Image's files with PyAV (ffmpeg) first: where that changes what arrives at
    #: the pack, the outcome on those versions and why (``pyav_why``)
    nodes_pyav: Outcome | None = None
    pyav_why: str = ""

    def __post_init__(self):
        if self.nodes is not None and self.nodes.error != self.expect.error and not self.why:
            raise ValueError(f"row {self.id}: the nodes' outcome differs from the CLI's without a reason")
        if "nodes" not in self.paths and not self.why and self.kind != "argument":
            raise ValueError(f"row {self.id}: no nodes path without a reason")

    def outcome(self, path: str, pyav: bool = False) -> Outcome:
        """The expected outcome on ``path``; ``pyav``: ComfyUI's Load Image decodes with PyAV (≥ 0.33)."""
        if path != "cli" and pyav and self.nodes_pyav is not None:
            return self.nodes_pyav
        return self.nodes if path != "cli" and self.nodes is not None else self.expect


# --------------------------------------------------------------------------------------------- photos
def _resized(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(pixels).resize((width, height), Image.Resampling.LANCZOS))


def ref256() -> np.ndarray:
    """The astronaut at 256×256 (face ≈ 45 px wide): the reference picture of the format rows."""
    return _resized(photos.astronaut(), 256, 256)


def ref_portrait() -> np.ndarray:
    """256×192, not square, so any wrong rotation changes the shape: the reference of the orientation rows."""
    return np.ascontiguousarray(ref256()[:, 32:224])


def gray256() -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(ref256()).convert("L"))


def _as_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=2)


def _write(name: str, data: bytes) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        path = folder / name
        path.write_bytes(data if isinstance(data, bytes) else data())
        return path
    return make


def _writer(name: str, build: Callable[[], bytes]) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        path = folder / name
        path.write_bytes(build())
        return path
    return make


def _orientation(tag: int) -> Callable[[], bytes]:
    return lambda: photos.encode(photos.stored_for_orientation(ref_portrait(), tag), "PNG",
                                 exif=photos.exif_orientation_tag(tag))


def _palette(transparent_border: bool) -> tuple[bytes, np.ndarray, np.ndarray]:
    """A 255-colour palette PNG of the reference; with ``transparent_border`` a 12 px frame uses index 255, marked
    transparent. Returns (file, expected pixels with transparency composited over white, the stored colours)."""
    from PIL import Image

    quantized = Image.fromarray(ref256()).quantize(255)
    index = np.asarray(quantized).copy()
    palette = np.asarray(quantized.getpalette()[:765], dtype=np.uint8).reshape(-1, 3)
    palette = np.vstack([palette, np.zeros((256 - len(palette), 3), np.uint8)])
    save = {}
    if transparent_border:
        index[:12], index[-12:], index[:, :12], index[:, -12:] = 255, 255, 255, 255
        palette[255] = (0, 0, 0)
        save["transparency"] = 255
    image = Image.fromarray(index, mode="L").convert("P")
    image.putpalette(palette.reshape(-1).tolist())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **save)
    stored = palette[index]
    shown = stored.copy()
    if transparent_border:
        shown[index == 255] = 255
    return buffer.getvalue(), shown, stored


def _alpha_disc(gray: bool) -> tuple[bytes, np.ndarray, np.ndarray]:
    """RGBA (or gray + alpha) PNG of the reference, opaque in a disc around the face and fully transparent outside
    (the colours there stay stored). Returns (file, composited over white, the stored colours)."""
    base = gray256() if gray else ref256()
    yy, xx = np.mgrid[:256, :256]
    alpha = np.where((xx - 112) ** 2 + (yy - 64) ** 2 < 70 ** 2, 255, 0).astype(np.uint8)
    channels = [base[..., None] if gray else base, alpha[..., None]]
    data = photos.png_by_hand(np.concatenate(channels, axis=2))
    stored = _as_rgb(base) if gray else base
    shown = np.where(alpha[..., None] > 0, stored, 255).astype(np.uint8)
    return data, shown, stored


def _gif_animation() -> bytes:
    from PIL import Image

    frames = [Image.fromarray(ref256()).quantize(255),
              Image.fromarray(_resized(photos.coffee(), 256, 256)).quantize(255)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


def _gif_first_frame() -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(ref256()).quantize(255).convert("RGB"))


def _truncated_jpeg() -> bytes:
    data = photos.encode(ref256(), "JPEG", quality=92)
    return data[: len(data) * 2 // 3]


def _tiny_face() -> np.ndarray:
    """The astronaut shrunk to 40 px inside a 200 px grey frame: a face of about 7 px, too small to find."""
    return photos.padded(_resized(photos.astronaut(), 40, 40), 200, 200, top=80, left=80)


NO_FACE = ("No face found",)
TOO_SMALL = ("too small", "at least 64 px")
TOO_LARGE = ("at most 8192 px",)

PHOTO_ROWS: list[Row] = [
    *[Row(f"exif-orientation-{tag}", "exif-orientation", "photo", _writer(f"orientation{tag}.png", _orientation(tag)),
          WORKS, reference=ref_portrait, detect=True, server=tag == 6,
          nodes_pyav=refused("FaceNotFoundError", *NO_FACE) if tag in (2, 4) else None,
          pyav_why="ComfyUI 0.33's Load Image (PyAV) does not apply the EXIF mirror: the photo arrives mirrored "
                   "(tags 2, 4: flipped, and MTCNN finds no face in the upside-down or mirrored copy)."
                   if tag in (2, 4) else "") for tag in range(1, 9)],
    Row("exif-orientation-6-jpeg", "exif-orientation", "photo",
        _writer("phone.jpg", lambda: photos.encode(photos.stored_for_orientation(ref_portrait(), 6), "JPEG",
                                                   quality=95, exif=photos.exif_orientation_tag(6))),
        WORKS, reference=ref_portrait, tolerance=4.0, detect=True),
    Row("gray-16bit-png", "gray-16bit", "photo", _writer("gray16.png", lambda: photos.png_by_hand(
        gray256().astype(np.uint16) * 257)), WORKS,
        nodes=refused("FaceNotFoundError", *NO_FACE), nodes_pyav=WORKS,
        pyav_why="ComfyUI 0.33's Load Image decodes the PNG with PyAV, which scales 16-bit gray correctly.",
        why="ComfyUI's Load Image converts 16-bit grayscale with Pillow's convert('RGB'), which clips every value "
            "above 255: the photo arrives near-white. The pack cannot change that loader; save such photos as 8-bit.",
        reference=lambda: _as_rgb(gray256()), nodes_reference=lambda: _as_rgb(np.where(gray256() > 0, 255, 0)
                                                                          .astype(np.uint8)),
        detect=True, server=True),
    Row("rgb-16bit-png", "rgb-16bit", "photo", _writer("rgb16.png", lambda: photos.png_by_hand(
        ref256().astype(np.uint16) * 257)), WORKS, reference=ref256, detect=True),
    Row("rgba-16bit-png", "rgb-16bit", "photo", _writer("rgba16.png", lambda: photos.png_by_hand(np.dstack(
        [ref256().astype(np.uint16) * 257, np.full((256, 256), 65535, np.uint16)]))), WORKS, reference=ref256),
    Row("gray-8bit-png", "grayscale", "photo", _writer("gray8.png", lambda: photos.png_by_hand(gray256())), WORKS,
        reference=lambda: _as_rgb(gray256()), detect=True),
    Row("gray-8bit-jpeg", "grayscale", "photo", _writer("gray8.jpg", lambda: photos.encode(ref256(), "JPEG",
                                                                                           mode="L", quality=95)),
        WORKS, reference=lambda: _as_rgb(gray256()), tolerance=2.0),
    Row("palette-png", "palette", "photo", _writer("palette.png", lambda: _palette(False)[0]), WORKS,
        reference=lambda: _palette(False)[1], detect=True),
    Row("palette-transparent-png", "transparency", "photo", _writer("palette_t.png", lambda: _palette(True)[0]),
        WORKS, reference=lambda: _palette(True)[1], nodes_reference=lambda: _palette(True)[2], detect=True,
        why="Same outcome, other pixels: the CLI composites transparent pixels over white; Load Image keeps the "
            "stored colour (its MASK output carries the transparency)."),
    Row("rgba-png", "transparency", "photo", _writer("rgba.png", lambda: _alpha_disc(False)[0]), WORKS,
        reference=lambda: _alpha_disc(False)[1], nodes_reference=lambda: _alpha_disc(False)[2], detect=True,
        why="Same outcome, other pixels: the CLI composites over white; Load Image drops the alpha channel."),
    Row("gray-alpha-png", "transparency", "photo", _writer("la.png", lambda: _alpha_disc(True)[0]), WORKS,
        reference=lambda: _alpha_disc(True)[1], nodes_reference=lambda: _alpha_disc(True)[2], detect=True,
        why="Same outcome, other pixels: the CLI composites over white; Load Image drops the alpha channel."),
    Row("cmyk-jpeg", "cmyk", "photo", _writer("cmyk.jpg", lambda: photos.encode(ref256(), "JPEG", mode="CMYK",
                                                                                quality=95)),
        WORKS, reference=ref256, tolerance=3.0, detect=True, server=True),
    Row("webp-lossless", "formats", "photo", _writer("photo.webp", lambda: photos.encode(ref256(), "WEBP",
                                                                                         lossless=True)),
        WORKS, reference=ref256),
    Row("bmp", "formats", "photo", _writer("photo.bmp", lambda: photos.encode(ref256(), "BMP")), WORKS,
        reference=ref256),
    Row("tiff", "formats", "photo", _writer("photo.tif", lambda: photos.encode(ref256(), "TIFF")), WORKS,
        reference=ref256),
    Row("animated-gif", "animated", "photo", _writer("animated.gif", _gif_animation), WORKS,
        nodes=refused("FaceNotFoundError", "photo 2 of 2", "No face found"),
        reference=_gif_first_frame, detect=True,
        why="The CLI reads the first frame; Load Image makes a batch of both frames and Face Align protects every "
            "photo of a batch, so the second frame, which shows no face, is refused by number."),
    Row("truncated-jpeg", "truncated", "photo", _writer("truncated.jpg", _truncated_jpeg),
        refused("InvalidImageError", "damaged or truncated"), nodes=WORKS, detect=True,
        why="ComfyUI's Load Image retries truncated files with Pillow's LOAD_TRUNCATED_IMAGES and fills the missing "
            "rows with grey; the CLI refuses a damaged photo instead of protecting part of a picture."),
    Row("not-an-image", "not-an-image", "photo", _writer("notes.jpg", lambda: b"just text, saved as .jpg\n" * 8),
        refused("InvalidImageError", "not an image file"), nodes=refused(COMFY_ERROR),
        why="Load Image (ComfyUI's node) opens the file itself and fails with Pillow's own error."),
    Row("size-16px", "too-small", "photo", _writer("16px.png", lambda: photos.png_by_hand(_resized(ref256(), 16, 16))),
        refused("InvalidImageError", *TOO_SMALL), server=True),
    Row("size-63x2000", "too-small", "photo", _writer("strip.png", lambda: photos.png_by_hand(
        photos.padded(ref256(), 63, 2000))), refused("InvalidImageError", *TOO_SMALL)),
    Row("size-64px-no-face", "no-face", "photo", _writer("64px.png", lambda: photos.png_by_hand(
        _resized(photos.coffee(), 96, 64))), refused("FaceNotFoundError", *NO_FACE), detect=True),
    Row("no-face", "no-face", "photo", _writer("coffee.jpg", lambda: photos.encode(photos.coffee(), "JPEG",
                                                                                   quality=90)),
        refused("FaceNotFoundError", *NO_FACE), detect=True, server=True),
    Row("tiny-face-7px", "no-face", "photo", _writer("tinyface.png", lambda: photos.png_by_hand(_tiny_face())),
        refused("FaceNotFoundError", *NO_FACE), detect=True),
    # detected but not processable by the method: the run fails closed with the face listed (a fallback, blur or
    # fill, would obscure it instead; core.selection)
    Row("small-photo-96px", "small-face", "photo", _writer("96px.png", lambda: photos.png_by_hand(
        _resized(photos.astronaut(), 96, 96))), refused("UnprocessableFacesError", "face 1", "too small"),
        detect=True),
    Row("face-cut-by-border", "face-at-border", "photo", _writer("cut.png", lambda: photos.png_by_hand(
        np.ascontiguousarray(photos.astronaut()[:, 200:]))),
        refused("UnprocessableFacesError", "face 1", "cut by the photo border"), detect=True),
    Row("face-mostly-outside", "no-face", "photo", _writer("cut_more.png", lambda: photos.png_by_hand(
        np.ascontiguousarray(photos.astronaut()[:, 250:]))), refused("FaceNotFoundError", *NO_FACE), detect=True),
    Row("aspect-8-to-1", "aspect", "photo", _writer("wide.png", lambda: photos.png_by_hand(
        photos.padded(ref256(), 256, 2048, left=900))), WORKS, detect=True),
    Row("aspect-1-to-8", "aspect", "photo", _writer("tall.png", lambda: photos.png_by_hand(
        photos.padded(ref256(), 2048, 256, top=900))), WORKS, detect=True),
    Row("size-8000x1000", "large", "photo", _writer("8000px.png", lambda: photos.png_by_hand(
        photos.padded(ref256(), 1000, 8000, left=3800))), WORKS),
    Row("size-8192x64", "large", "photo", _writer("8192px.png", lambda: photos.png_by_hand(
        photos.padded(ref256(), 64, 8192))), WORKS),
    Row("size-8193x64", "too-large", "photo", _writer("8193px.png", lambda: photos.png_by_hand(
        photos.padded(ref256(), 64, 8193))), refused("InvalidImageError", *TOO_LARGE)),
    Row("header-9000x9000", "too-large", "photo", _writer("9000px.png", lambda: photos.png_header_claiming(9000, 9000)),
        refused("InvalidImageError", "9000×9000 px", *TOO_LARGE), paths=("cli",),
        why="Load Image decodes the whole picture before any pack node sees it (about 1 GB here); the CLI refuses "
            "it from the header."),
    Row("decompression-bomb", "bomb", "photo", _writer("bomb.png", lambda: photos.png_header_claiming(60000, 60000)),
        refused("InvalidImageError", "far more than 8192 px"), nodes=refused(COMFY_ERROR),
        why="Load Image opens the file itself; Pillow's decompression-bomb guard stops it there."),
]


# ----------------------------------------------------------------------------------------- checkpoints
def _ckpt(name: str, shapes: Callable[[], dict]) -> Callable[[Path], Path]:
    return lambda folder: mf.write_checkpoint(folder / name, shapes())


def _damaged(name: str, change: Callable[[bytes], bytes]) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        full = mf.write_checkpoint(folder / ("full_" + name), mf.sd1(text=False))
        path = folder / name
        path.write_bytes(change(full.read_bytes()))
        full.unlink()
        return path
    return make


def _lightning(name: str, zip_format: bool) -> Callable[[Path], Path]:
    return lambda folder: mf.write_lightning_ckpt(folder / name, mf.zeros(mf.sd1()), zip_format=zip_format)


def _malicious(folder: Path) -> Path:
    return mf.write_malicious_ckpt(folder / "evil.ckpt", folder / "PAYLOAD-RAN", "os.system")


def _family(key: str, *words: str) -> Outcome:
    return refused("UnsupportedModelError", *words)


COMFY_DETECTS = ("Load Checkpoint (ComfyUI's node) detects the model type itself and refuses a file that is not a "
                 "checkpoint before any pack node runs; the CLI names what the file is.")
COMFY_READS = "Load Checkpoint (ComfyUI's node) reads the file itself and fails with its own error."
META_MODEL = ("a MODEL that ComfyUI itself builds as {0} (on the meta device: a real {0} model is gigabytes), since "
              "ComfyUI cannot detect a tiny file of that family")

CHECKPOINT_ROWS: list[Row] = [
    Row("sd15-safetensors", "sd1-checkpoint", "checkpoint", _ckpt("sd15.safetensors", mf.sd1), WORKS),
    Row("sd15-lightning-ckpt", "legacy-ckpt", "checkpoint", _lightning("sd15_lightning.ckpt", True), WORKS),
    Row("sd15-legacy-format-ckpt", "legacy-ckpt", "checkpoint", _lightning("sd15_legacy.ckpt", False), WORKS),
    Row("sd15-inpainting", "inpainting", "checkpoint", _ckpt("sd15_inpaint.safetensors", lambda: mf.sd1(
        in_channels=9, text=False)), _family("sd1-inpaint", "inpainting", "9 input channels"), server=True),
    Row("sd15-instruct-pix2pix", "inpainting", "checkpoint", _ckpt("sd15_ip2p.safetensors", lambda: mf.sd1(
        in_channels=8, text=False)), _family("sd1-edit", "instruct-pix2pix")),
    Row("sd15-v-prediction", "v-prediction", "checkpoint", _ckpt("sd15_vpred.safetensors", lambda: mf.sd1(
        v_pred=True, text=False)), _family("sd1-v", "v-prediction"), paths=("cli",),
        why="ComfyUI reads every SD 1.x file as ε-prediction whatever marker it carries, so a MODEL from it samples "
            "as ε; the nodes refuse the MODEL once a ModelSamplingDiscrete node switches it to v_prediction (row "
            "sd15-model-sampling-v)."),
    Row("sd15-model-sampling-v", "v-prediction", "checkpoint", _ckpt("sd15_for_vpatch.safetensors", lambda: mf.sd1(
        text=False)), _family("sd1-v", "v-prediction"), paths=("nodes",),
        why="A MODEL switched to v_prediction by ComfyUI's ModelSamplingDiscrete node exists only in a graph.",
        nodes_input="the SD 1.x MODEL patched by ModelSamplingDiscrete(sampling='v_prediction')"),
    Row("sd2", "sd2", "checkpoint", _ckpt("sd2.safetensors", lambda: mf.sd2(text=False)),
        _family("sd2", "Stable Diffusion 2.x")),
    Row("sd2-inpainting", "sd2", "checkpoint", _ckpt("sd2_inpaint.safetensors", lambda: mf.sd2(in_channels=9,
                                                                                                  text=False)),
        _family("sd2", "Stable Diffusion 2.x", "inpainting")),
    Row("sdxl", "sdxl-sd3-flux", "checkpoint", _ckpt("sdxl.safetensors", mf.sdxl),
        _family("sdxl", "Stable Diffusion XL"), nodes_input=META_MODEL.format("SDXL")),
    Row("sdxl-refiner", "sdxl-sd3-flux", "checkpoint", _ckpt("sdxl_refiner.safetensors", lambda: mf.sdxl(refiner=True)),
        _family("sdxl-refiner", "refiner"), nodes_input=META_MODEL.format("SDXLRefiner")),
    Row("sd3", "sdxl-sd3-flux", "checkpoint", _ckpt("sd3.safetensors", mf.sd3), _family("sd3", "Stable Diffusion 3"),
        nodes_input=META_MODEL.format("SD3")),
    Row("flux", "sdxl-sd3-flux", "checkpoint", _ckpt("flux.safetensors", mf.flux), _family("flux", "Flux"),
        nodes_input=META_MODEL.format("Flux")),
    Row("svd-video", "other-model-files", "checkpoint", _ckpt("svd.safetensors", mf.svd), _family("video", "video"),
        nodes=refused(COMFY_ERROR), why=COMFY_DETECTS),
    Row("flux-transformer-only", "other-model-files", "checkpoint", _ckpt("flux_dit.safetensors",
                                                                           lambda: mf.flux(prefix="")),
        _family("flux", "Flux"), nodes=refused(COMFY_ERROR), why=COMFY_DETECTS),
    Row("unet-only", "other-model-files", "checkpoint", _ckpt("unet.safetensors", mf.unet_only),
        _family("unet-only", "UNet on its own"), nodes=refused(COMFY_ERROR),
        why=COMFY_DETECTS),
    Row("lora", "other-model-files", "checkpoint", _ckpt("lora.safetensors", mf.lora), _family("lora", "LoRA"),
        nodes=refused(COMFY_ERROR), why=COMFY_DETECTS),
    Row("vae-only", "other-model-files", "checkpoint", _ckpt("vae.safetensors", mf.vae_only), _family("vae", "VAE"),
        nodes=refused(COMFY_ERROR), why=COMFY_DETECTS),
    Row("text-encoder-only", "other-model-files", "checkpoint", _ckpt("clip_l.safetensors", mf.text_encoder_only),
        _family("text-encoder", "text encoder"), nodes=refused(COMFY_ERROR),
        why=COMFY_DETECTS),
    Row("embedding", "other-model-files", "checkpoint", _ckpt("embedding.safetensors", mf.embedding),
        _family("embedding", "textual-inversion"), nodes=refused(COMFY_ERROR),
        why=COMFY_DETECTS),
    Row("foreign-weights", "other-model-files", "checkpoint", _ckpt("resnet.safetensors", mf.foreign),
        _family("unknown", "not a Stable Diffusion checkpoint"),
        nodes=refused(COMFY_ERROR), why=COMFY_DETECTS),
    Row("no-vae", "missing-part", "checkpoint", _ckpt("sd15_novae.safetensors", lambda: mf.sd1(vae=False)),
        refused("IncompatibleWeightsError", "has no VAE"),
        nodes=refused("IncompatibleWeightsError", "holds no weights", "Load VAE")),
    Row("no-text-encoder", "missing-part", "checkpoint", _ckpt("sd15_notext.safetensors", lambda: mf.sd1(text=False)),
        refused("IncompatibleWeightsError", "no CLIP text encoder"),
        nodes=refused("IncompatibleWeightsError", "no text encoder", "Load CLIP")),
    Row("truncated-safetensors", "damaged-checkpoint", "checkpoint", _damaged("cut.safetensors",
                                                                              lambda d: d[: len(d) * 3 // 4]),
        refused("IncompatibleWeightsError", "damaged or truncated", "truncated"),
        nodes=refused(COMFY_ERROR), why=COMFY_READS, server=True),
    Row("safetensors-extra-bytes", "damaged-checkpoint", "checkpoint", _damaged("extra.safetensors",
                                                                                lambda d: d + b"\0" * 4096),
        refused("IncompatibleWeightsError", "damaged or truncated", "4096 extra bytes"),
        nodes=refused(COMFY_ERROR), why=COMFY_READS),
    Row("html-saved-as-safetensors", "damaged-checkpoint", "checkpoint",
        _write("download.safetensors", b"<!DOCTYPE html><html><body>Sign in to download</body></html>\n"),
        refused("IncompatibleWeightsError", "is not a safetensors file"),
        nodes=refused(COMFY_ERROR), why=COMFY_READS),
    Row("truncated-ckpt", "damaged-checkpoint", "checkpoint", lambda folder: _cut_file(
        _lightning("whole.ckpt", True)(folder), folder / "cut.ckpt"),
        refused("IncompatibleWeightsError", "damaged or truncated PyTorch checkpoint"),
        nodes=refused(COMFY_ERROR), why=COMFY_READS),
    Row("code-in-ckpt", "code-in-ckpt", "checkpoint", _malicious,
        refused("IncompatibleWeightsError", "refused for safety"), nodes=refused(COMFY_ERROR, "Weights only"),
        why=COMFY_READS + " Neither runs the code (the test checks the payload's marker file is never created)."),
]


def _cut_file(path: Path, target: Path) -> Path:
    data = path.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    path.unlink()
    return target


# ----------------------------------------------------------------------------------------- key files
KEY_PASSPHRASE = "the right passphrase (matrix)"


def _key_file(folder: Path, name: str, change: Callable[[bytes, dict], bytes] | None = None,
              plaintext: bool = False) -> Path:
    """A real key file (core.keyfile, test scrypt cost) at ``folder/name``, optionally changed by
    ``change(data, regions)``; ``regions`` maps each region of the layout (core/keyfile.py) to its byte range."""
    import struct

    from core.keyfile import MIN_SCRYPT_N, save_keys
    from tests.support.keys import make_keys

    source = folder / f".source_{name}"
    if source.exists():
        source.unlink()
    save_keys(source, make_keys(), None if plaintext else KEY_PASSPHRASE, scrypt_n=MIN_SCRYPT_N,
              allow_plaintext=plaintext)
    data = source.read_bytes()
    source.unlink()
    (length,) = struct.unpack(">I", data[14:18])
    check = 18 + length
    payload = check + 32
    regions = {"magic": (0, 13), "version": (13, 14), "length": (14, 18), "header": (18, check),
               "check": (check, payload), "ciphertext": (payload, len(data) - 16), "tag": (len(data) - 16, len(data))}
    if change is not None:
        data = change(data, regions)
    path = folder / name
    path.write_bytes(data)
    return path


def _flip(region: str) -> Callable[[bytes, dict], bytes]:
    def change(data: bytes, regions: dict) -> bytes:
        start, end = regions[region]
        i = (start + end) // 2
        if region == "header":  # inside the salt's base64 text: still valid JSON, another salt
            i = data.index(b'"salt_b64":"', start) + 14
            return data[:i] + (b"A" if data[i:i + 1] != b"A" else b"B") + data[i + 1:]
        return data[:i] + bytes([data[i] ^ 0x5A]) + data[i + 1:]
    return change


def _cut(region: str) -> Callable[[bytes, dict], bytes]:
    def change(data: bytes, regions: dict) -> bytes:
        start, end = regions[region]
        return data[: (start + end) // 2] if end - start > 1 else data[:start]
    return change


def _key(name: str, change=None, **kw) -> Callable[[Path], Path]:
    return lambda folder: _key_file(folder, name, change, **kw)


TRUNCATED = refused("TruncatedKeyFileError", "truncated")
DAMAGED_HEADER = refused("DamagedKeyFileError", "damaged", "not a passphrase problem")
TAMPERED = refused("TamperedKeyFileError", "integrity check")

KEYFILE_ROWS: list[Row] = [
    Row("key-intact", "key-file-ok", "keyfile", _key("intact.dpkey"), WORKS),
    Row("key-magic-changed", "key-file-foreign", "keyfile", _key("magic.dpkey", _flip("magic")),
        refused("ForeignKeyFileError", "not a Diff-Privacy key file")),
    Row("key-version-newer", "key-file-foreign", "keyfile", _key("version.dpkey",
                                                                 lambda d, r: d[:13] + b"\x07" + d[14:]),
        refused("ForeignKeyFileError", "version 7", "Update")),
    Row("key-version-older", "key-file-tampered", "keyfile", _key("version1.dpkey",
                                                                  lambda d, r: d[:13] + b"\x01" + d[14:]),
        refused("TamperedKeyFileError", "header version does not match")),
    Row("key-length-changed", "key-file-damaged", "keyfile", _key("length.dpkey",
                                                                  lambda d, r: d[:17] + bytes([d[17] ^ 1]) + d[18:]),
        DAMAGED_HEADER),
    Row("key-length-implausible", "key-file-tampered", "keyfile", _key("length2.dpkey",
                                                                       lambda d, r: d[:14] + b"\xff" * 4 + d[18:]),
        refused("TamperedKeyFileError", "implausible header length")),
    Row("key-header-salt-changed", "key-file-damaged", "keyfile", _key("salt.dpkey", _flip("header")), DAMAGED_HEADER,
        server=True),
    Row("key-header-check-changed", "key-file-damaged", "keyfile", _key("check.dpkey", _flip("check")),
        DAMAGED_HEADER),
    Row("key-ciphertext-changed", "key-file-tampered", "keyfile", _key("cipher.dpkey", _flip("ciphertext")),
        refused("TamperedKeyFileError", "AES-GCM authentication failed")),
    Row("key-tag-changed", "key-file-tampered", "keyfile", _key("tag.dpkey", _flip("tag")),
        refused("TamperedKeyFileError", "AES-GCM authentication failed")),
    Row("key-extra-bytes", "key-file-tampered", "keyfile", _key("extra.dpkey", lambda d, r: d + b"\n"),
        refused("TamperedKeyFileError", "1 unexpected bytes after the payload")),
    *[Row(f"key-cut-in-{region}", "key-file-truncated", "keyfile", _key(f"cut_{region}.dpkey", _cut(region)),
          TRUNCATED, server=region == "ciphertext")
      for region in ("magic", "version", "length", "header", "check", "ciphertext", "tag")],
    Row("key-empty-file", "key-file-foreign", "keyfile", _write("empty.dpkey", b""),
        refused("ForeignKeyFileError", "empty")),
    Row("key-png-renamed", "key-file-foreign", "keyfile",
        _writer("photo.dpkey", lambda: photos.encode(ref256()[:64, :64], "PNG")),
        refused("ForeignKeyFileError", "PNG image")),
    Row("key-plaintext", "key-file-plaintext", "keyfile", _key("plain.dpkey", plaintext=True),
        refused("PlaintextKeyFileError", "not encrypted")),
    Row("key-wrong-passphrase", "key-file-passphrase", "keyfile", _key("wrong.dpkey"),
        refused("WrongPassphraseError", "does not open", "caps lock"), extra={"passphrase": "not the passphrase"}),
    Row("key-passphrase-trailing-newline", "key-file-passphrase", "keyfile", _key("newline.dpkey"),
        refused("WrongPassphraseError", "ends with U+000A"), extra={"passphrase": KEY_PASSPHRASE + "\n"}),
]

# ------------------------------------------------------------------------------------ CLI arguments
ARGUMENT_ROWS: list[Row] = [
    Row("missing-photo", "cli-arguments", "argument", lambda folder: folder / "no_such_photo.jpg",
        refused("exit 2", "--photo", "no such file"), paths=("cli",),
        why="The nodes take photos from ComfyUI's input folder through Load Image's list."),
    Row("missing-checkpoint", "cli-arguments", "argument", lambda folder: folder / "no_such.safetensors",
        refused("exit 2", "--checkpoint", "no such file"), paths=("cli",),
        why="Load Checkpoint lists only files that exist."),
    Row("missing-key-file", "cli-arguments", "argument", lambda folder: folder / "no_such.dpkey",
        refused("exit 2", "--keys", "no such file"), paths=("cli",),
        why="Load Privacy Keys lists only files in the keys folder."),
    Row("missing-output-folder", "cli-arguments", "argument", lambda folder: folder / "no" / "such" / "face.png",
        refused("exit 2", "--out", "does not exist"), paths=("cli",),
        why="The nodes write into ComfyUI's output folder."),
]

ROWS: list[Row] = PHOTO_ROWS + CHECKPOINT_ROWS + KEYFILE_ROWS + ARGUMENT_ROWS


def rows(kind: str | None = None, path: str | None = None, server: bool | None = None) -> list[Row]:
    """The rows of one kind and/or path (and/or the server's)."""
    return [row for row in ROWS if (kind is None or row.kind == kind) and (path is None or path in row.paths)
            and (server is None or row.server == server)]


def group_outcomes() -> dict[str, dict[str, set[str]]]:
    """``{group: {"cli": {labels}, "nodes": {labels}}}`` over every row (a path a row does not take is absent)."""
    out: dict[str, dict[str, set[str]]] = {}
    for row in ROWS:
        entry = out.setdefault(row.group, {})
        if "cli" in row.paths:
            entry.setdefault("cli", set()).add(row.expect.label())
        if "nodes" in row.paths:
            entry.setdefault("nodes", set()).add(row.outcome("nodes").label())
    return out
