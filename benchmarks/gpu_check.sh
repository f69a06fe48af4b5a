#!/usr/bin/env bash
# The GPU check, one command on a machine with NVIDIA GPUs (docs/benchmarks.md records its figures):
#
#   bash benchmarks/gpu_check.sh            # results and logs under $OUT or ./gpu_results/
#
# 1. a fresh venv on top of the machine's CUDA build of torch (--system-site-packages), the
#    rest from the repo's own files: wheels in $WHEELS (default .whl/, for machines without
#    network) or PyPI pinned by constraints.txt (torch excluded: the machine's own is kept);
# 2. the GPU tests (block backend against dense and knn, outputs and gradients, bf16);
# 3. benchmarks/attention.py at N = 1,048,576: block settings (curve, block size, key blocks),
#    their recall of the true 32 nearest neighbours, knn and dense where they fit;
# 4. 50 steps of configs/large.yaml through the deepspeed launcher on every GPU it finds
#    (a 1,048,576-sensor synthetic store made by launch/preprocess.py, shortened in time so the
#    check fits; tiles, block backend, bf16, ZeRO-2; MLflow off);
# 5. benchmarks/scale.py (one full training step at N = 65,536 / 262,144 / 1,048,576);
# 6. the attention scaling table for N = 16,384 ... 262,144;
# 7. benchmarks/block_breakdown.py at N = 1,048,576: plan, forward, forward + backward, with the
#    backend's tuned FlexAttention settings against FlexAttention's defaults.
# Not in that flow, each as `bash benchmarks/gpu_check.sh run-stage NAME` after `install`:
# peers_extra (the peers' extra built without network) and peers_gpu (docs/peers.md).
# Every stage has its share of a deadline ($BUDGET_S seconds in all, default 560) and logs to
# its own file; a failing stage does not stop the next. summary.txt lists each stage's status.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
SYS_PY=${SYS_PY:-$(command -v python3)}  # the machine's Python with its CUDA torch (before PATH changes)
OUT=${OUT:-$REPO/gpu_results}
mkdir -p "$OUT"
BUDGET_S=${BUDGET_S:-560}
DEADLINE=$(( $(date +%s) + BUDGET_S ))
WORK=${WORK:-/tmp/sit_gpu_check}
mkdir -p "$WORK"
unset DS_ACCELERATOR
export MLFLOW_DISABLE_TELEMETRY=true RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
SUMMARY=$OUT/summary.txt

# stage NAME MAX_SECONDS COMMAND...: run with min(MAX, time left - reserve) seconds; a
# function of this script runs as `bash THIS_SCRIPT run-stage FUNCTION` (timeout needs a program)
stage() {
  local name=$1 max=$2; shift 2
  local left=$(( DEADLINE - $(date +%s) - 5 ))
  local limit=$(( max < left ? max : left ))
  if [ "$limit" -lt 20 ]; then
    echo "$name: skipped (no time left)" | tee -a "$SUMMARY"; return 0
  fi
  echo "== $name (up to ${limit}s)"
  local t0=$(date +%s)
  if declare -F "$1" > /dev/null; then set -- bash "$REPO/benchmarks/gpu_check.sh" run-stage "$1"; fi
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local took=$(( $(date +%s) - t0 ))
  local what="ok"
  [ $rc -ne 0 ] && what="FAILED (exit $rc)"
  [ $rc -eq 124 ] && what="TIMED OUT after ${limit}s"
  echo "$name: $what in ${took}s" | tee -a "$SUMMARY"
  tail -n 25 "$OUT/$name.log"
}

install() {
  local venv=$WORK/venv
  rm -rf "$venv"
  "$SYS_PY" -m venv --system-site-packages "$venv" || return 1
  # python3 may itself be a venv (it is on the lent H100/H200 machines): --system-site-packages
  # then shows only the base interpreter's packages, so point at python3's own as well
  "$SYS_PY" -c "import site; print('\n'.join(site.getsitepackages()))" \
    > "$("$venv/bin/python" -c "import site; print(site.getsitepackages()[0])")/_parent.pth"
  local pip="$venv/bin/python -m pip"
  local wheels=${WHEELS:-$REPO/.whl}
  if [ -d "$wheels" ] && ls "$wheels"/*.whl > /dev/null 2>&1; then
    $pip install -q --no-index --no-deps "$wheels"/*.whl || return 1
  else
    grep -v '^torch==' constraints.txt > "$WORK/constraints.txt"
    $pip install -q -c "$WORK/constraints.txt" -e ".[dev]" || return 1
  fi
  "$venv/bin/python" -c "import deepspeed, zarr, dask.distributed, pydantic, torch; print('imports ok', torch.__version__)"
}

PY=$WORK/venv/bin/python
[ -x "$PY" ] || PY=$SYS_PY
# the peers extra (docs/peers.md) without network: tsl, torch-geometric and what they import as
# wheels in $WHEELS/peers; torch-scatter and torch-sparse from their sources, built CPU-only
# against the machine's torch, at -O1 (their kernels are not called: on CUDA tensors tsl's
# Graph WaveNet, DCRNN and AGCRN take torch's own paths, edge_index message passing and
# scatter-add), all extensions at once (setuptools' -j; ninja's one build file per package
# does not allow it). With network and no $WHEELS/peers: pip, as `make bench-peers` does.
# $WHEELS/peers (git-ignored, like .whl/) is filled on a machine with network, for the GPU
# machine's Python (3.12 on the lent ones):
#   pip download -d .whl/peers --no-deps --no-binary :all: --no-build-isolation \
#     torch-scatter==2.1.2 torch-sparse==0.6.18
#   pip download -d .whl/peers --no-deps --python-version 3.12 --only-binary :all: \
#     torch-spatiotemporal==0.9.5 torch-geometric==2.8.1
#   pip download -d .whl/peers --python-version 3.12 --only-binary :all: \
#     --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux_2_28_x86_64 setuptools wheel einops xxhash fsspec jinja2 psutil requests
peers_extra() {
  local dir=${WHEELS:-$REPO/.whl}/peers pip="$PY -m pip"
  if [ ! -d "$dir" ]; then
    grep -v '^torch==' constraints.txt > "$WORK/constraints.txt"
    $pip install -q --no-build-isolation -c "$WORK/constraints.txt" -e ".[peers]" || return 1
    return 0
  fi
  $pip install -q --no-index --find-links "$dir" setuptools wheel einops xxhash fsspec jinja2 \
    psutil requests || return 1
  $pip install -q --no-index --no-deps "$dir"/torch_spatiotemporal-*.whl \
    "$dir"/torch_geometric-*.whl || return 1
  local pids=() pkg
  for pkg in torch_scatter torch_sparse; do
    (
      cd "$WORK" && rm -rf "$pkg"-*/ && tar xzf "$dir/$pkg"-*.tar.gz && cd "$pkg"-*/ &&
        sed -i "s/'-O3'/'-O1'/" setup.py &&
        FORCE_ONLY_CPU=1 "$PY" - "$(nproc)" > build.log 2>&1 <<'PYEOF' &&
import runpy, sys
import torch.utils.cpp_extension as ext
ext.is_ninja_available = lambda: False
sys.argv = ["setup.py", "-q", "build_ext", "-j", sys.argv[1], "bdist_wheel", "-d", "dist"]
runpy.run_path("setup.py", run_name="__main__")
PYEOF
        $pip install -q --no-deps --no-index dist/*.whl >> build.log 2>&1
    ) &
    pids+=($!)
  done
  local rc=0 pid
  for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
  [ $rc -eq 0 ] || { tail -n 30 "$WORK"/torch_s*/build.log; return 1; }
  "$PY" -c "import torch_scatter, torch_sparse, tsl.nn.models; print('peers extra ok')"
}

# benchmarks/peers.py's runs that need a GPU (Graph WaveNet, DCRNN and AGCRN take 3-13 s per
# step on a 2-core CPU), under the protocol of docs/peers.md (to convergence, each model's
# learning rate chosen on validation from the same-size grid): the GPU rows of docs/peers.md.
# Stores are carried or made here; $PEER_JOBS runs at once, for at most $PEERS_S seconds; runs
# cut off by the limit are retrained by the next call (finished ones are kept). The runs'
# metrics and per-window errors go to $OUT/peers.tgz, for `make bench-peers` to summarise with
# the CPU runs (unpacked into runs/peers/).
peers_gpu() {
  local end=$(( $(date +%s) + ${PEERS_S:-480} )) rc=0
  local common=(--train-only --jobs "${PEER_JOBS:-8}" --out "$WORK/peers")
  left() { local s=$(( end - $(date +%s) )); echo $(( s > 1 ? s : 1 )); }  # 0 would mean no limit
  OMP_NUM_THREADS=2 timeout --kill-after=10 "$(left)" "$PY" benchmarks/peers.py \
    "${common[@]}" --datasets los_loop aqi36 --models graph_wavenet dcrnn agcrn || rc=1
  OMP_NUM_THREADS=2 timeout --kill-after=10 "$(left)" "$PY" benchmarks/peers.py \
    "${common[@]}" --datasets noisy unseen --models ours none stid graph_wavenet dcrnn agcrn ||
    rc=1
  (cd "$WORK/peers" && tar czf "$OUT/peers.tgz" */metrics.json */test_windows.npz) || rc=1
  return $rc
}

export PATH=$WORK/venv/bin:$PATH
LARGE=(
  "data.store=$WORK/large.zarr" "data.overwrite=true" "data.synthetic.num_steps=300"
  "data.train_fraction=0.8" "data.val_fraction=0.1" "dask.workers=8" "dask.threads_per_worker=2"
  "train.steps=50" "train.log_every=10" "train.eval_every=50" "train.eval_batches=8"
  "train.checkpoint_every=50" "train.out_dir=$WORK/runs" "train.resume=never" "tracking.enabled=false"
)
large() {
  "$PY" launch/preprocess.py --config configs/large.yaml "${LARGE[@]}" || return 1
  local launcher=(deepspeed)
  command -v deepspeed > /dev/null || launcher=("$PY" -m deepspeed.launcher.runner)
  "${launcher[@]}" --num_gpus "$NGPU" launch/train.py --config configs/large.yaml "${LARGE[@]}" || return 1
  "$PY" - "$WORK/runs/large/metrics.json" <<'PYEOF'
import json, sys
m = json.load(open(sys.argv[1]))
t = m["timing"]
print(f"steps {m['steps']} on {m['world_size']} x {m['device']} ({m['precision']}): "
      f"{t['step_s']:.3f} s/step, {t['samples_per_s']:.1f} windows/s, data wait "
      f"{t['data_wait_fraction']:.1%}; test MAE {m['test']['mean']['mae']:.4f} "
      f"CRPS {m['test']['mean']['crps']:.4f}; range km layer 0 {m['kernel'][0]['range_km']}")
PYEOF
  cp "$WORK/runs/large/metrics.json" "$OUT/large_metrics.json"
}
NGPU=$(nvidia-smi -L 2>/dev/null | wc -l)
if [ "${1:-}" = run-stage ]; then "$2"; exit $?; fi
: > "$SUMMARY"

# -- 1. environment ------------------------------------------------------------------------
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$SYS_PY" -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
[ "$NGPU" -ge 1 ] || { echo "no NVIDIA GPU found" | tee -a "$SUMMARY"; exit 1; }

stage install 120 install
[ -x "$WORK/venv/bin/python" ] && PY=$WORK/venv/bin/python

# -- 2. GPU tests --------------------------------------------------------------------------
stage gpu_tests 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_block_attention.py -k gpu

# -- 3. attention at N = 1,048,576 ---------------------------------------------------------
stage attention_1m 130 "$PY" benchmarks/attention.py --device cuda --sizes 1048576 \
  --json "$OUT/attention_1m.json"

# -- 4. configs/large.yaml through the deepspeed launcher ----------------------------------
stage large_yaml 240 large

# -- 5. one full training step as N grows --------------------------------------------------
stage scale 120 "$PY" benchmarks/scale.py --json "$OUT/scale.json"

# -- 6. attention scaling table ------------------------------------------------------------
stage attention_scaling 150 "$PY" benchmarks/attention.py --device cuda \
  --sizes 16384 65536 262144 --json "$OUT/attention_scaling.json"

# -- 7. where the block backend's time goes at N = 1,048,576 ---------------------------------
stage block_breakdown 120 "$PY" benchmarks/block_breakdown.py --head-dims 32 64 --key-blocks 8 \
  --bias matern32 --kernel-options null '{}' --json "$OUT/block_breakdown.json"

echo "== summary"
cat "$SUMMARY"
