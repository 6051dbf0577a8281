"""Save Protected Image: PNGs without ComfyUI's workflow metadata, and the privacy report next to them."""
from __future__ import annotations

import os

from comfy_api.latest import io, ui

from ..core.photo_io import encode_png
from .comfy.outputs import output_target
from .convert import rgb
from .schema import schema
from .types import CATEGORY, ReceiptType

IMAGES = "image at Save Protected Image's 'images' input"
REPORT_SUFFIX = ".report.json"


def _write_new(path: str, data: bytes) -> None:
    """Write ``data`` to a file that must not exist yet (never replaces a file)."""
    with open(path, "xb") as f:
        f.write(data)


def png_bytes(image) -> bytes:
    """One IMAGE [H,W,3] in [0,1] as PNG bytes with no metadata: ``core.photo_io.encode_png``, the CLI's writer."""
    return encode_png(image)


class SaveProtectedImage(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="DiffPrivacy_SaveImageClean",
            display_name="Save Protected Image",
            category=CATEGORY,
            description="Saves protected images to ComfyUI's output folder as plain PNGs, WITHOUT the workflow "
                        "and prompt that Save Image embeds in every PNG: that metadata names the source photo's "
                        "file and every setting of the run, so sharing such a PNG would tell who was "
                        "anonymized. With a receipt it writes the privacy report (scores, checks, settings; "
                        "no file name, no embedding) as <image>.report.json next to each image.",
            is_output_node=True,
            inputs=[
                io.Image.Input("images", tooltip="Protected images (e.g. from Face Paste Back)."),
                io.String.Input("filename_prefix", default="diff_privacy/protected",
                                tooltip="Start of the file names, inside the output folder; ComfyUI's counter "
                                        "is appended (<prefix>_00001_.png)."),
                ReceiptType.Input("receipt", optional=True,
                                  tooltip="From Privacy Sampler or Protect Faces: its report is written as "
                                          "<image>.report.json next to each image."),
            ],
            outputs=[],
        )

    @classmethod
    def execute(cls, images, filename_prefix, receipt=None) -> io.NodeOutput:
        images = rgb(images, IMAGES)
        target = output_target(filename_prefix, int(images.shape[2]), int(images.shape[1]))
        results = []
        for i, image in enumerate(images):
            report = None if receipt is None else receipt.report_for(i, len(images)).to_json().encode("utf-8")
            stem = f"{target.name.replace('%batch_num%', str(i))}_{target.counter + i:05}_"
            _write_new(os.path.join(target.folder, stem + ".png"), png_bytes(image))
            if report is not None:
                _write_new(os.path.join(target.folder, stem + REPORT_SUFFIX), report)
            results.append(ui.SavedResult(stem + ".png", target.subfolder, io.FolderType.output))
        return io.NodeOutput(ui=ui.SavedImages(results))
