#!/usr/bin/env bash
# The project's test command:  bash scripts/test.sh [pytest args]
#
# Builds or refreshes the environment (scripts/setup_env.sh; a no-op in about a second when nothing
# changed), then runs pytest from the repository root with that venv, in two legs:
#   1. every test, with the ComfyUI-facing ones on ComfyUI 0.3.75 (the oldest supported version);
#   2. the ComfyUI-facing tests (tests/nodes: in-process, server and browser) again on ComfyUI 0.33.0.
# With pytest arguments only leg 1 runs them (e.g. `bash scripts/test.sh tests/core -q`), unless DP_LEG
# says otherwise: DP_LEG=0.33 runs the given arguments on 0.33 only, DP_LEG=both runs them on both.
# Environment: DP_VENV (venv folder, default <repo>/.venv), DP_COMFYUI_DIR (0.3.75 tree, default
# <repo>/.cache/ComfyUI), DP_COMFYUI033_DIR (0.33 tree, default <repo>/.cache/ComfyUI-0.33.0), plus
# everything setup_env.sh reads. Exits non-zero if any leg fails; pytest's 5 ("no tests collected") counts
# as a failure.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export DP_VENV="${DP_VENV:-$REPO/.venv}"
export DP_COMFYUI_DIR="${DP_COMFYUI_DIR:-$REPO/.cache/ComfyUI}"
export DP_COMFYUI033_DIR="${DP_COMFYUI033_DIR:-$REPO/.cache/ComfyUI-0.33.0}"
FRONTEND033_DIR="$REPO/.cache/frontend-1.49.6"
export DP_COMFY_CLI="${DP_COMFY_CLI:-$REPO/.cache/comfy-cli/bin/comfy}"
# Tests build their models from seeds; nothing may reach a model hub.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 DO_NOT_TRACK=1

bash "$REPO/scripts/setup_env.sh" "$DP_VENV"

cd "$REPO"
if [ $# -eq 0 ]; then LEG="${DP_LEG:-both}"; else LEG="${DP_LEG:-0.3.75}"; fi
status=0

run_leg() {  # run_leg NAME COMFYUI_DIR FRONTEND_ROOT pytest-args...
    local name="$1" tree="$2" frontend="$3" code=0 start
    shift 3
    start=$(date +%s)
    echo "=== test leg: ComfyUI $name ($tree) ==="
    DP_COMFYUI_DIR="$tree" DP_FRONTEND_ROOT="$frontend" \
        "$DP_VENV/bin/python" -m pytest -p no:cacheprovider -rs "$@" || code=$?
    echo "=== test leg ComfyUI $name: exit $code in $(( $(date +%s) - start )) s ==="
    if [ "$code" -eq 5 ]; then
        echo "test.sh: pytest collected no tests (exit 5); treating that as a failure" >&2
    fi
    [ "$code" -eq 0 ] || status=1
}

if [ "$LEG" = both ] || [ "$LEG" = 0.3.75 ]; then
    run_leg 0.3.75 "$DP_COMFYUI_DIR" "" "$@"
fi
if [ "$LEG" = both ] || [ "$LEG" = 0.33 ]; then
    if [ -d "$DP_COMFYUI033_DIR" ]; then
        if [ $# -eq 0 ]; then set -- tests/nodes; fi
        run_leg 0.33.0 "$DP_COMFYUI033_DIR" "$FRONTEND033_DIR" "$@"
    elif [ "${CI:-}" = true ] || [ "${CI:-}" = 1 ]; then
        echo "test.sh: no ComfyUI 0.33 tree at $DP_COMFYUI033_DIR" >&2
        status=1
    else
        echo "test.sh: no ComfyUI 0.33 tree at $DP_COMFYUI033_DIR; the second leg is skipped" >&2
    fi
fi
exit "$status"
