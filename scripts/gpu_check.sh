#!/usr/bin/env bash
# GPU check of the Diff-Privacy node pack: one prepared script for a CUDA machine (H100/H200) without internet.
#
#   bash scripts/gpu_check.sh prepare                   # here, with PyPI: fill .whl/ (wheels + ComfyUI 0.33)
#   bash scripts/gpu_check.sh                           # on the GPU machine (carry .whl); also $OUT/gpu_check.txt
#   DP_GPU_CHECK_DEVICE=cpu bash scripts/gpu_check.sh   # proof of the plumbing on a CPU, at tiny sizes
#
# What it checks, on ComfyUI 0.33.0, within DP_GPU_CHECK_BUDGET_S (default 480 s = 8 minutes, setup included):
#  (a) tests/nodes/test_bridge.py with ComfyUI imported in-process on CUDA (DP_COMFYUI_DEVICE=cuda, read by
#      scripts/comfyui_env.py; tests/nodes/conftest.py fails if ComfyUI picked another device). Required: the
#      stage-token gradient through ComfyUI's CLIP and UNet, UNet gradient checkpointing, Cancel
#      (interrupt) stopping MSI and the sampler, and (on CUDA) MSI Invert's loops replaying real CUDA graphs
#      with the eager results; the rest of the file is run and reported. In-process ComfyUI
#      uses its classic model patcher: dynamic VRAM is switched on by main.py only, hence (b).
#  (b) workflows/api/anonymize.json without Save Privacy Keys (Face Align 512 px → MSI Invert lite, 20 steps,
#      10 inversion steps → Embedding Scheduler → Identity Energy Guidance → Privacy Sampler, 10 steps, batch
#      4 → Face Paste Back → Save Image) on a random-weight checkpoint in the full SD1.5 layout (1.07 G
#      parameters, 2.1 GB, drawn on the CPU first, about 20 s), served by ComfyUI's own main.py twice: with
#      dynamic VRAM on (0.33's default on NVIDIA; the leg fails if it did not turn on) and with
#      --disable-dynamic-vram. Each leg prints pass/fail, the server's torch.cuda.max_memory_allocated (and
#      max_memory_reserved, and the device's used memory sampled every 20 ms) and its times. The server runs
#      with a stub --front-end-root: an API-only run needs no frontend package.
# Exit status 0 only when (a)'s required tests and both (b) legs passed. Nothing is fetched from the internet.
#
# With DP_GPU_CHECK_DEVICE=cpu (no GPU here) the same steps run on the CPU at 64 px with the tiny checkpoint
# and few steps; the GPU-only parts (CUDA, peak GPU memory, dynamic VRAM, which ComfyUI never enables with
# --cpu) are reported as SKIPPED, loudly. DP_GPU_CHECK_PYTHON picks the interpreter (default: python3, the
# one holding torch on the GPU machine; here e.g. .venv/bin/python), DP_GPU_CHECK_WORK the scratch folder
# (default /tmp/dp-gpu-check), DP_COMFYUI033_DIR a prepared ComfyUI 0.33 tree (else the carried tarball
# .whl/ComfyUI-0.33.0.tar.xz, DP_COMFYUI033_TARBALL or ../shared/comfyui/ComfyUI-0.33.0.tar.gz is unpacked),
# DP_GPU_CHECK_CARRY another folder than .whl/. Extra arguments go to scripts/gpu_check.py run (e.g.
# `bash scripts/gpu_check.sh run --layout full` on a CPU, or `--size 768`).
#
# Carrying. The GPU machine's image already holds torch 2.11 (cu130), torchvision, torchaudio, transformers,
# tokenizers, huggingface-hub, safetensors, numpy, scipy, scikit-image, Pillow, aiohttp, yarl, PyYAML, tqdm,
# psutil, einops, sentencepiece, requests, filelock and pytest (see the device tool's KINDS.md). What it
# lacks travels in .whl/ (git-ignored), about 55 MiB of wheels plus the 5 MiB ComfyUI tarball; with the
# working tree that is just under the 64 MiB a device call may carry (`prepare` prints the total). Call:
#   device run: command "bash scripts/gpu_check.sh", carry [".whl"], timeout_s 540
# `prepare` runs exactly these two downloads (pins = what CI's venv runs ComfyUI 0.33 with) and repacks
# ComfyUI 0.33.0 with xz:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl comfy-aimdo==0.4.13 av==18.1.0 torchsde==0.2.6 trampoline==0.1.2 alembic==1.20.1 Mako==1.4.3 \
#       SQLAlchemy==2.1.9 simpleeval==1.0.8 blake3==1.0.11 pydantic==2.14.4 pydantic-core==2.50.5 \
#       annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 pydantic-settings==2.16.3 \
#       python-dotenv==1.2.4 facenet-pytorch==2.5.3 cryptography==50.0.2 cffi==2.1.1 pycparser==3.12 \
#       diffusers==0.42.1 importlib-metadata==10.2.0 lazy-importer==0.1.0
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
#       --platform any -d .whl comfy-kitchen==0.2.31
# The first line up to python-dotenv is ComfyUI 0.33's requirements.txt minus the image's packages and minus
# the frontend, workflow-template and embedded-docs packages (not needed without a browser; ComfyUI only logs
# their absence); greenlet is left out (SQLAlchemy 2.1 does not require it). comfy-kitchen comes as its
# pure-Python build (0.2 MB instead of the 58 MB CUDA build, which would not fit): its CUDA kernels serve
# quantized models, and SD1.5 in fp16 is not one. The rest is ours: requirements.txt (facenet-pytorch,
# cryptography) and the `cli` extra's diffusers, which the bridge tests compare ComfyUI against. On the GPU
# machine the wheels are installed with the device tool's recipe:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target SITE .whl/*.whl
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CARRY="${DP_GPU_CHECK_CARRY:-$REPO/.whl}"
DEVICE="${DP_GPU_CHECK_DEVICE:-cuda}"
PY="${DP_GPU_CHECK_PYTHON:-python3}"
WORK="${DP_GPU_CHECK_WORK:-/tmp/dp-gpu-check}"
BUDGET="${DP_GPU_CHECK_BUDGET_S:-480}"
TARBALL_NAME="ComfyUI-0.33.0.tar.xz"
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
WHEELS=(comfy-aimdo==0.4.13 av==18.1.0 torchsde==0.2.6 trampoline==0.1.2 alembic==1.20.1 Mako==1.4.3
        SQLAlchemy==2.1.9 simpleeval==1.0.8 blake3==1.0.11 pydantic==2.14.4 pydantic-core==2.50.5
        annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 pydantic-settings==2.16.3
        python-dotenv==1.2.4 facenet-pytorch==2.5.3 cryptography==50.0.2 cffi==2.1.1 pycparser==3.12
        diffusers==0.42.1 importlib-metadata==10.2.0 lazy-importer==0.1.0)
PURE_WHEELS=(comfy-kitchen==0.2.31)
# what (a) and (b) import, by module name
MODULES=(torch torchvision torchaudio numpy PIL safetensors facenet_pytorch cryptography diffusers transformers
         tokenizers skimage pytest aiohttp yarl yaml scipy tqdm psutil einops sentencepiece requests torchsde av
         comfy_aimdo comfy_kitchen sqlalchemy alembic pydantic pydantic_settings blake3 simpleeval)
LIMIT_MIB=64

say() {  # to stdout and, on the GPU machine, to $OUT/gpu_check.txt (gpu_check.py appends its report)
    echo "[gpu_check] $*"
    if [ -n "${OUT:-}" ] && [ "${MODE:-run}" = run ]; then mkdir -p "$OUT" && echo "[gpu_check] $*" >> "$OUT/gpu_check.txt"; fi
}
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }

prepare() {
    local downloader="${DP_GPU_CHECK_DOWNLOAD_PYTHON:-python3}" tarball tree_bytes carry_bytes
    mkdir -p "$CARRY"
    "$downloader" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLATFORMS[@]}" -d "$CARRY" "${WHEELS[@]}" || { say "ERROR: pip download failed"; return 1; }
    "$downloader" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
        --platform any -d "$CARRY" "${PURE_WHEELS[@]}" || { say "ERROR: pip download failed"; return 1; }
    tarball="${DP_COMFYUI033_TARBALL:-$REPO/../shared/comfyui/ComfyUI-0.33.0.tar.gz}"
    if [ ! -f "$CARRY/$TARBALL_NAME" ]; then
        [ -f "$tarball" ] || { say "ERROR: no ComfyUI 0.33 tarball at $tarball (set DP_COMFYUI033_TARBALL)"; return 1; }
        local unpack
        unpack="$(mktemp -d)"
        tar -xzf "$tarball" -C "$unpack" && tar -C "$unpack" -cf - ComfyUI | xz -9 -T0 > "$CARRY/$TARBALL_NAME.partial" \
            && mv "$CARRY/$TARBALL_NAME.partial" "$CARRY/$TARBALL_NAME"
        rm -rf "$unpack"
    fi
    # what travels: tracked and untracked-but-not-ignored files, plus the carried folder
    tree_bytes="$(cd "$REPO" && git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null \
        | awk '{ s += $1 } END { print s + 0 }')"
    carry_bytes="$(du -sb "$CARRY" | cut -f1)"
    say "carry folder $CARRY: $(ls "$CARRY"/*.whl | wc -l) wheels + $TARBALL_NAME = $(mib "$carry_bytes");" \
        "working tree $(mib "$tree_bytes"); together $(mib $((carry_bytes + tree_bytes))) of $LIMIT_MIB MiB"
    if [ $((carry_bytes + tree_bytes)) -gt $((LIMIT_MIB * 1048576)) ]; then
        say "WARNING: over the device call's $LIMIT_MIB MiB: it will be refused"
        return 1
    fi
}

run() {
    local site="$WORK/site" tree="${DP_COMFYUI033_DIR:-}" missing source left
    mkdir -p "$WORK"
    say "device $DEVICE, python $("$PY" -c 'import sys; print(sys.version.split()[0])' 2>/dev/null || echo '?') ($PY)," \
        "work $WORK, budget ${BUDGET} s"
    if compgen -G "$CARRY/*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
            "$CARRY"/*.whl || { say "FAIL: the carried wheels do not install"; return 1; }
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
        say "installed $(ls "$CARRY"/*.whl | wc -l) carried wheels into $site ($SECONDS s)"
    fi
    missing="$("$PY" - "${MODULES[@]}" <<'EOF'
import importlib, sys
bad = []
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception as err:  # noqa: BLE001 - report every failure, not just ImportError
        bad.append(f"{name} ({type(err).__name__}: {err})")
print("; ".join(bad))
EOF
)"
    if [ -n "$missing" ]; then
        say "FAIL: cannot import: $missing"
        say "      run 'bash scripts/gpu_check.sh prepare' on a machine with PyPI and carry .whl"
        return 1
    fi
    if [ -z "$tree" ] || [ ! -f "$tree/main.py" ]; then
        tree="$WORK/ComfyUI-0.33.0"
        if [ ! -f "$tree/main.py" ]; then
            source=""
            for candidate in "$CARRY/$TARBALL_NAME" "${DP_COMFYUI033_TARBALL:-}" \
                             "$REPO/../shared/comfyui/ComfyUI-0.33.0.tar.gz"; do
                if [ -n "$candidate" ] && [ -f "$candidate" ]; then source="$candidate"; break; fi
            done
            [ -n "$source" ] || { say "FAIL: no ComfyUI 0.33 tree or tarball (carry .whl/$TARBALL_NAME)"; return 1; }
            rm -rf "$WORK/unpack" && mkdir -p "$WORK/unpack" && tar -xf "$source" -C "$WORK/unpack" \
                || { say "FAIL: cannot unpack $source"; return 1; }
            "$PY" "$REPO/scripts/comfyui_env.py" prepare --dest "$tree" --source "$WORK/unpack/ComfyUI" >/dev/null \
                || { say "FAIL: cannot prepare the ComfyUI tree"; return 1; }
            rm -rf "$WORK/unpack"
        fi
    fi
    say "ComfyUI tree $tree ($SECONDS s)"
    left=$((BUDGET - SECONDS))
    cd "$REPO" && PYTHONUNBUFFERED=1 "$PY" "$REPO/scripts/gpu_check.py" run --comfyui "$tree" --work "$WORK" \
        --device "$DEVICE" --budget "$left" ${OUT:+--out "$OUT"} "$@"
}

MODE="${1:-run}"
case "$MODE" in
    prepare) prepare ;;
    run) shift $(( $# > 0 ? 1 : 0 )); run "$@" ;;
    *) run "$@" ;;
esac
