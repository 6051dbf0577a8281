#!/usr/bin/env bash
# One command on a fresh machine: prepare the environment (scripts/setup_env.sh: venv, pinned ComfyUI 0.3.75
# unless --comfyui is given), start ComfyUI with this pack and run workflows/anonymize.json headless.
#
#   bash scripts/demo.sh [--checkpoint SD15.safetensors] [--facenet 20180402-114759-vggface2.pt]
#                        [--arcface model_ir_se50.pth] [--photo PHOTO] [--comfyui DIR] [--out DIR]
#
# Without --checkpoint/--facenet it falls back to generated random weights and says so loudly.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export DP_VENV="${DP_VENV:-$REPO/.venv}"
export DP_COMFYUI_DIR="${DP_COMFYUI_DIR:-$REPO/.cache/ComfyUI}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DP_SKIP_CHROMIUM="${DP_SKIP_CHROMIUM:-1}"
bash "$REPO/scripts/setup_env.sh" "$DP_VENV"
exec "$DP_VENV/bin/python" "$REPO/scripts/run_demo.py" "$@"
