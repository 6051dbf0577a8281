"""Diff-Privacy torch core: pure torch (plus diffusers/transformers/facenet-pytorch), never imports ComfyUI."""
