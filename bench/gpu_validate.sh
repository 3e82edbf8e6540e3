#!/usr/bin/env bash
# The one command for a GPU machine: build, test, self-test, sanitize, check and benchmark ckakd in <= 9 minutes.
#
#   bench/gpu_validate.sh OUTDIR          on the GPU machine (nothing is installed from outside)
#   bench/gpu_validate.sh OUTDIR --dry    on a CPU machine: every stage that can run without a GPU runs in reduced
#                                         form (Triton interpreter, C++ extension), the GPU-only ones print what
#                                         they would run
#
# Stages (each timed and logged; a failed stage does not stop the others; exit 1 if any failed):
#   1 env          nvidia-smi, versions, backends before the build
#   2 build        pip install --no-build-isolation --no-deps --no-index -e . (CUDA extension; TORCH_CUDA_ARCH_LIST
#                  defaults to 9.0), then ckakd.backends() must show triton and cuda active
#   3 tests        the kernel test files and the gpu-marked tests, sharded over parallel pytest processes (the
#                  Triton-only files start before the build: Triton compiles on the CPU), one log each
#   4 selftest     python -m ckakd selftest --json (runs beside the tests of stage 3)
#   5 sanitizer    compute-sanitizer memcheck and racecheck on bench/gpu_checks.py sanitizer-cases (beside stage 6)
#   6 checks       bench/gpu_checks.py graphs, determinism, bigoffset
#   7 bench        bench/run_all.py --device cuda (one op at a time, inside what is left of the time budget),
#                  bench/bench_precision.py when present
#
# OUTDIR receives at most 7 files: summary.md, validate.log (every stage's log), selftest.json, tests.xml (the
# pytest shards' JUnit reports merged), bench.csv / bench.md (run_all's and bench_precision's tables; the rows carry
# the GPU name: ready for bench/results/), precision.csv. Environment: PYTHON (default python3), GPU_VALIDATE_BUDGET_S (default 510 s: every time limit fits in it, 9 minutes with the kill grace and the report),
# GPU_VALIDATE_BENCH_ARGS (extra bench/run_all.py arguments), GPU_VALIDATE_SHARDS (parallel pytest processes after
# the build, default 8; 2 with --dry), GPU_VALIDATE_STAGES (comma-separated subset of
# env,build,tests,selftest,sanitizer,checks,bench; the others are reported as skipped).

set -u -o pipefail

usage() { echo "usage: $0 OUTDIR [--dry]" >&2; exit 2; }
[[ $# -ge 1 && $# -le 2 ]] || usage
OUTDIR=$1
DRY=0
if [[ $# -eq 2 ]]; then [[ $2 == --dry ]] || usage; DRY=1; fi
[[ $OUTDIR == --* ]] && usage

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$OUTDIR" || exit 2
OUT=$(cd "$OUTDIR" && pwd)
rm -f "$OUT"/summary.md "$OUT"/validate.log "$OUT"/selftest.json "$OUT"/tests.xml "$OUT"/bench.csv \
  "$OUT"/bench.md "$OUT"/precision.csv
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_validate.XXXXXX") || exit 2
trap 'rm -rf "$WORK"' EXIT
cd "$REPO" || exit 2

PY=${PYTHON:-$(command -v python3 || command -v python)}
BUDGET=${GPU_VALIDATE_BUDGET_S:-510}
BENCH_ARGS=${GPU_VALIDATE_BENCH_ARGS:-}
if ((DRY)); then SHARDS=${GPU_VALIDATE_SHARDS:-2}; else SHARDS=${GPU_VALIDATE_SHARDS:-8}; fi
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
if ((DRY)); then export TRITON_INTERPRET=${TRITON_INTERPRET:-1}; fi
SECONDS=0

# ----------------------------------------------------------------------------------------------- bookkeeping
STAGES=()             # stage names, in order
declare -A STATUS     # PASS | FAIL | TIMEOUT | SKIP | DRY
declare -A NOTE
declare -A BEGIN
declare -A DURATION
declare -A PID        # background jobs
declare -A JOB_T0
declare -A JOB_LOG
declare -A JOB_RC

log() { printf '[%4ds] %s\n' "$SECONDS" "$*"; }
ALL_STAGES=env,build,tests,selftest,sanitizer,checks,bench
STAGE_LIST=${GPU_VALIDATE_STAGES:-$ALL_STAGES}
want() { [[ ",$STAGE_LIST," == *",$1,"* ]]; }
skip_stage() { stage_begin "$1"; stage_end "$1" SKIP "not selected (GPU_VALIDATE_STAGES=$STAGE_LIST)"; }
for s in ${STAGE_LIST//,/ }; do
  [[ ",$ALL_STAGES," == *",$s,"* ]] || { echo "GPU_VALIDATE_STAGES: unknown stage '$s' (stages: $ALL_STAGES)" >&2; exit 2; }
done
left() { echo $((BUDGET - SECONDS)); }
# budget CAP RESERVE: seconds for the next command, at most CAP, keeping RESERVE for the stages after it
budget() { local b=$(($(left) - $2)); ((b > $1)) && b=$1; ((b < 0)) && b=0; echo "$b"; }

stage_begin() { STAGES+=("$1"); BEGIN[$1]=$SECONDS; STATUS[$1]=PASS; NOTE[$1]=""; log "stage $1: start"; }
stage_end() {  # NAME [STATUS] [NOTE]
  local s=${2:-${STATUS[$1]}}
  STATUS[$1]=$s
  [[ -n ${3:-} ]] && NOTE[$1]="${NOTE[$1]:+${NOTE[$1]}; }$3"
  DURATION[$1]=$((SECONDS - BEGIN[$1]))
  log "stage $1: $s (${DURATION[$1]} s)${NOTE[$1]:+ - ${NOTE[$1]}}"
}
stage_fail() { STATUS[$1]=FAIL; NOTE[$1]="${NOTE[$1]:+${NOTE[$1]}; }$2"; }

# job_start NAME LOG SECONDS CMD...: run CMD in the background under `timeout`, output to LOG
job_start() {
  local name=$1 file=$2 limit=$3; shift 3
  JOB_LOG[$name]=$file
  JOB_T0[$name]=$SECONDS
  { echo "\$ $*"; echo "(time limit ${limit} s)"; } >"$file"
  if ((limit <= 0)); then
    echo "not run: the time budget is spent" >>"$file"
    (exit 124) &
  else
    timeout -k 10 "$limit" "$@" >>"$file" 2>&1 &
  fi
  PID[$name]=$!
}
# job_wait NAME: wait for it; JOB_RC[NAME] = exit status (124/137: timed out)
job_wait() {
  local name=$1 rc
  wait "${PID[$name]}"; rc=$?
  JOB_RC[$name]=$rc
  echo "(exit status $rc after $((SECONDS - JOB_T0[$name])) s)" >>"${JOB_LOG[$name]}"
  return "$rc"
}
# job_verdict STAGE NAME [OK_CODES...]: fold a finished job into its stage's status
job_verdict() {
  local stage=$1 name=$2; shift 2
  local rc=${JOB_RC[$name]} ok
  for ok in 0 "$@"; do [[ $rc == "$ok" ]] && return 0; done
  if [[ $rc == 124 || $rc == 137 ]]; then
    [[ ${STATUS[$stage]} == FAIL ]] || STATUS[$stage]=TIMEOUT
    NOTE[$stage]="${NOTE[$stage]:+${NOTE[$stage]}; }$name timed out"
  else
    stage_fail "$stage" "$name exited $rc"
  fi
}
run_job() { job_start "$@"; job_wait "$1"; }   # foreground: NAME LOG SECONDS CMD...

# Python one-liners shared by the stages
py_backends() {  # WHAT: print ckakd.backends(); with "require a b", exit 1 unless those are active
  "$PY" - "$@" <<'PYEOF'
import sys
import ckakd
status = ckakd.backends()
for b in status.values():
    print(b)
need = sys.argv[2:] if len(sys.argv) > 1 and sys.argv[1] == "require" else []
missing = [f"{n} ({status[n].detail})" for n in need if not status[n].active]
if missing:
    print("INACTIVE: " + "; ".join(missing))
    sys.exit(1)
PYEOF
}

# shard_tests NAME PYTEST_ARGS...: collect the tests, cut them into $SHARDS contiguous groups of whole test
# functions with about the same number of tests, and print one file of node ids per shard
shard_tests() {
  local name=$1; shift
  local collect="$WORK/collect-$name.txt"
  timeout -k 5 120 "$PY" -m pytest --collect-only -q -p no:cacheprovider "$@" >"$collect" 2>&1
  "$PY" - "$collect" "$WORK/shard-$name" "$SHARDS" <<'PYEOF'
import collections, sys
collect, prefix, shards = sys.argv[1], sys.argv[2], int(sys.argv[3])
counts = collections.OrderedDict()
for line in open(collect, encoding="utf-8", errors="replace"):
    line = line.strip()
    if "::" in line and not line.startswith(("ERROR", "FAILED", "=")):
        counts[line.split("[", 1)[0]] = counts.get(line.split("[", 1)[0], 0) + 1
if not counts:
    sys.exit(0)
total = sum(counts.values())
shards = max(1, min(shards, len(counts)))
groups, current, done = [], [], 0
for func, n in counts.items():
    current.append(func)
    done += n
    if done >= total * (len(groups) + 1) / shards and len(groups) < shards - 1:
        groups.append(current)
        current = []
if current:
    groups.append(current)
for i, g in enumerate(groups):
    path = f"{prefix}-{i + 1}.txt"
    open(path, "w").write("\n".join(g) + "\n")
    print(path)
PYEOF
}

# start_shards STAGE NAME PYTEST_ARGS...: one background pytest per shard (or per test file if collection failed)
SHARD_JOBS=()
start_shards() {
  local stage=$1 name=$2; shift 2
  local files=() opts=() a
  for a in "$@"; do if [[ $a == tests/* ]]; then files+=("$a"); else opts+=("$a"); fi; done
  local lists
  lists=$(shard_tests "$name" "${opts[@]}" "${files[@]}")
  if [[ -z $lists ]]; then  # collection failed: one process per file, so that the errors are reported
    NOTE[$stage]="${NOTE[$stage]:+${NOTE[$stage]}; }collection of $name failed (see its log): one process per file"
    local i=0
    for a in "${files[@]}"; do i=$((i + 1)); echo "$a" >"$WORK/shard-$name-f$i.txt"; lists+=$'\n'"$WORK/shard-$name-f$i.txt"; done
    cat "$WORK/collect-$name.txt" >>"$WORK/collect-errors.log"
  fi
  local list
  while IFS= read -r list; do
    [[ -z $list ]] && continue
    local id
    id="$name-$(basename "$list" .txt | sed 's/^shard-[^-]*-//')"
    local -a ids
    mapfile -t ids <"$list"
    job_start "pytest-$id" "$WORK/pytest-$id.log" "$(budget 400 "$TEST_RESERVE")" \
      "$PY" -m pytest -q -p no:cacheprovider -o addopts=-ra --junitxml="$WORK/junit-$id.xml" "${opts[@]}" "${ids[@]}"
    SHARD_JOBS+=("pytest-$id")
  done <<<"$lists"
}

# ----------------------------------------------------------------------------------------------- stage 1: env
if want env; then
  stage_begin env
  {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  host: $(uname -a)"
    echo "cpus: $(nproc)  memory: $(free -g 2>/dev/null | awk '/Mem:/ {print $2 " GiB"}')  python: $PY"
    if command -v nvidia-smi >/dev/null; then
      nvidia-smi
      nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap,clocks.max.sm --format=csv
    else
      echo "nvidia-smi: not found$( ((DRY)) && echo ' (dry run on a CPU machine)')"
    fi
    if command -v nvcc >/dev/null; then nvcc --version | tail -2; else echo "nvcc: not found"; fi
    "$PY" - <<'PYEOF'
import importlib, platform
import torch
print(f"python {platform.python_version()}  torch {torch.__version__} (CUDA {torch.version.cuda})"
      f"  cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    print(f"gpu {torch.cuda.get_device_name()}  capability {torch.cuda.get_device_capability()}")
for name in ("triton", "numpy", "scipy", "pytest", "tqdm", "yaml", "ot", "xdist"):
    try:
        print(f"{name} {getattr(importlib.import_module(name), '__version__', '?')}")
    except Exception as exc:
        print(f"{name} not importable ({type(exc).__name__})")
PYEOF
    echo "backends before the build:"
    CKAKD_NO_JIT=1 py_backends
  } >"$WORK/01-env.log" 2>&1 || stage_fail env "version probe failed"
else
  skip_stage env
fi
GPU_NAME=$("$PY" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" 2>/dev/null)
if want env; then
  if ((!DRY)) && [[ $GPU_NAME == cpu || -z $GPU_NAME ]]; then
    stage_fail env "torch sees no CUDA device (use --dry on a CPU machine)"
  fi
  stage_end env
fi

# ----------------------------------------------------------------------------------------------- stage 3, part 1
# The Triton-only test files start now: they need no extension, and Triton compiles on the CPU during the build.
TEST_RESERVE=$((DRY ? 60 : 230))   # what the stages after the tests need at least
KERNEL_FILES=(tests/ops/test_gram_kernels.py tests/ops/test_frobenius_kernels.py tests/ops/test_column_mean_kernels.py
  tests/ops/test_patch_alignment_stats_kernels.py tests/ops/test_kernel_launch.py)
OTHER_FILES=(tests/ops/test_sinkhorn_ext.py tests/ops/test_centered_gram.py tests/ops/test_alignment_stats.py
  tests/ops/test_patch_alignment_stats.py tests/ops/test_backend.py tests/losses/test_cka.py tests/losses/test_patch_cka.py
  tests/ops/test_fast_paths.py)
PYTEST_MARK=(-m "not slow")   # the slow JIT-fallback test rebuilds the whole extension (minutes with nvcc)
if ((DRY)); then
  KERNEL_FILES=(tests/ops/test_kernel_launch.py tests/ops/test_gram_kernels.py)
  OTHER_FILES=(tests/ops/test_sinkhorn_ext.py tests/losses/test_patch_cka.py)
  DRY_K_A="grid_limits or empty_grid or 1x7x37 or bad_input"
  DRY_K_B="schemas or status_and_has_cuda or 1x2 or bad_inputs"
fi
existing() { local f; for f in "$@"; do [[ -f $f ]] && echo "$f"; done; }
mapfile -t KERNEL_FILES < <(existing "${KERNEL_FILES[@]}")
mapfile -t OTHER_FILES < <(existing "${OTHER_FILES[@]}")
GPU_MARKED=()  # files with gpu-marked tests beyond those: only their -m gpu tests (GPU runs only)
if ((!DRY)); then
  mapfile -t GPU_MARKED < <(grep -rl --include="test_*.py" "mark.gpu" tests 2>/dev/null | sort \
    | grep -v -x -F -f <(printf '%s\n' "${KERNEL_FILES[@]}" "${OTHER_FILES[@]}"))
fi
SAVED_SHARDS=$SHARDS
if want tests; then
  stage_begin tests
  if ((DRY)); then
    start_shards tests kernels "${PYTEST_MARK[@]}" -k "$DRY_K_A" "${KERNEL_FILES[@]}"
  else
    SHARDS=4
    CKAKD_NO_JIT=1 start_shards tests kernels "${PYTEST_MARK[@]}" "${KERNEL_FILES[@]}"
    SHARDS=$SAVED_SHARDS
  fi
fi

# ----------------------------------------------------------------------------------------------- stage 2: build
if ! want build; then
  skip_stage build
elif ((DRY)); then
  stage_begin build
  {
    echo "dry run: would run"
    echo "  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=\$(nproc) $PY -m pip install --no-build-isolation --no-deps --no-index -e ."
    echo "  (fallback: $PY setup.py build_ext --inplace), then require ckakd.backends() triton and cuda active."
    echo "CPU stand-in: the extension already built here must load (cpp) and triton must be active:"
    py_backends require triton cpp
  } >"$WORK/02-build.log" 2>&1
  rc=$?
  stage_end build "$( ((rc == 0)) && echo DRY || echo FAIL)" "no build on the CPU (a CPU build takes minutes); checked the existing one"
else
  stage_begin build
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
  export MAX_JOBS=${MAX_JOBS:-$(nproc)}
  run_job pip "$WORK/02-build.log" "$(budget 240 280)" \
    "$PY" -m pip install --no-build-isolation --no-deps --no-index --no-cache-dir -e .
  if [[ ${JOB_RC[pip]} != 0 ]]; then
    NOTE[build]="pip install -e failed (exit ${JOB_RC[pip]}): fell back to setup.py build_ext --inplace"
    run_job build_ext "$WORK/02-build-ext.log" "$(budget 240 250)" "$PY" setup.py build_ext --inplace
    cat "$WORK/02-build-ext.log" >>"$WORK/02-build.log"
    job_verdict build build_ext
  fi
  { echo "backends after the build:"; py_backends require triton cuda; } >>"$WORK/02-build.log" 2>&1 \
    || stage_fail build "triton / cuda not both active after the build (see the log)"
  stage_end build
fi

# ----------------------------------------------------------------------------------------------- stages 3 + 4
if want tests; then
  if ((DRY)); then
    start_shards tests other "${PYTEST_MARK[@]}" -k "$DRY_K_B" "${OTHER_FILES[@]}"
  else
    start_shards tests other "${PYTEST_MARK[@]}" "${OTHER_FILES[@]}"
    if ((${#GPU_MARKED[@]})); then
      SHARDS=2
      start_shards tests gpumarked -m "gpu and not slow" "${GPU_MARKED[@]}"
      SHARDS=$SAVED_SHARDS
    fi
  fi
fi
if want selftest; then  # beside the tests
  stage_begin selftest
  job_start selftest "$WORK/04-selftest.log" "$(budget 150 150)" \
    "$PY" -m ckakd selftest --no-progress --json "$OUT/selftest.json"
  job_wait selftest
  job_verdict selftest selftest
  stage_end selftest
else
  skip_stage selftest
fi
if want tests; then
  for j in "${SHARD_JOBS[@]}"; do job_wait "$j"; job_verdict tests "$j" 5; done
  stage_end tests "" "${#SHARD_JOBS[@]} pytest processes (${KERNEL_FILES[*]} from before the build; then ${OTHER_FILES[*]}${GPU_MARKED[*]:+; -m gpu in ${GPU_MARKED[*]}}); slow tests deselected$( ((DRY)) && echo "; dry: -k subsets under the Triton interpreter")"
else
  skip_stage tests
fi

# ----------------------------------------------------------------------------------------------- stages 5 + 6
SAN_JOBS=()
if want sanitizer; then  # beside the checks
  stage_begin sanitizer
  SAN=""
  for cand in "$(command -v compute-sanitizer 2>/dev/null)" /usr/local/cuda/bin/compute-sanitizer \
    "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer"; do
    if [[ -n $cand && -x $cand ]]; then SAN=$cand; break; fi
  done
  if ((DRY)); then
    job_start san-dry "$WORK/05-sanitizer.log" "$(budget 120 90)" "$PY" bench/gpu_checks.py --dry sanitizer-cases
    SAN_JOBS+=(san-dry)
    NOTE[sanitizer]="dry: sanitizer-cases without compute-sanitizer; on the GPU: ${SAN:-compute-sanitizer} --tool memcheck / racecheck"
  elif [[ -z $SAN ]]; then
    echo "compute-sanitizer not found (PATH, /usr/local/cuda/bin, \$CUDA_HOME/bin)" >"$WORK/05-sanitizer.log"
    STATUS[sanitizer]=SKIP
    NOTE[sanitizer]="compute-sanitizer not found"
  else
    for tool in memcheck racecheck; do
      # one allocation per tensor (no caching allocator), so that an out-of-bounds access hits unowned memory
      job_start "san-$tool" "$WORK/05-sanitizer-$tool.log" "$(budget 150 100)" \
        env PYTORCH_NO_CUDA_MEMORY_CACHING=1 CKAKD_AUTOTUNE=0 "$SAN" --tool "$tool" --error-exitcode 97 \
        --print-limit 30 --target-processes all "$PY" bench/gpu_checks.py sanitizer-cases
      SAN_JOBS+=("san-$tool")
    done
  fi
fi

if want checks; then
  stage_begin checks
  i=0
  for what in graphs determinism bigoffset; do
    i=$((i + 1))
    run_job "checks-$what" "$WORK/06-checks-$i-$what.log" "$(budget 90 70)" \
      "$PY" bench/gpu_checks.py $( ((DRY)) && echo --dry) "$what"
    job_verdict checks "checks-$what"
  done
  stage_end checks "" "$( ((DRY)) && echo 'dry: CPU tensors, the 2**31 limit simulated with a small buffer')"
else
  skip_stage checks
fi

if want sanitizer; then
  for j in "${SAN_JOBS[@]}"; do
    job_wait "$j"
    if [[ ${JOB_RC[$j]} != 0 ]] && grep -q -i -E "device not supported|not supported on this|error 999|unable to (load|attach)" \
      "${JOB_LOG[$j]}"; then
      STATUS[sanitizer]=SKIP
      NOTE[sanitizer]="${NOTE[sanitizer]:+${NOTE[sanitizer]}; }$j: compute-sanitizer cannot attach here (see the log)"
    elif [[ ${JOB_RC[$j]} == 97 ]]; then
      stage_fail sanitizer "$j reported errors"
    else
      job_verdict sanitizer "$j"
    fi
  done
  stage_end sanitizer
else
  skip_stage sanitizer
fi

# ----------------------------------------------------------------------------------------------- stage 7: bench
if want bench; then
  stage_begin bench
  mkdir -p "$WORK/bench" "$WORK/precision"
  if ((DRY)); then
    # shellcheck disable=SC2086
    run_job bench-cpu "$WORK/07-bench.log" "$(budget 300 10)" \
      "$PY" bench/run_all.py --quick --device cpu --out "$WORK/bench" $BENCH_ARGS
    job_verdict bench bench-cpu
  else
    quick=()
    (($(left) < 240)) && quick=(--quick) && NOTE[bench]="--quick presets (little time left)"
    ops=(alignment_stats patch_alignment_stats centered_gram sinkhorn)
    n=${#ops[@]}
    later=10
    [[ -f bench/bench_precision.py ]] && later=50
    for op in "${ops[@]}"; do
      n=$((n - 1))
      limit=$(budget 200 $((n * 25 + later)))
      # shellcheck disable=SC2086
      run_job "bench-$op" "$WORK/07-bench-$op.log" "$limit" \
        "$PY" bench/run_all.py --device cuda "${quick[@]}" --ops "$op" --out "$WORK/bench" $BENCH_ARGS
      job_verdict bench "bench-$op"
    done
  fi
  if [[ -f bench/bench_precision.py ]]; then
    run_job precision "$WORK/07-precision.log" "$(budget 120 10)" \
      "$PY" bench/bench_precision.py --device "$( ((DRY)) && echo cpu || echo cuda)" $( ((DRY)) && echo --quick) \
      --out "$WORK/precision"
    job_verdict bench precision
  else
    NOTE[bench]="${NOTE[bench]:+${NOTE[bench]}; }bench/bench_precision.py not present"
  fi
  "$PY" - "$WORK/bench" "$OUT/bench.csv" "$WORK/precision" "$OUT/precision.csv" "$OUT/bench.md" <<'PYEOF' >>"$WORK/07-bench.log" 2>&1
import csv, glob, os, sys
bench, bench_csv, prec, prec_csv, bench_md = sys.argv[1:]
def merge(folder, target):
    files = sorted(f for f in glob.glob(os.path.join(folder, "**", "*.csv"), recursive=True)
                   if os.path.basename(f) != "history.csv")
    header, rows = None, []
    for f in files:
        with open(f, newline="") as fh:
            r = list(csv.reader(fh))
        if not r:
            continue
        if header is None:
            header = r[0]
        rows += r[1:] if r[0] == header else r
    if header:
        with open(target, "w", newline="") as fh:
            csv.writer(fh).writerows([header] + rows)
        print(f"{target}: {len(rows)} rows from {len(files)} file(s)")
merge(bench, bench_csv)
merge(prec, prec_csv)
mds = sorted(glob.glob(os.path.join(bench, "*.md"))) + sorted(glob.glob(os.path.join(prec, "*.md")))
if mds:
    open(bench_md, "w").write("\n\n".join(open(m).read().strip() for m in mds) + "\n")
PYEOF
  [[ -f $OUT/bench.csv ]] || stage_fail bench "no benchmark CSV was written"
  stage_end bench
else
  skip_stage bench
fi

# ----------------------------------------------------------------------------------------------- the report
"$PY" - "$OUT/tests.xml" "$WORK"/junit-*.xml <<'PYEOF' >"$WORK/merge.log" 2>&1
import sys
import xml.etree.ElementTree as ET
target, sources = sys.argv[1], [s for s in sys.argv[2:] if not s.endswith("*.xml")]
if not sources:
    sys.exit(0)
root = ET.Element("testsuites")
for path in sources:
    try:
        tree = ET.parse(path).getroot()
    except ET.ParseError as exc:
        print(f"{path}: {exc}")
        continue
    for suite in ([tree] if tree.tag == "testsuite" else list(tree)):
        suite.set("name", path.rsplit("junit-", 1)[-1][:-4])
        root.append(suite)
for key in ("tests", "failures", "errors", "skipped"):
    root.set(key, str(sum(int(s.get(key, 0)) for s in root)))
ET.ElementTree(root).write(target, encoding="utf-8", xml_declaration=True)
PYEOF

{
  for s in "${STAGES[@]}"; do printf '%s\t%s\t%s\t%s\t%s\n' "$s" "${STATUS[$s]}" "${BEGIN[$s]}" "${DURATION[$s]:-0}" "${NOTE[$s]}"; done
} >"$WORK/stages.tsv"

# validate.log: every stage's logs, in order
{
  echo "# gpu_validate.sh $OUT$( ((DRY)) && echo ' --dry') on ${GPU_NAME:-?}, $(date -u +%Y-%m-%dT%H:%M:%SZ), ${SECONDS} s"
  for f in "$WORK"/01-env.log "$WORK"/02-build.log "$WORK"/pytest-*.log "$WORK"/collect-errors.log "$WORK"/04-selftest.log \
    "$WORK"/05-sanitizer*.log "$WORK"/06-checks-*.log "$WORK"/07-*.log "$WORK"/merge.log; do
    [[ -f $f ]] || continue
    echo
    echo "=================================================================== $(basename "$f" .log)"
    cat "$f"
  done
} >"$OUT/validate.log"

"$PY" - "$WORK/stages.tsv" "$OUT" "$DRY" "${GPU_NAME:-?}" "$SECONDS" "$BUDGET" <<'PYEOF'
import json, os, re, sys
import xml.etree.ElementTree as ET
stages_tsv, out, dry, gpu, total, budget = sys.argv[1:]
lines = [l.rstrip("\n").split("\t") for l in open(stages_tsv) if l.strip()]
md = [f"# ckakd GPU validation{' (dry run on the CPU)' if dry == '1' else ''}", "",
      f"Machine: **{gpu}**; total {total} s (budget {budget} s). Logs of every stage: `validate.log`.", "",
      "| stage | result | start (s) | time (s) | note |", "|---|---|---|---|---|"]
for name, status, begin, dur, note in lines:
    md.append(f"| {name} | {status} | {begin} | {dur} | {note.replace('|', '/')} |")
st = os.path.join(out, "selftest.json")
if os.path.exists(st):
    r = json.load(open(st))
    s = r["summary"]
    md += ["", "## selftest", "",
           f"{s['pass']} passed, {s['fail']} failed, {s['skip']} skipped in {s['seconds']} s on {r['device']}."]
    md += [f"- FAIL `{c['name']}`: {c['message']}" for c in r["checks"] if c["status"] == "fail"][:40]
tx = os.path.join(out, "tests.xml")
if os.path.exists(tx):
    root = ET.parse(tx).getroot()
    md += ["", "## tests", "", f"{root.get('tests')} tests: {root.get('failures')} failures, {root.get('errors')} errors, "
           f"{root.get('skipped')} skipped ({len(root)} pytest processes)."]
    for case in root.iter("testcase"):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            msg = (bad.get("message") or "").splitlines()[0][:160] if bad.get("message") else ""
            md.append(f"- {case.get('classname')}::{case.get('name')}: {msg}")
log = open(os.path.join(out, "validate.log"), errors="replace").read()
checks = re.findall(r"^(PASS|FAIL) ((?:sanitizer-cases|graphs|determinism|bigoffset)/[^\n]*)$", log, re.M)
if checks:
    md += ["", "## gpu_checks", ""] + [f"- {k} {t}" for k, t in checks]
bm = os.path.join(out, "bench.md")
if os.path.exists(bm):
    targets = [l.rstrip() for l in open(bm) if re.search(r"\b(met|MISSED)\b", l)]
    if targets:
        md += ["", "## benchmark targets", "", "| op | target | measured | status |", "|---|---|---|---|", *targets]
    md += ["", "Full benchmark tables: `bench.md`" + (", rows: `bench.csv`" if os.path.exists(os.path.join(out, "bench.csv")) else "") + "."]
files = sorted(set(os.listdir(out)) | {"summary.md"})
md += ["", "Files: " + ", ".join(f"`{f}`" for f in files)]
open(os.path.join(out, "summary.md"), "w").write("\n".join(md) + "\n")
PYEOF

FAILED=()
for s in "${STAGES[@]}"; do [[ ${STATUS[$s]} == FAIL || ${STATUS[$s]} == TIMEOUT ]] && FAILED+=("$s"); done
echo
printf '%-10s %-8s %6s  %s\n' stage result time note
for s in "${STAGES[@]}"; do printf '%-10s %-8s %5ss  %s\n' "$s" "${STATUS[$s]}" "${DURATION[$s]:-0}" "${NOTE[$s]}"; done
echo "wrote $(ls "$OUT" | wc -l) files to $OUT: $(ls "$OUT" | tr '\n' ' ')"
if ((${#FAILED[@]})); then
  echo "FAILED stages: ${FAILED[*]} ($SECONDS s)"
  exit 1
fi
echo "all stages passed ($SECONDS s)"
