#!/usr/bin/env bash
# The project's test command:  bash scripts/test.sh [pytest args]
#
# Builds or refreshes the environment (scripts/setup_env.sh; a no-op in about a second when nothing
# changed), then runs pytest from the repository root with that venv. Arguments go to pytest unchanged,
# e.g. `bash scripts/test.sh tests/core -q` or `bash scripts/test.sh -m "not slow"`.
# Environment: DP_VENV (venv folder, default <repo>/.venv), DP_COMFYUI_DIR (ComfyUI tree, default
# <repo>/.cache/ComfyUI), plus everything setup_env.sh reads. Exits with pytest's status; pytest's 5
# ("no tests collected") is non-zero and so counts as a failure.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export DP_VENV="${DP_VENV:-$REPO/.venv}"
export DP_COMFYUI_DIR="${DP_COMFYUI_DIR:-$REPO/.cache/ComfyUI}"
# Tests build their models from seeds; nothing may reach a model hub.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 DO_NOT_TRACK=1

bash "$REPO/scripts/setup_env.sh" "$DP_VENV"

cd "$REPO"
status=0
"$DP_VENV/bin/python" -m pytest -p no:cacheprovider -rs "$@" || status=$?
if [ "$status" -eq 5 ]; then
    echo "test.sh: pytest collected no tests (exit 5); treating that as a failure" >&2
fi
exit "$status"
