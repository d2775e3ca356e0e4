#!/usr/bin/env bash
# benchmarks/gpu_check.sh: what only a CUDA GPU can check, in one go, written to benchmarks/results/
# with the device named (and copied to $OUT when that is set):
#
#   1. tests: tests/test_kernels_cuda.py (the Triton kernels against the float64 reference at real
#      shapes, students past 2^31 elements, several num_warps);
#   2. build: every kernel variant compiled by this machine's Triton for sm_90, registers, spills, and
#      shared memory or barriers inside loops (python -m kdcache.kernels.build);
#   3. bench: kdcache bench-kernels (fused forward, backward and both vs eager PyTorch vs torch.compile,
#      L2 flushed between calls, the copy rate in the same run);
#   4. step: benchmarks/kd_step_time.py on the demo student, from a small teacher and cache made first;
#   5. realistic: benchmarks/kd_step_realistic.py, DeepLabV3-MobileNetV3-Large at 512×1024, batch 8 (step
#      ratio, kernels a step launches, host syncs, torch.compile of the KD term with fullgraph=True);
#   6. sweep (only when named): benchmarks/kernel_sweep.py, the kernels' launch settings side by side;
#   7. host (only when named): benchmarks/loss_host_overhead.py --device cuda, the host's microseconds a
#      loss call (kdcache's wrapper, and Triton's two launches alone) and a cProfile of where they go.
#
#   bash benchmarks/gpu_check.sh [tests] [build] [bench] [step] [realistic] [sweep] [host]   # default: the first five
#
# Without a CUDA GPU it says so in one line and exits 0. Python packages the machine lacks (zarr,
# numcodecs, google-crc32c, donfig on this project's GPU image) are installed from .whl/ at the
# repository root when it exists (make it with benchmarks/gpu_wheels.sh where pip works); kdcache
# itself is used from this checkout, installed nowhere. Exit status: 0 when every stage passed.
#
# Knobs (environment): GPU_CHECK_TEST_K (a pytest -k expression: only those CUDA tests), KDCACHE_COMMIT (the commit to name in the results, for a copied tree whose .git
# is another commit's, as the device tool's copies are: KDCACHE_COMMIT=$(git rev-parse --short HEAD)
# typed where the tree was committed), PYTHON (python3), GPU_CHECK_BENCH_ARGS (--topk 4), and the stages' time limits
# in seconds, GPU_CHECK_TEST_TIMEOUT (180), GPU_CHECK_BUILD_TIMEOUT (60), GPU_CHECK_BENCH_TIMEOUT (130),
# GPU_CHECK_STEP_TIMEOUT (90), GPU_CHECK_REALISTIC_TIMEOUT (100), GPU_CHECK_SWEEP_TIMEOUT (200), GPU_CHECK_HOST_TIMEOUT (90): the default five with the set-up stay under
# 10 minutes (about 6 when nothing hits its limit: the CUDA tests took 93-103 s on an H200, cut at 120 s once), and each stage's files are copied to $OUT as it ends.
set -euo pipefail

STAGES=("$@")
if [ ${#STAGES[@]} -eq 0 ]; then STAGES=(tests build bench step realistic); fi
for s in "${STAGES[@]}"; do
    case $s in tests | build | bench | step | realistic | sweep | host) ;; *) echo "usage: $0 [tests] [build] [bench] [step] [realistic] [sweep] [host]" >&2; exit 2 ;; esac
done

cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    echo "gpu_check: no CUDA GPU here; nothing to check"
    exit 0
fi
if ! "$PY" -c "import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)"; then
    echo "gpu_check: needs Python >= 3.11 (PYTHONSAFEPATH); $PY is $("$PY" -V 2>&1)" >&2
    exit 1
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
SITE=$WORK/site
mkdir -p "$SITE" "$WORK/bin"

# -- Python environment ---------------------------------------------------------------------------
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl ||
        { echo "gpu_check: pip could not install .whl/*.whl for $("$PY" -V 2>&1) (gpu_wheels.sh fetches CPython 3.12 x86-64 wheels)" >&2; exit 1; }
fi
# kdcache from this checkout, laid out as an installation would be (kernels/ and cli/ as kdcache.kernels
# and kdcache.cli): the checkout itself is not importable as it stands.
"$PY" benchmarks/checkout_site.py "$SITE"
printf '#!/bin/sh\nexec "%s" -m kdcache "$@"\n' "$(command -v "$PY")" > "$WORK/bin/kdcache"
chmod +x "$WORK/bin/kdcache"
export PATH="$WORK/bin:$PATH"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONSAFEPATH=1  # no checkout folder first on sys.path: its kdcache/ lacks kernels/ and cli/
export PYTHONUNBUFFERED=1

missing=$("$PY" - <<'EOF'
import importlib

modules = ["torch", "torchvision", "triton", "numpy", "numba", "zarr", "numcodecs", "google_crc32c", "donfig",
           "typer", "rich", "matplotlib", "PIL", "fsspec", "pytest"]
missing = []
for name in modules:
    try:
        importlib.import_module(name)
    except Exception:
        missing.append(name)
print(" ".join(missing))
EOF
)
if [ -n "$missing" ]; then
    echo "gpu_check: missing Python modules: $missing (make .whl/ with 'bash benchmarks/gpu_wheels.sh' where pip works, and bring it along)" >&2
    exit 1
fi
"$PY" -c "import sys, kdcache, kdcache.cli.app, kdcache.kernels.triton_kl
sys.exit(0 if kdcache.__file__.startswith(sys.argv[1]) else f'gpu_check: kdcache imports from {kdcache.__file__}, not {sys.argv[1]}')" "$SITE"

# -- the device ------------------------------------------------------------------------------------
NAME=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0))")
SLUG=$(printf '%s' "$NAME" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-+//; s/-+$//')
RES=benchmarks/results
mkdir -p "$RES"
SUMMARY=$RES/gpu-check-$SLUG.md
LOG=$RES/gpu-check-$SLUG.log
PYTEST_LOG=$RES/gpu-check-$SLUG-pytest.txt
KJSON=$RES/kernels-$SLUG.json
KMD=$RES/kernels-$SLUG.md
STEP_MD=$RES/kd-step-time-$SLUG.md
BUILD_MD=$RES/kernel-build-$SLUG.md
REAL_MD=$RES/kd-step-realistic-$SLUG.md
SWEEP_MD=$RES/kernel-sweep-$SLUG.md
HOST_MD=$RES/loss-host-overhead-$SLUG.md
touch "$WORK/start"
read -r -a BENCH_ARGS <<< "${GPU_CHECK_BENCH_ARGS:---topk 4}"

copy_out() {  # the device tool brings back what lies in $OUT (at most 8 files): while the stages run, each
    # stage's files as it ends (6 at most); at the end (copy_out final) $OUT is laid out again: the
    # summary and the log, then the stages' files in order of worth until 8 (the JSON first left out,
    # then the build table: the log holds both)
    if [ -n "${OUT:-}" ] && [ -d "${OUT}" ]; then
        local f cap=6 files=("$PYTEST_LOG" "$KMD" "$STEP_MD" "$REAL_MD" "$SWEEP_MD" "$HOST_MD" "$BUILD_MD" "$KJSON")
        if [ "${1:-}" = final ]; then
            for f in "${files[@]}"; do rm -f "$OUT/$(basename "$f")"; done  # only this script's copies
            for f in "$SUMMARY" "$LOG"; do [ -f "$f" ] && cp "$f" "$OUT/"; done
            cap=8
        fi
        for f in "${files[@]}"; do
            if [ -f "$f" ] && [ "$f" -nt "$WORK/start" ]; then
                if [ -f "$OUT/$(basename "$f")" ] || [ "$(find "$OUT" -type f | wc -l)" -lt "$cap" ]; then
                    cp "$f" "$OUT/"
                fi
            fi
        done
    fi
}

limit() {  # limit SECONDS CMD...: the command, stopped after SECONDS (when coreutils' timeout exists)
    local seconds=$1
    shift
    if command -v timeout >/dev/null; then
        timeout --kill-after=20 "$seconds" "$@"
    else
        "$@"
    fi
}

stage_status=()
stage_seconds=()
run_stage() {  # run_stage NAME CMD...: records exit status and seconds; never stops the script
    local name=$1 t0=$SECONDS rc=0
    shift
    echo
    echo "== gpu_check: $name"
    "$@" || rc=$?
    local note=""
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then note=" (timed out)"; fi
    stage_status+=("$name: exit $rc$note")
    stage_seconds+=("$name: $((SECONDS - t0)) s")
    copy_out
    return 0
}

stage_tests() {
    set -o pipefail
    local select=()
    if [ -n "${GPU_CHECK_TEST_K:-}" ]; then select=(-k "$GPU_CHECK_TEST_K"); fi
    limit "${GPU_CHECK_TEST_TIMEOUT:-180}" "$PY" -m pytest -v -rA -p no:cacheprovider \
        tests/test_kernels_cuda.py ${select[@]+"${select[@]}"} 2>&1 | tee "$PYTEST_LOG"
}

stage_build() {
    limit "${GPU_CHECK_BUILD_TIMEOUT:-60}" "$PY" -m kdcache.kernels.build --markdown "$BUILD_MD"
}

stage_realistic() {
    limit "${GPU_CHECK_REALISTIC_TIMEOUT:-100}" "$PY" benchmarks/kd_step_realistic.py --device cuda --results "$RES" \
        --tag "$SLUG"
}

stage_sweep() {
    limit "${GPU_CHECK_SWEEP_TIMEOUT:-200}" "$PY" benchmarks/kernel_sweep.py --results "$RES"
}

stage_host() {
    limit "${GPU_CHECK_HOST_TIMEOUT:-90}" "$PY" benchmarks/loss_host_overhead.py --device cuda --results "$RES"
}

stage_bench() {
    limit "${GPU_CHECK_BENCH_TIMEOUT:-130}" kdcache bench-kernels --device cuda "${BENCH_ARGS[@]}" \
        --json "$KJSON" --markdown "$KMD"
}

stage_step_time() {  # a teacher and a 160-sample cache first (1 epoch, seconds on a GPU), then the timing
    local t=$WORK/kd end=$((SECONDS + ${GPU_CHECK_STEP_TIMEOUT:-90}))
    left() { echo $((end - SECONDS > 5 ? end - SECONDS : 5)); }
    limit "$(left)" kdcache train-teacher --epochs 1 --limit 64 --out "$t/teacher" --device cuda --quiet &&
        limit "$(left)" kdcache build-teacher-cache --weights "$t/teacher" --out "$t/cache.zarr" -o size=160 \
            --device cuda --quiet &&
        limit "$(left)" "$PY" benchmarks/kd_step_time.py --cache "$t/cache.zarr" --teacher "$t/teacher" \
            --device cuda --results "$RES" --tag "$SLUG" --profile 50
}

ran() {  # ran STAGE: whether this invocation runs STAGE
    local s
    for s in "${STAGES[@]}"; do [ "$s" = "$1" ] && return 0; done
    return 1
}

join() {  # join A B C -> "A; B; C"
    local out=$1
    shift
    for x in "$@"; do out="$out; $x"; done
    echo "$out"
}

write_summary() {
    local smi commit tests_line versions
    smi=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1 || true)
    if [ -n "${KDCACHE_COMMIT:-}" ]; then
        commit="$KDCACHE_COMMIT (KDCACHE_COMMIT)"
    else
        commit=$(git rev-parse --short HEAD 2>/dev/null || echo "not a git checkout")
        if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null || true)" ]; then commit="$commit + uncommitted changes"; fi
    fi
    tests_line=$(grep -E '^=+ .*[0-9]+ (passed|failed|error|errors|skipped).* in [0-9.]+s' "$PYTEST_LOG" 2>/dev/null | tail -1 || true)
    versions=$("$PY" -c "import platform, torch, triton; print(f'torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, Python {platform.python_version()}')")
    {
        echo "# GPU check: $NAME"
        echo
        echo "Made by \`bash benchmarks/gpu_check.sh\` on $(date -u '+%Y-%m-%d %H:%M UTC'), commit $commit."
        echo
        echo "| | |"
        echo "|---|---|"
        echo "| nvidia-smi (name, driver, memory) | ${smi:-nvidia-smi not available} |"
        echo "| software | $versions |"
        echo "| stages | $(join "${stage_status[@]}") |"
        echo "| stage times | $(join "${stage_seconds[@]}") |"
        echo
        if ran tests; then
            echo "## CUDA tests"
            echo
            echo "\`python -m pytest -v -rA tests/test_kernels_cuda.py\`: ${tests_line:-no summary line (see the log)}"
            echo "Full output: [$(basename "$PYTEST_LOG")]($(basename "$PYTEST_LOG"))."
            echo
        fi
        if ran bench; then
            echo "## kdcache bench-kernels ${BENCH_ARGS[*]}"
            echo
            if [ -f "$KMD" ]; then tail -n +3 "$KMD"; else echo "No table was written (see the log)."; fi
            echo
            echo "Files: [$(basename "$KMD")]($(basename "$KMD")), [$(basename "$KJSON")]($(basename "$KJSON"))."
            echo
        fi
        if ran build; then
            echo "## Kernels compiled by this machine's Triton"
            echo
            if [ -f "$BUILD_MD" ]; then tail -n +3 "$BUILD_MD"; else echo "No table was written (see the log)."; fi
            echo
        fi
        if ran realistic; then
            echo "## A realistic student's step"
            echo
            if [ -f "$REAL_MD" ]; then tail -n +3 "$REAL_MD"; else echo "No result was written (see the log)."; fi
            echo
        fi
        if ran sweep; then
            echo "## Launch settings swept"
            echo
            echo "File: [$(basename "$SWEEP_MD")]($(basename "$SWEEP_MD"))."
            echo
        fi
        if ran host; then
            echo "## Host time of one loss call"
            echo
            if [ -f "$HOST_MD" ]; then tail -n +3 "$HOST_MD"; else echo "No result was written (see the log)."; fi
            echo
        fi
        if ran step; then
            echo "## KD step time"
            echo
            if [ -f "$STEP_MD" ]; then tail -n +3 "$STEP_MD"; else echo "No result was written (see the log)."; fi
            echo
            echo "File: [$(basename "$STEP_MD")]($(basename "$STEP_MD"))."
            echo
        fi
        echo "Everything printed: [$(basename "$LOG")]($(basename "$LOG"))."
    } > "$SUMMARY"
}

main() {
    echo "gpu_check: $NAME; results in $RES/ as *-$SLUG.*"
    rm -f "$SUMMARY"
    nvidia-smi 2>/dev/null || true
    for s in "${STAGES[@]}"; do
        case $s in
            tests) rm -f "$PYTEST_LOG"; run_stage "CUDA tests" stage_tests ;;
            build) rm -f "$BUILD_MD"; run_stage "kernel build" stage_build ;;
            realistic) rm -f "$REAL_MD"; run_stage "realistic step" stage_realistic ;;
            sweep) rm -f "$SWEEP_MD"; run_stage "kernel sweep" stage_sweep ;;
            host) rm -f "$HOST_MD"; run_stage "host overhead" stage_host ;;
            bench) rm -f "$KJSON" "$KMD"; run_stage "bench-kernels" stage_bench ;;
            step) rm -f "$STEP_MD"; run_stage "KD step time" stage_step_time ;;
        esac
    done
    write_summary
    echo
    cat "$SUMMARY"
    copy_out final
    for s in "${stage_status[@]}"; do
        case $s in *": exit 0") ;; *) return 1 ;; esac
    done
}

status=0
main 2>&1 | tee "$LOG" || status=$?
copy_out final
exit "$status"
