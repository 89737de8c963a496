#!/usr/bin/env bash
# What a lent GPU machine runs, in one call: the device tests on CUDA, the benchmark, a training run.
#
#   bash bench/gpu_session.sh tests bench bench-air train
#
# Stages (any order, any subset): env, tests, bench-quick, bench (the layer, bf16),
# bench-air (a GLM-4.5-Air-sized layer), bench-air-compile (its forward through torch.compile), train (the tiny model on CUDA with bf16 autocast).
# Results go to $OUT (default /tmp/gpu_out). Wheels in .whl/ (e.g. the transformers version CI
# pins) are installed into /tmp/site first, as the device machine cannot reach a registry.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
PY=${PY:-python3}
status=0
for stage in "${@:-env tests bench}"; do
    echo "=== $stage ($(date -u +%T))"
    case $stage in
    env)
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
        $PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
        ;;
    tests)
        # every test that takes a device, plus the CUDA-only ones; notebooks and the browser run in CI
        $PY -m pytest -p no:cacheprovider -q -n 8 --timeout 300 -m "not browser" \
            --junitxml "$OUT/junit_cuda.xml" \
            tests/test_config.py tests/test_router.py tests/test_moe_parity.py \
            tests/test_dispatch_props.py tests/test_dispatch_fast.py tests/test_balance.py \
            tests/test_model.py tests/test_train.py tests/test_parallel.py 2>&1 | tee "$OUT/tests_cuda.log" | tail -40
        status=$((status | PIPESTATUS[0]))
        ;;
    bench-quick)
        $PY -m glm4moe_lib.bench --quick --device cuda --out "$OUT/results_cuda_quick.json" || status=1
        ;;
    bench)
        $PY -m glm4moe_lib.bench --device cuda --out "$OUT/results_cuda.json" 2>&1 | tail -30
        status=$((status | PIPESTATUS[0]))
        ;;
    bench-air)
        $PY -m glm4moe_lib.bench --device cuda --preset glm4.5-air --routing balanced \
            --out "$OUT/results_cuda_air.json" 2>&1 | tail -20
        status=$((status | PIPESTATUS[0]))
        ;;
    bench-air-compile)  # forward through torch.compile beside eager and CUDA graphs
        $PY -m glm4moe_lib.bench --device cuda --preset glm4.5-air --routing balanced --modes forward \
            --strategies auto grouped_mm gather_bmm --hf grouped_mm \
            --out "$OUT/results_cuda_air_compile.json" 2>&1 | tail -12
        status=$((status | PIPESTATUS[0]))
        ;;
    train)
        $PY -m glm4moe_lib.train --preset small --device cuda --steps 300 --out /tmp/gpu_train --no-progress \
            2>&1 | tail -15
        status=$((status | PIPESTATUS[0]))
        cp /tmp/gpu_train/metrics.json "$OUT/train_cuda_metrics.json" 2>/dev/null
        ;;
    *)
        echo "unknown stage $stage"; status=1 ;;
    esac
done
exit $status
