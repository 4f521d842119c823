#!/usr/bin/env bash
# beam-jax on one GPU, in one command of at most 8 minutes on an H200 (README, "GPU"):
#
#   bash bench/gpu_check.sh [--dry-run] [--out DIR] [--budget-s S] [--steps a,b,...]
#
# --steps runs only the named steps after env and build (which always run: a device machine starts bare), for a
# second call that reruns what failed, e.g. --steps cuda_tests,moe_layer.
#
# Output folder: --out, else $OUT (the device tool's folder), else bench/results/gpu_check_<date>. Every step
# logs to logs/<step>.log there, runs under `timeout`, and records its status and time; a failing step never
# stops the later ones. At the end: summary.json (device, date, jax, each step's status and time, what the
# benchmarks measured) and summary.md, next to moe_layer.json and gpu_train.json. Where the folder would hold
# more than 8 files (what the device tool brings back), logs/ is packed into logs.tar.gz.
#
#   step        limit  what
#   env           30s  tools (nvidia-smi, nvcc, cmake, ninja, compute-sanitizer, ncu), Python modules (missing
#                      ones named, by what needs them), jax and its devices, the XLA flags for the sanitizer
#   build        130s  the extension against this machine's jaxlib: pip install --no-deps --no-build-isolation
#                      --no-index -e . (CUDA arch from nvidia-smi: 90a on Hopper), else CMake directly; then
#                      checks that beam_jax._ffi has CUDA kernels registered for the GPU
#   cuda_tests   150s  pytest tests/test_kernel*.py -k cuda (forward and backward) } side by side: correctness,
#   memcheck     150s  compute-sanitizer memcheck on small forward and backward cases } small memory each
#   racecheck    150s  compute-sanitizer racecheck on the same cases    }
#   moe_layer     90s  bench/moe_layer.py, Mixtral-8x7B and Qwen3-30B-A3B layers, device copy bandwidth and
#                      bf16 matmul rate measured in the same run
#   train        110s  bench/gpu_train.py: 20 BEAM training steps of a Qwen3-shaped 2-layer model per expert
#                      path: tokens/s, peak memory, E-fold dense dot in the compiled HLO
#   (summary      20s)
#   Limits sum to 510 s + summary; a step also never gets more than what is left of --budget-s (470 s;
#   the device call passes --budget-s 500). A run on the H200 took 235 s (2026-12-04).
#
# --dry-run (any machine, no GPU needed): everything up to the first GPU call. Reports the tools (nvcc present,
# nvidia-smi absent on a CPU box is fine), checks the FFI headers of this jaxlib and configures CMake (no build),
# collects the CUDA tests, runs the sanitizer cases on the CPU kernel, moe_layer.py with the same flags on tiny
# reduced shapes, gpu_train.py --dry-run (tiny model, 2 steps, every path, the HLO self-test), and writes the
# output folder. Exits 0 when all of that works. tests/test_gpu_check.py runs it.
set -u

SELF=$(readlink -f "${BASH_SOURCE[0]}")
ROOT=$(cd "$(dirname "$SELF")/.." && pwd)

# ---------------------------------------------------------------------------------------------------------
# the steps (each runs as `bash gpu_check.sh --step NAME` under timeout, with GC_* exported)
# ---------------------------------------------------------------------------------------------------------

tool_path() {  # on PATH, else CUDA's usual folders
  local t=$1 p
  p=$(command -v "$t" 2>/dev/null) && { echo "$p"; return 0; }
  for d in /usr/local/cuda/bin /usr/local/cuda-*/bin /opt/nvidia/nsight-compute/*; do
    [ -x "$d/$t" ] && { echo "$d/$t"; return 0; }
  done
  return 1
}

note() { echo "$*" > "$GC_LOGS/$GC_STEP.note"; echo "NOTE: $*"; }

step_env() {
  echo "date: $(date -Is)"
  echo "host: $(uname -a)"
  echo "python: $($PY --version 2>&1) ($(command -v "$PY"))"
  : > "$GC_LOGS/tools.env"
  local t p missing_tools=""
  for t in nvidia-smi nvcc cmake ninja compute-sanitizer ncu; do
    p=$(tool_path "$t") || p=""
    echo "tool $t: ${p:-absent}"
    echo "TOOL_${t//-/_}=$p" >> "$GC_LOGS/tools.env"
    [ -z "$p" ] && missing_tools="$missing_tools $t"
  done
  local smi gpu="" cap=""
  smi=$(tool_path nvidia-smi) && {
    "$smi" || true
    gpu=$("$smi" --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)
    cap=$("$smi" --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' ')
  }
  echo "GPU_NAME=\"$gpu\"" >> "$GC_LOGS/tools.env"
  echo "GPU_CAP=$cap" >> "$GC_LOGS/tools.env"
  p=$(tool_path nvcc) && "$p" --version | tail -2
  GC_GPU="$gpu" GC_MISSING_TOOLS="$missing_tools" "$PY" - <<'EOF'
import importlib.metadata as md, importlib.util, json, os, platform, sys
dry = os.environ["GC_DRY"] == "1"
GROUPS = {  # what needs them
    "beam_jax and every step": ["jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "numpy", "absl", "safetensors"],
    "build": ["pip", "scikit_build_core", "pybind11"],
    "cuda_tests": ["pytest"],
    "not used by these steps (training CLI, HF loading, plots)":
        ["ml_collections", "tensorboardX", "transformers", "tokenizers", "tqdm", "matplotlib", "hypothesis"],
}
DIST = {"orbax.checkpoint": "orbax-checkpoint", "absl": "absl-py", "scikit_build_core": "scikit-build-core",
        "ml_collections": "ml-collections"}
mods, missing = {}, {}
for group, names in GROUPS.items():
    for n in names:
        try:
            found = importlib.util.find_spec(n) is not None
        except Exception:  # noqa: BLE001 - a parent package that fails to import
            found = False
        ver = None
        if found:
            try:
                ver = md.version(DIST.get(n, n))
            except md.PackageNotFoundError:
                ver = "present"
        mods[n] = ver
        if not found:
            missing.setdefault(group, []).append(n)
plugins = {d.metadata["Name"]: d.version for d in md.distributions()
           if (d.metadata["Name"] or "").lower().startswith(("jax-cuda", "jax_cuda"))}
info = {"python": platform.python_version(), "executable": sys.executable, "modules": mods, "missing": missing,
        "jax_plugins": plugins, "gpu": os.environ.get("GC_GPU", ""),
        "missing_tools": os.environ.get("GC_MISSING_TOOLS", "").split()}
try:
    import jax
    info.update(jax=jax.__version__, backend=jax.default_backend(),
                devices=[f"{d.platform}:{d.device_kind}" for d in jax.devices()])
except Exception as e:  # noqa: BLE001
    info.update(jax=None, backend=None, devices=[], jax_error=f"{type(e).__name__}: {e}")
json.dump(info, open(os.path.join(os.environ["GC_LOGS"], "env.json"), "w"), indent=1)
open(os.path.join(os.environ["GC_LOGS"], ".missing"), "w").write(
    "; ".join(f"{g}: {' '.join(n)}" for g, n in missing.items()) or "none")
for group, names in missing.items():
    print(f"MISSING for {group}: {', '.join(names)}")
print(f"jax {info.get('jax')}, backend {info.get('backend')}, devices {info.get('devices')}, plugins {plugins}")
bad = [g for g in missing if not g.startswith("not used")]
if not dry and info.get("backend") != "gpu":
    print("no GPU visible to jax")
    bad.append("gpu")
if dry:
    bad = [g for g in bad if g.startswith("beam_jax")]
sys.exit(1 if bad else 0)
EOF
  local rc=$?
  # XLA flags for the sanitizer runs (no autotuning, no command buffers), only if this XLA accepts them
  local flags="--xla_gpu_autotune_level=0 --xla_gpu_enable_command_buffer="
  if [ "$GC_DRY" = 1 ]; then
    echo "(dry run) sanitizer XLA flags not probed: $flags"
  elif XLA_FLAGS="$flags" XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 60 "$PY" -c \
      "import jax, jax.numpy as jnp; jnp.ones(4).block_until_ready()" >/dev/null 2>&1; then
    echo "$flags" > "$GC_LOGS/san_xla_flags"
    echo "sanitizer XLA flags: $flags"
  else
    : > "$GC_LOGS/san_xla_flags"
    echo "this XLA refused '$flags': sanitizer runs use none"
  fi
  note "${gpu:-no GPU}; tools absent:${missing_tools:- none}; modules missing: $(cat "$GC_LOGS/.missing" 2>/dev/null)"
  rm -f "$GC_LOGS/.missing"
  return $rc
}

build_arch() {  # CUDA architectures for this GPU: Hopper needs 90a for the wgmma kernels
  case "${GPU_CAP:-}" in
    9.0) echo "90a" ;;
    "") echo "80;90a" ;;
    *) echo "${GPU_CAP//./}" ;;
  esac
}

step_build() {
  # shellcheck disable=SC1090
  . "$GC_LOGS/tools.env"
  local nvcc=$TOOL_nvcc arch bdir=${GC_BUILD_DIR:-/tmp/beam-jax-build}
  arch=$(build_arch)
  [ -n "$nvcc" ] && { export PATH="$(dirname "$nvcc"):$PATH"; export CUDACXX="$nvcc"; }
  local pipcmd=("$PY" -m pip install --no-deps --no-build-isolation --no-index -e "$ROOT"
                "--config-settings=cmake.define.CMAKE_CUDA_ARCHITECTURES=$arch"
                "--config-settings=build-dir=$bdir/pip")
  if [ "$GC_DRY" = 1 ]; then
    "$PY" - <<'EOF' || return 1
import os, jax, jax.ffi
d = jax.ffi.include_dir()
h = os.path.join(d, "xla", "ffi", "api", "ffi.h")
print("jax", jax.__version__, "FFI headers:", d, "ffi.h present:", os.path.exists(h))
import pybind11, scikit_build_core
print("pybind11", pybind11.__version__, "scikit-build-core", scikit_build_core.__version__)
assert os.path.exists(h)
EOF
    echo "(dry run) would run: ${pipcmd[*]}"
    if [ -z "$TOOL_cmake" ]; then
      note "dry run: FFI headers found; cmake absent here, CMake configure not checked"
      return 0
    fi
    local tmp gen=()
    tmp=$(mktemp -d)
    [ -n "$TOOL_ninja" ] && gen=(-G Ninja)
    "$TOOL_cmake" -S "$ROOT" -B "$tmp" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release \
      -DPython_EXECUTABLE="$(command -v "$PY")" -DCMAKE_CUDA_ARCHITECTURES="$arch"
    local rc=$?
    rm -rf "$tmp"
    [ $rc = 0 ] && note "dry run: FFI headers found, CMake configure ok (nvcc ${nvcc:-absent}, arch $arch); not built"
    return $rc
  fi
  echo "CUDA arch $arch (compute capability ${GPU_CAP:-unknown}), nvcc ${nvcc:-absent}"
  local how
  if "${pipcmd[@]}"; then
    how="pip install -e (no deps, no build isolation)"
  else
    echo "pip install failed: building with CMake directly, _ffi copied into beam_jax/"
    local gen=()
    [ -n "$TOOL_ninja" ] && gen=(-G Ninja)
    "${TOOL_cmake:-cmake}" -S "$ROOT" -B "$bdir/cmake" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release \
      -DPython_EXECUTABLE="$(command -v "$PY")" -DCMAKE_CUDA_ARCHITECTURES="$arch" &&
      "${TOOL_cmake:-cmake}" --build "$bdir/cmake" -j "$(nproc)" &&
      cp "$bdir"/cmake/_ffi*.so "$ROOT/beam_jax/" || { note "build failed (pip and CMake)"; return 1; }
    how="CMake directly"
  fi
  XLA_PYTHON_CLIENT_PREALLOCATE=false "$PY" - <<'EOF'
import sys
import jax
from beam_jax import _ffi, kernel as mm
print("beam_jax._ffi:", _ffi.__file__)
print("CUDA compiled:", _ffi.cuda_compiled(), "CUDA targets:", sorted(_ffi.cuda_registrations()))
print("jax", jax.__version__, jax.devices(), "ffi on gpu:", mm.ffi_available("gpu"))
sys.exit(0 if _ffi.cuda_compiled() and mm.ffi_available("gpu") else 1)
EOF
  local rc=$?
  note "built with $how, arch $arch; CUDA kernels registered: $([ $rc = 0 ] && echo yes || echo NO)"
  return $rc
}

step_cuda_tests() {
  # every kernel test file, so CUDA tests added beside tests/test_kernel.py (named *cuda*) run too; in this one
  # process (-o addopts= drops pyproject's pytest-xdist workers: one GPU, and pytest-xdist may be absent here)
  local args=(-m pytest tests/test_kernel*.py -k cuda -q -rs -p no:cacheprovider -o addopts=)
  if [ "$GC_DRY" = 1 ]; then
    local n
    "$PY" "${args[@]}" --collect-only | tee "$GC_LOGS/.collect"
    n=$(grep -cE '::test_' "$GC_LOGS/.collect")
    rm -f "$GC_LOGS/.collect"
    note "dry run: $n CUDA tests collected"
    [ "$n" -gt 0 ]
    return
  fi
  XLA_PYTHON_CLIENT_PREALLOCATE=false "$PY" "${args[@]}"
  local rc=$? line
  line=$(grep -E '[0-9]+ (passed|failed|skipped)' "$GC_LOGS/$GC_STEP.log" | tail -1)
  note "${line:-no pytest summary}"
  if [ $rc = 0 ] && ! echo "$line" | grep -q passed; then
    note "no CUDA test ran: ${line}"
    return 1
  fi
  return $rc
}

write_sanitizer_cases() {
  cat > "$1" <<'EOF'
"""Small masked-expert kernel cases for compute-sanitizer (written by bench/gpu_check.sh).

Inputs are made on the host and the reference is computed on the CPU, so the GPU runs (almost) only the
kernel's own launches and a few copies.
"""
import sys
import jax
import jax.numpy as jnp
import numpy as np

sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]  # the test modules import their helpers (procs) bare
from tests.test_kernel import assert_matches, make_inputs  # noqa: E402
from beam_jax import kernel as mm  # noqa: E402
from beam_jax.experts import experts_reference  # noqa: E402

dev, cpu = jax.devices()[0], jax.devices("cpu")[0]
fn = jax.jit(lambda *a: mm.masked_moe(*a, backend="ffi"))
poisoned = jax.jit(mm._masked_moe_ffi_poisoned)
n = 0
quick = sys.argv[2:] == ["quick"]  # the dry run: two cases, float32
shapes = [(1, 8, 12, 4, 2), (7, 13, 21, 5, 3), (64, 256, 512, 16, 4)]  # one token; odd sizes; several tiles
for shape in shapes[:2] if quick else shapes:
    for dt in (jnp.float32,) if quick else (jnp.float32, jnp.bfloat16, jnp.float16):
        host = make_inputs(*shape, dtype=dt, seed=sum(shape))
        args = jax.device_put(host, dev)
        ref = experts_reference(*jax.device_put(host, cpu))
        for f in (fn, poisoned):
            assert_matches(jax.device_put(f(*args), cpu), ref, dt)
            n += 1
# the backward targets (full: the expert-weight gradients too), against the reference's VJP on the CPU
from tests.test_kernel_vjp import assert_grads, make, up32, vjp_of  # noqa: E402

for shape in shapes[:2] if quick else shapes:
    for dt in (jnp.float32,) if quick else (jnp.float32, jnp.bfloat16):
        a, g = make(*shape, dtype=dt, seed=sum(shape) + 1)
        _, got = jax.jit(lambda a_, g_: vjp_of(lambda *z: mm.masked_moe(*z, backend="ffi"), a_, g_))(
            jax.device_put(a, dev), jax.device_put(g, dev))
        _, want = jax.jit(lambda a_, g_: vjp_of(experts_reference, a_, g_))(
            jax.device_put(up32(a), cpu), jax.device_put(g.astype(jnp.float32), cpu))
        assert_grads(jax.device_get(got), jax.device_get(want), dt, f"backward {shape}")
        n += 1
host = list(make_inputs(9, 16, 24, 4, 2))
host[6] = jnp.zeros_like(host[6])  # every pair dropped: the rows must be written as zeros
y = jax.device_put(poisoned(*jax.device_put(host, dev)), cpu)
np.testing.assert_array_equal(np.asarray(y), 0.0)
n += 1
print(f"sanitizer cases on {dev.platform}: {n} ok")
EOF
}

step_sanitize() {  # memcheck | racecheck
  local tool=$1 cases="$GC_LOGS/sanitizer_cases.py"
  # shellcheck disable=SC1090
  . "$GC_LOGS/tools.env"
  if [ "$GC_DRY" = 1 ]; then
    if [ "$tool" = memcheck ]; then  # the cases themselves, on the CPU kernel
      JAX_PLATFORMS=cpu "$PY" "$cases" "$ROOT" quick || return 1
    else
      "$PY" -m py_compile "$cases" || return 1
    fi
    note "dry run: compute-sanitizer ${TOOL_compute_sanitizer:-absent}; cases $([ "$tool" = memcheck ] && echo ran on CPU || echo compiled)"
    return 0
  fi
  if [ -z "$TOOL_compute_sanitizer" ]; then
    note "compute-sanitizer absent"
    return 3
  fi
  XLA_FLAGS="$(cat "$GC_LOGS/san_xla_flags" 2>/dev/null)" XLA_PYTHON_CLIENT_PREALLOCATE=false \
    XLA_PYTHON_CLIENT_ALLOCATOR=platform \
    "$TOOL_compute_sanitizer" --tool "$tool" --error-exitcode 9 --print-limit 50 "$PY" "$cases" "$ROOT"
  local rc=$? log="$GC_LOGS/$GC_STEP.log" summary ours
  summary=$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$log" | tail -1)
  ours=$(grep -E '^========= .*(beam::cuda|GroupedGemm|BwdGemm|SwigluBwdKernel|CountKernel|ScanKernel|ScatterKernel|CombineKernel)' "$log" | wc -l)
  if [ $rc = 0 ] && grep -q 'sanitizer cases on gpu' "$log"; then
    note "${summary:-no summary}"
    return 0
  fi
  if [ $rc = 9 ] && [ "$ours" = 0 ] && grep -q 'sanitizer cases on gpu' "$log"; then
    note "reports outside the beam kernels only (${summary}); see the log"
    return 4
  fi
  note "rc $rc; ${summary:-no summary}; report lines naming beam kernels: $ours"
  return 1
}

step_moe_layer() {
  local out="$GC_OUT/moe_layer.json"
  if [ "$GC_DRY" = 1 ]; then
    # the GPU run's flags on the smaller reduced layer (CPU time: the weights are drawn on the host)
    "$PY" bench/moe_layer.py --models mixtral --shapes reduced --tokens 1 --kept 1.0 --backends ffi \
      --repeats 1 --time-cap-s 5 --out "$out" || return 1
  else
    "$PY" bench/moe_layer.py --models mixtral,qwen3 --shapes full --tokens 1,16,256,4096 --kept 1.0,0.5,0.15 \
      --backends ffi,grouped,tokamax,reference --repeats 5 --time-cap-s 5 --out "$out" || return 1
  fi
  "$PY" - "$out" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
env = d.get("env", {})
bits = [f"{len(d.get('rows', []))} rows"]
if "copy_bytes_per_s" in env:
    bits.append(f"copy {env['copy_bytes_per_s'] / 1e12:.2f} TB/s")
if "bf16_matmul_flops" in env:
    bits.append(f"bf16 matmul {env['bf16_matmul_flops'] / 1e12:.0f} TFLOP/s")
if "f32_matmul_flops" in env:
    bits.append(f"f32 matmul {env['f32_matmul_flops'] / 1e9:.1f} GFLOP/s")
failed = [r for r in d.get("rows", []) if str(r.get("skipped", {}).get("ffi", "")).startswith("failed")]
if failed:  # the kernel itself broke: the step fails, whatever the other backends did
    bits.append(f"ffi FAILED in {len(failed)} rows: {failed[0]['skipped']['ffi'][:120]}")
open(sys.argv[1].rsplit("/", 1)[0] + "/logs/moe_layer.note", "w").write(", ".join(bits) + "\n")
print(", ".join(bits))
sys.exit(1 if failed else 0)
EOF
}

step_train() {
  local dir="$GC_LOGS/gpu_train" limit=${GC_LIMIT:-110} rc
  if [ "$GC_DRY" = 1 ]; then
    "$PY" bench/gpu_train.py --dry-run --timeout-s $((limit - 10)) --out "$dir"
  else
    XLA_PYTHON_CLIENT_PREALLOCATE=false "$PY" bench/gpu_train.py --shape qwen3 --steps 20 --with-selftest \
      --timeout-s $((limit - 15)) --out "$dir"
  fi
  rc=$?
  [ -f "$dir/gpu_train.json" ] && cp "$dir/gpu_train.json" "$GC_OUT/gpu_train.json"
  "$PY" - "$dir/gpu_train.json" <<'EOF' > "$GC_LOGS/train.note" 2>/dev/null
import json, sys
d = json.load(open(sys.argv[1]))
parts = []
for r in d["rows"]:
    h = r.get("hlo") or {}
    tps = f"{r['tokens_per_s']:.0f} tok/s" if r.get("tokens_per_s") else "-"
    parts.append(f"{r['path']}: {r.get('status')}, {tps}, E-fold {h.get('e_fold_dense_dot', '-')}")
st = d.get("selftest")
verdict = {True: "ok", False: "FAILED"}.get((st or {}).get("ok"), "skipped")
print("; ".join(parts) + (f"; HLO self-test {verdict}" if st is not None else ""))
EOF
  return $rc
}

if [ "${1:-}" = "--step" ]; then
  GC_STEP=$2
  cd "$ROOT" || exit 1
  case "$2" in
    env) step_env ;;
    build) step_build ;;
    cuda_tests) step_cuda_tests ;;
    memcheck) step_sanitize memcheck ;;
    racecheck) step_sanitize racecheck ;;
    moe_layer) step_moe_layer ;;
    train) step_train ;;
    *) echo "unknown step $2" >&2; exit 2 ;;
  esac
  exit $?
fi

# ---------------------------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------------------------

DRY=0
OUT_DIR=""
BUDGET_S=470
ONLY=""
DRY_LIMIT_S=${GC_DRY_LIMIT_S:-300}
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1; BUDGET_S=$(( DRY_LIMIT_S + 60 )) ;;
    --out) OUT_DIR=$2; shift ;;
    --out=*) OUT_DIR=${1#--out=} ;;
    --budget-s) BUDGET_S=$2; shift ;;
    --steps) ONLY=$2; shift ;;
    --steps=*) ONLY=${1#--steps=} ;;
    -h|--help) sed -n '2,/^set -u/p' "$SELF" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

for s in ${ONLY//,/ }; do
  case "$s" in env|build|cuda_tests|memcheck|racecheck|moe_layer|train) ;;
    *) echo "unknown step in --steps: $s (env build cuda_tests memcheck racecheck moe_layer train)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
STAMP=$(date +%Y%m%d-%H%M%S)
OUT_DIR=${OUT_DIR:-${OUT:-$ROOT/bench/results/gpu_check_$STAMP}}
mkdir -p "$OUT_DIR/logs" || exit 1
OUT_DIR=$(cd "$OUT_DIR" && pwd)
LOGS="$OUT_DIR/logs"
: > "$LOGS/steps.tsv"
export PY ROOT GC_DRY=$DRY GC_OUT="$OUT_DIR" GC_LOGS="$LOGS" PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-1}
if [ "$DRY" = 1 ]; then export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}; fi
T0=$(date +%s)
cd "$ROOT" || exit 1
write_sanitizer_cases "$LOGS/sanitizer_cases.py"
echo "gpu_check: $([ $DRY = 1 ] && echo DRY RUN || echo GPU run), out $OUT_DIR, budget ${BUDGET_S}s, python $PY"

run_step() {  # name limit_s: bash gpu_check.sh --step name, under timeout; one line in steps.tsv
  local name=$1 limit=$2 left t0 rc status dt
  case "$name" in env|build) ;; *)
    if [ -n "$ONLY" ] && ! echo ",$ONLY," | grep -q ",$name,"; then echo "-- $name: not asked for (--steps)"; return; fi ;;
  esac
  # a dry run shares a CPU among all its steps at once: the GPU limits mean nothing there
  [ "$DRY" = 1 ] && limit=$DRY_LIMIT_S
  left=$(( BUDGET_S - ($(date +%s) - T0) - 20 ))  # 20 s kept for the summary
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 10 ]; then
    printf '%s\tskip\t0\t%s\t-\n' "$name" "$limit" >> "$LOGS/steps.tsv"
    echo "out of budget" > "$LOGS/$name.note"
    echo "-- $name: skipped (out of budget)"
    return
  fi
  echo "-- $name: started (limit ${limit}s)"
  t0=$(date +%s.%N)
  GC_LIMIT=$limit timeout --kill-after=5 "$limit" bash "$SELF" --step "$name" > "$LOGS/$name.log" 2>&1
  rc=$?
  dt=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  case $rc in
    0) status=pass ;;
    3) status=skip ;;
    4) status=warn ;;
    124|137) status=timeout; echo "timed out after ${limit}s" >> "$LOGS/$name.note" ;;
    *) status=fail ;;
  esac
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$dt" "$limit" "$rc" >> "$LOGS/steps.tsv"
  echo "-- $name: $status (${dt}s, rc $rc)$( [ -f "$LOGS/$name.note" ] && echo ": $(head -c 300 "$LOGS/$name.note")")"
}

run_step env 30
if [ "$DRY" = 1 ]; then
  # no timings on a CPU: everything side by side
  for s in "build 130" "cuda_tests 100" "memcheck 100" "racecheck 100" "moe_layer 90" "train 110"; do
    run_step $s &
  done
  wait
else
  run_step build 130
  run_step cuda_tests 150 &
  run_step memcheck 150 &
  run_step racecheck 150 &
  wait
  run_step moe_layer 90
  run_step train 110
fi

# ---------------------------------------------------------------------------------------------------------
# summary.json, summary.md; pack logs/ where the folder would hold more than 8 files
# ---------------------------------------------------------------------------------------------------------
GC_TOTAL=$(( $(date +%s) - T0 )) GC_BUDGET=$BUDGET_S timeout 30 "$PY" - <<'EOF'
import json, os, time
out, logs, dry = os.environ["GC_OUT"], os.environ["GC_LOGS"], os.environ["GC_DRY"] == "1"


def load(p):
    try:
        return json.load(open(p))
    except (OSError, ValueError):
        return None


env = load(os.path.join(logs, "env.json")) or {}
steps = []
for line in open(os.path.join(logs, "steps.tsv")):
    name, status, sec, limit, rc = (line.rstrip("\n").split("\t") + [""] * 5)[:5]
    try:
        note = open(os.path.join(logs, f"{name}.note")).read().strip()
    except OSError:
        note = ""
    steps.append({"name": name, "status": status, "seconds": float(sec), "limit_s": int(limit),
                  "rc": rc, "note": note, "log": f"logs/{name}.log"})
order = ["env", "build", "cuda_tests", "memcheck", "racecheck", "moe_layer", "train"]
steps.sort(key=lambda s: order.index(s["name"]) if s["name"] in order else 99)
moe = load(os.path.join(out, "moe_layer.json"))
train = load(os.path.join(out, "gpu_train.json"))
summary = {
    "mode": "dry-run" if dry else "gpu",
    "device": env.get("gpu") or "none (no nvidia-smi)",
    "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    "python": env.get("python"), "jax": env.get("jax"), "jax_backend": env.get("backend"),
    "jax_devices": env.get("devices"), "jax_plugins": env.get("jax_plugins"),
    "modules_missing": env.get("missing", {}), "tools_absent": env.get("missing_tools", []),
    "budget_s": int(os.environ["GC_BUDGET"]), "total_s": int(os.environ["GC_TOTAL"]),
    "steps": steps,
    "ok": all(s["status"] in ("pass", "warn") for s in steps),
}
if moe:
    e = moe.get("env", {})
    summary["moe_layer"] = {k: e.get(k) for k in ("platform", "dtype", "shapes", "copy_bytes_per_s",
                                                  "bf16_matmul_flops", "f32_matmul_flops") if k in e}
    summary["moe_layer"]["rows"] = len(moe.get("rows", []))
if train:
    summary["train"] = [{"path": r["path"], "status": r.get("status"), "tokens": r.get("tokens"),
                         "tokens_per_s": r.get("tokens_per_s"), "peak_memory_bytes": r.get("peak_memory_bytes"),
                         "e_fold_dense_dot": (r.get("hlo") or {}).get("e_fold_dense_dot"),
                         "max_fold": (r.get("hlo") or {}).get("max_fold"), "steps_run": r.get("steps_run")}
                        for r in train.get("rows", [])]
    summary["hlo_selftest"] = train.get("selftest")
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)

md = [f"# gpu_check {summary['mode']}: {summary['device']}", "",
      f"{summary['date']}; python {summary['python']}, jax {summary['jax']} ({summary['jax_backend']}); "
      f"{summary['total_s']} s of {summary['budget_s']} s", ""]
if summary["modules_missing"]:
    md += ["Missing modules: " + "; ".join(f"{g}: {', '.join(n)}" for g, n in summary["modules_missing"].items()), ""]
md += ["| step | status | s | limit s | note |", "| --- | --- | --- | --- | --- |"]
md += [f"| {s['name']} | {s['status']} | {s['seconds']:.0f} | {s['limit_s']} | {s['note'].replace('|', '/')[:300]} |"
       for s in steps]
if moe:
    m = summary["moe_layer"]
    bits = []
    if m.get("copy_bytes_per_s"):
        bits.append(f"device copy {m['copy_bytes_per_s'] / 1e12:.2f} TB/s (read + write)")
    if m.get("bf16_matmul_flops"):
        bits.append(f"bf16 matmul {m['bf16_matmul_flops'] / 1e12:.0f} TFLOP/s")
    if m.get("f32_matmul_flops"):
        bits.append(f"f32 matmul {m['f32_matmul_flops'] / 1e9:.1f} GFLOP/s")
    md += ["", f"moe_layer.json: {m['rows']} rows ({m.get('shapes')} shapes, {m.get('dtype')}); " + ", ".join(bits)]
if train:
    md += ["", "| path | status | tokens | tokens/s | peak GiB | E-fold dense dot | max fold | steps |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in summary["train"]:
        tps = f"{r['tokens_per_s']:.0f}" if r.get("tokens_per_s") else "-"
        mem = f"{r['peak_memory_bytes'] / 2**30:.2f}" if r.get("peak_memory_bytes") else "-"
        md.append(f"| {r['path']} | {r['status']} | {r.get('tokens', '-')} | {tps} | {mem} | "
                  f"{r.get('e_fold_dense_dot', '-')} | {r.get('max_fold', '-')} | {r.get('steps_run', '-')} |")
open(os.path.join(out, "summary.md"), "w").write("\n".join(md) + "\n")
print("\n".join(md))
EOF
files=$(find "$OUT_DIR" -type f | wc -l)
if [ "$files" -gt 8 ]; then
  tar -czf "$OUT_DIR/logs.tar.gz" -C "$OUT_DIR" logs && rm -rf "$LOGS"
  echo "logs/ packed into logs.tar.gz ($files files would not all come back from the device tool)"
fi
echo "gpu_check: wrote $OUT_DIR: $(cd "$OUT_DIR" && ls | tr '\n' ' ')"
"$PY" -c "import json,sys; sys.exit(0 if json.load(open(sys.argv[1]))['ok'] else 1)" "$OUT_DIR/summary.json"
