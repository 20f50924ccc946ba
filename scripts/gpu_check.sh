#!/usr/bin/env bash
# The GPU session's checks, as one command on the device machine (its own torch/triton):
# the Triton tests, the kernel sweep (with thresholds) and whole-model decode. Logs, CSVs,
# PNG and the tuning file land in $OUT. torchao travels as a wheel in .whl/.
set -u
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD:$PWD/benchmarks PYTHONUNBUFFERED=1 AWQTENSOR_CACHE=/tmp/awqcache
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton, transformers, torchao; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'torchao', torchao.__version__, torch.cuda.get_device_name())"
} > "$OUT/env.txt" 2>&1; cat "$OUT/env.txt"
timeout 120 python3 -m pytest -q -p no:cacheprovider --maxfail=15 tests/test_triton.py > "$OUT/pytest_triton.log" 2>&1
echo "pytest rc=$?"; tail -25 "$OUT/pytest_triton.log"
timeout 200 python3 benchmarks/gpu_kernels.py --write-thresholds --ms 1 4 16 64 256 1024 4096 --out "$OUT" > "$OUT/gpu_kernels.log" 2>&1
echo "gpu_kernels rc=$?"; tail -50 "$OUT/gpu_kernels.log"
timeout 120 python3 benchmarks/gpu_decode.py --out "$OUT" > "$OUT/gpu_decode.log" 2>&1
echo "gpu_decode rc=$?"; tail -15 "$OUT/gpu_decode.log"
cp /tmp/awqcache/triton/*.json "$OUT/" 2>/dev/null; ls "$OUT"
