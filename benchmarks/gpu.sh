#!/usr/bin/env bash
# The GPU run of issue 13, unattended, on one H100 / H200, in under 9 minutes: pytest -m gpu,
# bench_nf4.py, bench_attention.py and bench_train.py (ours LoRA / QLoRA vs transformers + peft,
# padded and packed, Phi-4-mini and Llama-3.1-8B shapes, seq 2048 and 8192; then our QLoRA's peak
# at 2 full rows of 2048, plain, with --activation-offload, and with --embedding-on-host too, beside
# memory_plan.py's lower bound), each part under its own timeout, then one markdown summary
# (summary.md) beside the logs.
#
#   benchmarks/gpu.sh [--wheels DIR] [--out DIR] [--dry-run | --smoke]
#
#   --wheels DIR  a folder holding the bitsandbytes wheel (the GPU machine reaches no registry):
#                 installed with pip --no-index --find-links DIR. Without it, the hf-peft-qlora
#                 rows say "skipped: bitsandbytes not installed" unless the machine has it.
#   --out DIR     where summary.md and the logs go (default: $OUT, else benchmarks/gpu-results)
#   --dry-run     print the commands, run nothing
#   --smoke       run every part at its CPU smoke size and write the summary: checks this script
#                 on a machine without a GPU (no installs; the timings mean nothing)
#
# Preparing the wheel, here (cp312, x86-64: the GPU image's python), then running it there:
#   echo /.whl/ >> .git/info/exclude
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 -d .whl bitsandbytes==0.50.2
#   device run: command "bash benchmarks/gpu.sh --wheels .whl", carry [".whl"], timeout_s 540
# The wheel is about 43 MB (the travelling tree's limit is 64 MiB); 0.50.2 carries CUDA 13 kernels.
#
# Time budget (seconds, each a hard timeout; parts that finish early leave the rest unused):
# setup 30, pytest 60, bench_nf4 40, bench_attention (seq 8192) 80, bench_train seq 2048 90,
# memory_plan 20, QLoRA memory 60, bench_train seq 8192 140: 520 s at most. bench_train rewrites
# its markdown after each model, so a part cut by its timeout still reports the models it finished.
# Every figure comes from the parts' own output; a part that times out or fails is marked so in
# the summary with its log's tail, and the parts after it still run.

set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS=""
DEST="${OUT:-$ROOT/benchmarks/gpu-results}"
DRY=0
SMOKE=0
while [ $# -gt 0 ]; do
    case "$1" in
        --wheels) WHEELS="$2"; shift 2 ;;
        --out) DEST="$2"; shift 2 ;;
        --dry-run) DRY=1; shift ;;
        --smoke) SMOKE=1; shift ;;
        -h|--help) sed -n '2,31p' "$0"; exit 0 ;;
        *) echo "gpu.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
PY="${PYTHON:-python3}"
case "$PY" in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac  # the pytest part runs from /tmp
if [ "$DRY" = 1 ]; then TMPD=/tmp/gpu_bench.DRYRUN; else TMPD="$(mktemp -d /tmp/gpu_bench.XXXXXX)"; fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export MINIDISTILL_CACHE="$TMPD/cache"
[ "$DRY" = 1 ] || mkdir -p "$DEST"
SUMMARY="$DEST/summary.md"
START=$(date +%s)
PARTS=()  # "name|seconds|exit|log"

# part NAME TIMEOUT CMD...: run CMD from the repo root under a hard timeout, log to DEST/NAME.log.
part() {
    local name="$1" limit="$2"; shift 2
    if [ "$DRY" = 1 ]; then
        echo "[$name, timeout ${limit}s] (cd $ROOT && $*)"
        return 0
    fi
    local log="$DEST/$name.log" t0 rc
    t0=$(date +%s)
    echo "== $name (timeout ${limit}s): $*"
    (cd "$ROOT" && timeout --kill-after=10 "$limit" "$@") >"$log" 2>&1
    rc=$?
    PARTS+=("$name|$(( $(date +%s) - t0 ))|$rc|$log|$*")
    echo "   exit $rc after $(( $(date +%s) - t0 ))s"
}

# ---------------------------------------------------------------- setup (offline installs)
setup() {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
    # minidistill itself (kernels/ installs as minidistill.kernels), editable and offline
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e "$ROOT" \
        || "$PY" -m pip install -q --no-index --no-deps --no-build-isolation "$ROOT"
    if [ -n "$WHEELS" ]; then
        "$PY" -m pip install -q --no-index --no-deps --find-links "$WHEELS" bitsandbytes \
            || echo "bitsandbytes: install from $WHEELS failed; hf-peft-qlora rows will be skipped"
    fi
    "$PY" - <<'EOF'
import importlib.metadata as m
for p in ("torch", "transformers", "peft", "bitsandbytes", "flash_attn", "triton", "minidistill"):
    try:
        print(p, m.version(p))
    except m.PackageNotFoundError:
        print(p, "not installed")
EOF
}
if [ "$DRY" = 1 ]; then
    echo "[setup, timeout 30s] pip install -e $ROOT (offline);" \
         "pip install --no-index --no-deps --find-links ${WHEELS:-<none>} bitsandbytes"
else
    if [ "$SMOKE" = 1 ]; then  # no installs here: only say what is there
        WHEELS=""
        setup() { "$PY" -c "import torch, minidistill; print('torch', torch.__version__)"; }
    fi
    export -f setup
    export PY ROOT WHEELS
    part setup 30 bash -c setup
fi

# Sizes: the real run, or the CPU smoke sizes of each benchmark (--smoke).
if [ "$SMOKE" = 1 ]; then
    NF4_ARGS=(--smoke --iters 2)
    ATTN_ARGS=(--cpu --seqs 512 --steps 1 --warmup 0 --impls ours,hf)
    TRAIN_ARGS=(--smoke --impls ours-lora,hf-peft-lora --ckpt on --no-bf16-saved)
    TRAIN_2048=(--seqs 64) TRAIN_8192=(--seqs 128)
    MEMORY_ARGS=(--smoke --impls ours-qlora,ours-qlora-offload,ours-qlora-offload-hostemb --layouts packed --full-length)
else
    NF4_ARGS=(--iters 20)
    ATTN_ARGS=(--seqs 8192 --steps 2 --warmup 1)
    TRAIN_ARGS=(--models phi-4-mini,llama-3.1-8b --steps 3 --warmup 0)
    TRAIN_2048=(--seqs 2048) TRAIN_8192=(--seqs 8192)
    # The QLoRA memory targets (Llama-3.1-8B <= 6.5 GiB, Phi-4-mini <= 4.5 GiB at 2 x 2048): full rows.
    MEMORY_ARGS=(--models llama-3.1-8b,phi-4-mini --seqs 2048 --full-length --impls ours-qlora,ours-qlora-offload,ours-qlora-offload-hostemb
                 --layouts packed --steps 1)
fi

# ---------------------------------------------------------------- the parts
# pytest from outside the repo root, so that `minidistill` is the installed package (with
# minidistill.kernels) rather than the source folder on sys.path.
part pytest_gpu 60 bash -c "cd /tmp && $PY -m pytest -q -m gpu -p no:cacheprovider -c '$ROOT/pytest.ini' \
    --rootdir '$ROOT' '$ROOT/tests'"
part bench_nf4 40 "$PY" benchmarks/bench_nf4.py "${NF4_ARGS[@]}"
part bench_attention 80 "$PY" benchmarks/bench_attention.py "${ATTN_ARGS[@]}"
part bench_train_2048 90 "$PY" benchmarks/bench_train.py "${TRAIN_ARGS[@]}" "${TRAIN_2048[@]}" \
    --markdown "$TMPD/train_2048.md"
part memory_plan 20 "$PY" benchmarks/memory_plan.py
part bench_train_memory 60 "$PY" benchmarks/bench_train.py "${MEMORY_ARGS[@]}" --markdown "$TMPD/train_memory.md"
part bench_train_8192 140 "$PY" benchmarks/bench_train.py "${TRAIN_ARGS[@]}" "${TRAIN_8192[@]}" \
    --markdown "$TMPD/train_8192.md"

[ "$DRY" = 1 ] && exit 0

# ---------------------------------------------------------------- summary.md
{
    what=""; [ "$SMOKE" = 1 ] && what=" --smoke: CPU sizes, timings mean nothing"
    echo "# GPU benchmarks (benchmarks/gpu.sh$what)"
    echo
    commit="${COMMIT:-$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)}"
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'); commit $commit (plus the working tree's changes, if any);" \
         "$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1);" \
         "total $(( $(date +%s) - START ))s"
    echo
    echo "| part | seconds | exit | command |"
    echo "|---|---|---|---|"
    for p in "${PARTS[@]}"; do
        IFS='|' read -r name secs rc log cmd <<<"$p"
        status="$rc"; [ "$rc" = 124 ] || [ "$rc" = 137 ] && status="$rc (timed out)"
        echo "| $name | $secs | $status | \`${cmd//|/\\|}\` |"
    done
    for n in 2048 memory 8192; do
        echo
        if [ "$n" = memory ]; then echo "## bench_train, QLoRA peak at 2 full rows of 2048"; else
            echo "## bench_train, seq $n"; fi
        echo
        if [ -s "$TMPD/train_$n.md" ]; then cat "$TMPD/train_$n.md"; else echo "(no table: see bench_train_$n.log)"; fi
    done
    for p in "${PARTS[@]}"; do
        IFS='|' read -r name secs rc log cmd <<<"$p"
        case "$name" in bench_train_*) continue ;; esac
        echo
        echo "## $name (exit $rc): output, last JSON line left out"
        echo
        echo '```text'
        grep -v '^{"bench"' "$log" | grep -v '^USDT' | tail -n 60
        echo '```'
    done
} >"$SUMMARY"
rm -rf "$TMPD"
echo "wrote $SUMMARY ($(( $(date +%s) - START ))s in all)"
