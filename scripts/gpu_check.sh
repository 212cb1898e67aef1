#!/usr/bin/env bash
# The GPU checks in one run, for a CUDA machine with torch already installed and no registry access.
#
#   bash scripts/gpu_check.sh [OUT_DIR]
#
# Wheels placed in .whl/ (diffusers, transformers, peft, tomesd: the versions CI uses) are installed
# into /tmp/site first; the project itself is installed without dependencies. Then:
#   1. tests/test_cuda.py (engine, selective scan, every method's processor, LoRA training on CUDA);
#   2. the engine, radial, Hilbert-local, agent, LaMamba and ROICtrl benchmarks in bf16 / fp16 / fp32 on the GPU.
# Each step has its own time limit, so one slow step does not cost the others. Logs, JSON and PNG
# go to OUT_DIR (default outputs/gpu_check). STEPS="test_cuda bench_agent" runs a subset; TEST_ARGS
# is passed to pytest (e.g. "-k agent").
# STEPS="mamba test_cuda bench_lamamba" also builds mamba-ssm's selective-scan kernel from the sdist in
# .whl/ for this GPU only (scripts/build_mamba_scan.py; needs nvcc; the build folder .build/ persists
# while the machine stays warm, so a timed-out build resumes on the next call) beside test_cuda, then
# puts it on PYTHONPATH and reruns the scan and LaMamba tests (step test_mamba) against it;
# bench_lamamba times the scan backends and LaMamba-Diff vs DiT on the GPU.
# STEPS="bench_e2e" runs scripts/bench_gpu_e2e.py (issue 26: end to end at the real model sizes), one
# --stage per process in priority order (engine, wan, flux, unet), each under its own limit from E2E_LIMITS
# (default "engine=90 wan=100 flux=80 unet=90": about 6 minutes on an H100). Every stage rewrites
# OUT_DIR/e2e_<stage>.json after each case, so a stage cut off by its limit keeps what it measured;
# E2E_ARGS is passed to every stage (e.g. "--wan-long full"). bench_e2e is not in the default STEPS.
set -u
STEPS=${STEPS:-test_cuda bench_engine bench_radial bench_hilbert_local bench_agent bench_lamamba bench_roictrl}
OUT_DIR=${1:-outputs/gpu_check}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH  # /tmp/site/bin: ninja, for the mamba build
fi
if ! python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$OUT_DIR/install.log" 2>&1; then
  # no wheel / old setuptools there: lay the installed package out by hand (pyproject's package-dir)
  echo "pip install -e . failed (see install.log); importing the package from /tmp/diffattn_pkg"
  rm -rf /tmp/diffattn_pkg && mkdir -p /tmp/diffattn_pkg && cp -r diffattn /tmp/diffattn_pkg/ &&
    cp -r pipelines /tmp/diffattn_pkg/diffattn/pipelines && cp -r lora /tmp/diffattn_pkg/diffattn/lora || exit 1
  export PYTHONPATH=/tmp/diffattn_pkg${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, diffusers, transformers, peft, accelerate; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__, 'cuda', torch.cuda.is_available())"

step() {  # step NAME SECONDS CMD...: run with a limit, log to OUT_DIR/NAME.log, print the figures
  local name=$1 limit=$2; shift 2
  [[ " $STEPS " == *" $name "* ]] || return 0
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $((SECONDS - t0)) s"
  grep -E '^\[cuda\]|^\[(engine|wan|flux|unet)\]|^== |skipped|passed|failed|FAILED|Error|efficiency|speedup|PASS|FAIL|unet |layer |compiles|px: ' "$OUT_DIR/$name.log" \
    | grep -v 'Warning\|warn(' | cut -c1-260 | tail -n 60
}

MAMBA_PID=
if [[ " $STEPS " == *" mamba "* ]]; then
  # the build is CPU work (nvcc) and test_cuda is mostly GPU work: the build runs beside test_cuda, on
  # all cores but four, and the mamba tests run once it has finished
  mkdir -p .build
  ls -d .build/mamba_ssm-*/ >/dev/null 2>&1 || tar xzf .whl/mamba_ssm-*.tar.gz -C .build || echo "no mamba-ssm sdist in .whl/"
  MAMBA_SRC=$(ls -d .build/mamba_ssm-*/ 2>/dev/null | head -1)
  if ! command -v nvcc >/dev/null; then
    echo "== mamba: no nvcc on this machine: the kernel cannot be built here"
  elif [ -n "$MAMBA_SRC" ]; then
    nproc_build=$(( $(nproc) > 8 ? $(nproc) - 4 : $(nproc) ))
    ( MAX_JOBS=$nproc_build timeout "${MAMBA_LIMIT:-420}" python3 scripts/build_mamba_scan.py "$MAMBA_SRC" \
        --build-dir .build/mamba_ext >"$OUT_DIR/mamba.log" 2>&1; echo $? >/tmp/mamba_build.rc ) &
    MAMBA_PID=$!
    MAMBA_T0=$SECONDS
  fi
fi
step test_cuda "${TEST_LIMIT:-240}" python3 -m pytest tests/test_cuda.py -q -s -p no:cacheprovider -W ignore ${TEST_ARGS:-}
if [ -n "$MAMBA_PID" ]; then
  wait "$MAMBA_PID"
  echo "== mamba build: rc=$(cat /tmp/mamba_build.rc) in $((SECONDS - MAMBA_T0)) s (beside test_cuda)"
  grep -E 'built|imports|error' "$OUT_DIR/mamba.log" | head -12
  PYTHONPATH=$(python3 scripts/build_mamba_scan.py "$MAMBA_SRC" --build-dir .build/mamba_ext --print-path)${PYTHONPATH:+:$PYTHONPATH}
  export PYTHONPATH
  STEPS="$STEPS test_mamba"
fi
step test_mamba "${TEST_LIMIT:-240}" python3 -m pytest tests/test_cuda.py -q -s -p no:cacheprovider -W ignore \
  -k "scan or lamamba"
step bench_lamamba "${BENCH_LIMIT:-120}" python3 scripts/bench_lamamba.py --device cuda --skip-counts \
  --out "$OUT_DIR/bench_lamamba_gpu"
step bench_engine "${BENCH_LIMIT:-120}" python3 scripts/bench_engine.py --lengths 16384 32768 \
  --densities 0.07 0.15 0.3 0.45 1.0 --heads 12 --head-dim 128 --dtype bf16 --repeats 10 \
  --backward-length 16384 --out "$OUT_DIR/bench_engine_gpu"
step bench_radial "${BENCH_LIMIT:-120}" python3 scripts/bench_radial.py --dtype bf16 --backends flex --repeats 10 \
  --out "$OUT_DIR/bench_radial_gpu"
step bench_hilbert_local "${BENCH_LIMIT:-120}" python3 scripts/bench_hilbert_local.py --dtype bf16 --backends flex \
  --repeats 10 --out "$OUT_DIR/bench_hilbert_local_gpu"
step bench_agent "${BENCH_LIMIT:-120}" python3 scripts/bench_agent.py --device cuda --dtype fp16 --sizes 512 1024 \
  --rounds 10 --layer-rounds 10 --out "$OUT_DIR/bench_agent_gpu"
step bench_roictrl "${BENCH_LIMIT:-120}" python3 scripts/bench_roictrl.py --device cuda --dtype fp16 --rounds 10 \
  --out "$OUT_DIR/bench_roictrl_gpu"
if [[ " $STEPS " == *" bench_e2e "* ]]; then
  for spec in ${E2E_LIMITS:-engine=90 wan=100 flux=80 unet=90}; do
    stage=${spec%%=*} limit=${spec#*=}
    STEPS="$STEPS bench_e2e_$stage"
    # --budget-s: what the stage may plan for (wan measures 4x length in full only if it fits), inside its limit
    step "bench_e2e_$stage" "$limit" python3 scripts/bench_gpu_e2e.py --stage "$stage" \
      --budget-s $((limit > 20 ? limit - 10 : limit)) --out-dir "$OUT_DIR" ${E2E_ARGS:-}
  done
fi
