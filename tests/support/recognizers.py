"""The public ArcFace IR-SE50 checkpoint layout, written out independently of core.recognizers.

``model_ir_se50.pth`` is the IR-SE50 ``Backbone(50, mode="ir_se")`` of TreB1eN/InsightFace_Pytorch (used by
pSp). The table below is spelled out from that published architecture, not derived from the stage spec in
core.recognizers, so the test comparing the two is not circular.
"""
from __future__ import annotations

#: (in_channels, depth, stride) of body.0 … body.23.
PUBLIC_IRSE50_UNITS = (
    [(64, 64, 2), (64, 64, 1), (64, 64, 1)]
    + [(64, 128, 2)] + [(128, 128, 1)] * 3
    + [(128, 256, 2)] + [(256, 256, 1)] * 13
    + [(256, 512, 2)] + [(512, 512, 1)] * 2
)


def arcface_irse50_expected_shapes() -> dict[str, tuple[int, ...]]:
    """{state-dict name: shape} of the public ``model_ir_se50.pth``, BatchNorm buffers included (397 entries)."""
    table: dict[str, tuple[int, ...]] = {}

    def batchnorm(prefix, n):
        for suffix in ("weight", "bias", "running_mean", "running_var"):
            table[f"{prefix}.{suffix}"] = (n,)
        table[f"{prefix}.num_batches_tracked"] = ()

    table["input_layer.0.weight"] = (64, 3, 3, 3)
    batchnorm("input_layer.1", 64)
    table["input_layer.2.weight"] = (64,)
    for i, (cin, depth, _) in enumerate(PUBLIC_IRSE50_UNITS):
        if cin != depth:
            table[f"body.{i}.shortcut_layer.0.weight"] = (depth, cin, 1, 1)
            batchnorm(f"body.{i}.shortcut_layer.1", depth)
        batchnorm(f"body.{i}.res_layer.0", cin)
        table[f"body.{i}.res_layer.1.weight"] = (depth, cin, 3, 3)
        table[f"body.{i}.res_layer.2.weight"] = (depth,)
        table[f"body.{i}.res_layer.3.weight"] = (depth, depth, 3, 3)
        batchnorm(f"body.{i}.res_layer.4", depth)
        table[f"body.{i}.res_layer.5.fc1.weight"] = (depth // 16, depth, 1, 1)
        table[f"body.{i}.res_layer.5.fc2.weight"] = (depth, depth // 16, 1, 1)
    batchnorm("output_layer.0", 512)
    table["output_layer.3.weight"] = (512, 512 * 7 * 7)
    table["output_layer.3.bias"] = (512,)
    batchnorm("output_layer.4", 512)
    return table
