"""The pack's bridge to ComfyUI: the only package that imports ComfyUI (``comfy``, ``comfy_execution``,
``folder_paths``, ``latent_preview``, ``server``) or reaches into a MODEL's ``BaseModel``.

Everything else in ``nodes/`` converts ComfyUI types and calls ``core/``; when a ComfyUI update changes an
internal API, the fix belongs in one of these modules (tested against ComfyUI 0.3.75,
docs/comfyui-internals.md):

* ``folders``  — model and key folders, file lists, missing-file messages;
* ``outputs``  — the output folder's file names for Save Protected Image (ComfyUI's counter naming);
* ``models``   — devices, memory, model loading, fingerprints, VAE encode/decode and latent scaling between
  ComfyUI LATENT dicts (unscaled) and scaled SD latents;
* ``autograd`` — gradient-ready private copies, UNet weight wrappers, UNet gradient checkpointing and the
  differentiable VAE decoder (docs/comfyui-internals.md §2.5);
* ``progress`` — progress bar, progress text, latent previews, Cancel;
* ``sampling`` — scheduled CONDITIONING entries, the start noise, the PrivacyGuider GUIDER, the guided-DDIM
  SAMPLER and :func:`~.sampling.run_plan_in_comfy`, which runs a ``core.sampling.SamplingPlan`` inside
  ComfyUI's sampler stack;
* ``backend``  — ``core.backend.DiffusionBackend`` / ``VisionEncoder`` on ComfyUI's MODEL, CLIP, VAE and
  CLIP_VISION.

Node modules import the names they need from these modules; ``tests/nodes/test_boundary.py`` keeps the
boundary.
"""
