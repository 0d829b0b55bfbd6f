#!/usr/bin/env bash
# The whole GPU check in one call (the device is lent by the hour): GPU tests, the attention kernels against SDPA
# and the bandwidth floor, a bf16 matmul rate for MFU, and Llama-3.2-1B / Llama-3.1-8B configurations with random
# bf16 weights against HF transformers in the same run: batch-1 decode, batch-64 decode, 2k-token prefill.
#
#   bash benchmarks/gpu_all.sh            # JSON records into $OUT (default benchmarks/results)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
"$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
      'transformers', transformers.__version__, torch.cuda.get_device_name())"

echo "== GPU tests"
"$PY" -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tail -20

echo "== attention kernels"
"$PY" benchmarks/gpu_attention.py --json "$OUT/gpu_attention.json"

echo "== bf16 matmul rate (the MFU denominator)"
"$PY" - <<'PYEOF'
import torch, triton.testing
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
ms = triton.testing.do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median")
print(f"bf16 matmul 8192^3: {2 * 8192 ** 3 / ms / 1e9:.0f} TFLOP/s")
PYEOF

for model in llama-3.2-1b llama-3.1-8b; do
  common=(--model "benchmarks/configs/$model" --load-format dummy --dtype bfloat16 --max-model-len 4096 --compare hf)
  echo "== $model: batch-1 decode"
  "$PY" -m turboinfer bench latency "${common[@]}" --batch-size 1 --input-len 128 --output-len 256 \
      --json "$OUT/gpu_${model}_decode_b1.json"
  echo "== $model: batch-64 decode"
  "$PY" -m turboinfer bench latency "${common[@]}" --batch-size 64 --input-len 128 --output-len 128 \
      --json "$OUT/gpu_${model}_decode_b64.json"
  echo "== $model: 2k-token prefill"
  "$PY" -m turboinfer bench latency "${common[@]}" --batch-size 1 --input-len 2048 --output-len 1 \
      --json "$OUT/gpu_${model}_prefill_2k.json"
done
