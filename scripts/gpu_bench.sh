#!/usr/bin/env bash
# GPU benchmark of the Diff-Privacy pack: one prepared script for a CUDA machine (H100/H200) without internet.
#
#   bash scripts/gpu_check.sh prepare                   # here, with PyPI: fill .whl/ (the same wheels as the check)
#   bash scripts/gpu_bench.sh                           # on the GPU machine (carry .whl); numbers in $OUT
#   DP_GPU_BENCH_DEVICE=cpu bash scripts/gpu_bench.sh   # proof of the plumbing on a CPU, at tiny sizes
#
# What it runs (scripts/benchmark.py, full-size SD1.5-shaped random weights at 512 px, nothing downloaded),
# part by part, within DP_GPU_BENCH_BUDGET_S (default 480 s = 8 minutes, setup included); a part starts only
# when the time left covers its estimate (below), and each runs under `timeout` for what is left:
#   1 components   reference vs optimised per loop step (MSI step and cost per timestep seen, inversion step,
#                  guided step at batch 4, decode + recognizer backward): fp32 eager vs bf16 weights
#                  of the same random SD1.5 with the UNet step as CUDA graphs (the default); then
#                  graphs off vs on alone (MSI, inversion, guided step); the guided step at B = 1, 2,
#                  4, 8                                                                             ~130 s
#   2 e2e          one face end to end, presets fast and default                                    ~100 s
#   3 faces        photos with 1, 2, 4 faces (fast preset), faces one at a time vs in one batch,
#                  with the ratio                                                                   ~130 s
#   4 paper        one face end to end with the paper preset (1500 MSI steps at batch 1)            ~130 s
#   5 compiled     components again with the compiled UNet step (torch.compile, CUDA graphs);
#                  compiling takes minutes, so this runs last and only when 200 s are left          ~200 s
# Every part writes its JSON into the work folder; at the end (also after a timeout) they are merged into
# gpu_bench.json, and the log goes to gpu_bench.txt, in $OUT when set (the device tool's output folder),
# else in the work folder. Exit status 0 when parts 1 and 2 ran (a skipped later part is reported, not an error).
#
# DP_GPU_BENCH_DEVICE=cpu runs the same parts on the CPU with the tests' tiny models at 64 px, two timed steps
# per loop and presets cut to a few steps (benchmark.py --plumbing), so the plumbing is proven in about a minute;
# the GPU-only parts (the compiled step, CUDA peak memory) are reported as SKIPPED, loudly.
# DP_GPU_BENCH_PYTHON picks the interpreter (default python3), DP_GPU_BENCH_WORK the scratch folder (default
# /tmp/dp-gpu-bench), DP_GPU_BENCH_CARRY the wheel folder (default .whl, filled by gpu_check.sh prepare: torch,
# transformers, scikit-image and psutil come with the GPU machine's image; diffusers, facenet-pytorch and their
# few missing needs travel as wheels), DP_COMFYUI033_TARBALL the ComfyUI tarball the SD1 tokenizer is read from
# (default .whl/ComfyUI-0.33.0.tar.xz, else ../shared/comfyui/ComfyUI-0.33.0.tar.gz); DP_COMFYUI_DIR, when set
# to a ComfyUI tree, is used instead. Call:
#   device run: command "bash scripts/gpu_bench.sh", carry [".whl"], timeout_s 540
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CARRY="${DP_GPU_BENCH_CARRY:-$REPO/.whl}"
DEVICE="${DP_GPU_BENCH_DEVICE:-cuda}"
PY="${DP_GPU_BENCH_PYTHON:-python3}"
WORK="${DP_GPU_BENCH_WORK:-/tmp/dp-gpu-bench}"
BUDGET="${DP_GPU_BENCH_BUDGET_S:-480}"
DEST="${OUT:-$WORK}"
LOG="$DEST/gpu_bench.txt"
PARTS="$WORK/parts"

mkdir -p "$WORK" "$DEST" "$PARTS"
rm -f "$PARTS"/*.json "$LOG"
say() { echo "[gpu_bench] $*" | tee -a "$LOG"; }

merge() {  # every part's JSON into one file, whatever ran
    "$PY" - "$PARTS" "$DEST/gpu_bench.json" "$DEVICE" <<'EOF'
import json, pathlib, sys
parts, out, device = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3]
merged = {"device": device, "parts": {}}
for path in sorted(parts.glob("*.json")):
    merged["parts"][path.stem] = json.loads(path.read_text())
out.write_text(json.dumps(merged, indent=2))
print(f"[gpu_bench] merged {len(merged['parts'])} part(s) into {out}")
EOF
}
trap merge EXIT

if [ "$DEVICE" = cpu ]; then
    SIZE=64; WEIGHTS=tiny; STEPS=(--msi-steps 2 --loop-steps 2 --warmup 1); E2E=(--plumbing)
    FACES=1,2; BATCHES=1,2; SCALE=0
else
    SIZE=512; WEIGHTS=sd15; STEPS=(--msi-steps 8 --loop-steps 6 --warmup 2); E2E=()
    FACES=1,2,4; BATCHES=1,2,4,8; SCALE=1
fi
say "device $DEVICE, size $SIZE, weights $WEIGHTS, python $PY, budget $BUDGET s, results in $DEST"

# carried wheels (as scripts/gpu_check.sh installs them)
if compgen -G "$CARRY/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
        "$CARRY"/*.whl || { say "FAIL: the carried wheels do not install"; exit 1; }
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
    say "installed $(ls "$CARRY"/*.whl | wc -l) carried wheels ($SECONDS s)"
fi
# the SD1 CLIP tokenizer (vocab.json + merges.txt) from a ComfyUI tree or tarball
if [ -z "${DP_COMFYUI_DIR:-}" ] || [ ! -d "$DP_COMFYUI_DIR/comfy/sd1_tokenizer" ]; then
    export DP_COMFYUI_DIR="$WORK/ComfyUI"
    if [ ! -f "$DP_COMFYUI_DIR/comfy/sd1_tokenizer/vocab.json" ]; then
        source=""
        for candidate in "${DP_COMFYUI033_TARBALL:-}" "$CARRY/ComfyUI-0.33.0.tar.xz" \
                         "$REPO/../shared/comfyui/ComfyUI-0.33.0.tar.gz"; do
            if [ -n "$candidate" ] && [ -f "$candidate" ]; then source="$candidate"; break; fi
        done
        [ -n "$source" ] || { say "FAIL: no ComfyUI tree or tarball for the SD1 tokenizer (carry .whl)"; exit 1; }
        tar -xf "$source" -C "$WORK" ComfyUI/comfy/sd1_tokenizer || { say "FAIL: cannot unpack $source"; exit 1; }
    fi
fi
say "SD1 tokenizer in $DP_COMFYUI_DIR/comfy/sd1_tokenizer ($SECONDS s)"

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
part() {  # name, estimate (s), benchmark arguments...
    local name="$1" estimate="$2" left status
    shift 2
    left=$((BUDGET - SECONDS))
    if [ "$left" -lt $((estimate * SCALE + 10)) ]; then
        say "SKIPPED part $name: $left s left, it needs about $estimate s"
        return 2
    fi
    say "part $name (up to $left s)"
    (cd "$REPO" && timeout "$left" "$PY" scripts/benchmark.py --device "$DEVICE" --size "$SIZE" --weights "$WEIGHTS" \
        "${STEPS[@]}" --out "$PARTS/$name.json" "$@") 2>&1 | tee -a "$LOG"
    status=${PIPESTATUS[0]}
    [ "$status" -eq 0 ] && say "part $name done ($SECONDS s)" || say "FAIL: part $name exited $status ($SECONDS s)"
    return "$status"
}

failed=0
part 1-components 130 --sections components,batch --batches "$BATCHES" || failed=1
part 2-e2e 100 --sections e2e --presets fast,default "${E2E[@]}" || failed=1
part 3-faces 130 --sections faces --faces "$FACES" "${E2E[@]}" || true
part 4-paper 130 --sections e2e --presets paper "${E2E[@]}" || true
if [ "$DEVICE" = cpu ]; then
    say "SKIPPED part 5-compiled: GPU-only (torch.compile with CUDA graphs needs a CUDA device)"
    say "SKIPPED peak GPU memory: GPU-only (the CPU parts report the process's RSS rise instead)"
else
    part 5-compiled 200 --sections components --compile on || true
fi
say "finished in $SECONDS s; $( [ $failed -eq 0 ] && echo 'parts 1 and 2 passed' || echo 'a required part failed')"
exit $failed
