"""Embedding Scheduler: MSI stage conditionings at high noise, null text at low noise, as one CONDITIONING."""
from __future__ import annotations

from comfy_api.latest import io

from ..core.schedules import MAX_T, PRESET_SWITCH_TIMESTEPS, EmbeddingSchedule, check_tiling
from .comfy.models import torch_device
from .comfy.sampling import with_timestep_range
from .schema import schema
from .types import CATEGORY, PrivacyEmbedsType

#: the core's schedule presets, then "custom" (the switch_timestep widget)
TASKS = [*PRESET_SWITCH_TIMESTEPS, "custom"]
TASK_TOOLTIP = (f"anonymize: stages for t > {PRESET_SWITCH_TIMESTEPS['anonymize']}; "
                f"hide: t > {PRESET_SWITCH_TIMESTEPS['hide']}; recover: stages at every step; "
                f"custom: use switch_timestep.")


def scheduled_conditioning(embeds, null_conditioning, schedule: EmbeddingSchedule) -> list:
    """CONDITIONING entries (one per active stage + null) whose start/end percents tile [0, 1].

    Each stage entry holds that stage's conditioning of every face, [N,77,D] in the faces' order. ComfyUI
    repeats a conditioning of batch N over a latent batch of N·B by tiling (``comfy.utils.repeat_to_batch_size``
    in ``CONDRegular.process_cond``: latent row k gets cond row k % N), so in a sample-major batch (sample b of
    face i at row b·N + i, how Privacy Sampler orders it) every sample is conditioned by its own face's key-E.
    The null entry [1,77,D] is shared by every sample.

    The entries' tensors are placed on the compute device once, here: ComfyUI's sampler concatenates the
    conditionings of every step and moves the result to the device (``samplers.cond_cat``), which for CPU
    tensors is a host-to-device copy, and a wait, per step.
    """
    ranges = schedule.percent_ranges()
    check_tiling(ranges)
    device = torch_device()
    pooled_null = null_conditioning[0][1].get("pooled_output") if null_conditioning else None
    if pooled_null is not None:
        pooled_null = pooled_null.to(device)
    null_on_device = [[tensor.to(device), {**extras, **({"pooled_output": pooled_null} if "pooled_output" in extras
                                                       else {})}]
                      for tensor, extras in (null_conditioning or [])]
    out = []
    for r in ranges:
        if r.stage is None:
            if not null_conditioning:
                raise ValueError("this schedule needs the null conditioning: connect CLIP Text Encode with an "
                                 "empty prompt to 'null_conditioning'")
            out += with_timestep_range(null_on_device, r.start_percent, r.end_percent)
        else:
            cond = embeds.face_conds[:, r.stage].to(device, copy=True)
            extras = {"pooled_output": pooled_null} if pooled_null is not None else {}
            out += with_timestep_range([[cond, extras]], r.start_percent, r.end_percent)
    return out


class EmbeddingScheduler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="DiffPrivacy_EmbeddingScheduler",
            display_name="Embedding Scheduler",
            category=CATEGORY,
            description="Turns MSI embeddings into one CONDITIONING with timestep ranges: stage conditionings "
                        "while t > switch, null text below. Works with any sampler, plain KSampler included. "
                        "key-E of N faces conditions a latent batch of N·B in sample-major order (sample b of "
                        "face i at b·N + i), as Privacy Sampler orders its samples.",
            inputs=[
                PrivacyEmbedsType.Input("embeds", tooltip="key-E from MSI Invert or Load Privacy Keys."),
                io.Conditioning.Input("null_conditioning", tooltip="CLIP Text Encode of an empty prompt (\"\")."),
                io.Combo.Input("task", options=TASKS, default="anonymize",
                               tooltip=TASK_TOOLTIP),
                io.Int.Input("switch_timestep", default=PRESET_SWITCH_TIMESTEPS["anonymize"], min=-1, max=MAX_T,
                             tooltip="Only for task 'custom': stage conditionings for t > this, null text at or "
                                     "below it (-1 = stages everywhere)."),
            ],
            outputs=[io.Conditioning.Output(display_name="conditioning",
                                            tooltip="Scheduled conditioning for Privacy Sampler or any sampler.")],
        )

    @classmethod
    def execute(cls, embeds, null_conditioning, task, switch_timestep) -> io.NodeOutput:
        schedule = EmbeddingSchedule(switch_timestep) if task == "custom" else EmbeddingSchedule.preset(task)
        return io.NodeOutput(scheduled_conditioning(embeds, null_conditioning, schedule))
