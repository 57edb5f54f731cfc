#!/usr/bin/env bash
# Recaption on a GPU machine, both ways: vLLM engines inside Ray (--backend vllm, Ray Data LLM)
# and `vllm serve` + the HTTP client (--backend openai). Checks first, then times.
#
#   pip install -e '.[vllm]'            # vllm>=0.12 (needs its own torch + CUDA wheels)
#   MODEL=Qwen/Qwen2.5-VL-7B-Instruct N=2000 scripts/recaption_vllm_gpu.sh [WORKDIR]
#
# MODEL may be a local directory (no download at run time) or a Hugging Face id already in the
# cache. FAMILY (qwen2.5-vl | qwen2-vl | qwen3-vl | internvl | generic) sets the box convention
# and sends images already on the model's resize grid (recaption/presets.py), so boxes map back
# exactly. Layers are read through engine.layers.read_layer: committed shards only, never a
# bare *.parquet glob (a killed run's uncommitted files would be counted).
# Expected: every layer row ok or failed-with-reason; the two global layers' ok counts printed;
# images/s for each path in the summaries (put them in bench/README.md with the GPU's name).
set -euo pipefail
MODEL=${MODEL:?set MODEL to a local model directory or a cached Hugging Face id}
N=${N:-2000}
WORK=${1:-/tmp/finevit-vllm}
FAMILY=${FAMILY:-qwen2.5-vl}
PORT=${PORT:-8011}
TP=${TP:-1}
PY=${PY:-python}
FINEVIT=("$PY" -m finevit)
export RAY_AUTH_MODE=disabled

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
"$PY" -c "import vllm, ray; print('vllm', vllm.__version__, 'ray', ray.__version__)"
mkdir -p "$WORK"
DS="$WORK/ds"
[ -f "$DS/dataset.json" ] || "${FINEVIT[@]}" ingest "synthetic://scenes?n=$N&seed=0&size=512" "$DS" --samples-per-shard 500 --no-progress

# 1) in-cluster engines through Ray Data LLM
"${FINEVIT[@]}" recaption "$DS" --backend vllm --model "$MODEL" --layer vllm-global --task global \
  --max-tokens 512 --no-progress --set recaption.vllm.tensor_parallel_size="$TP"
"${FINEVIT[@]}" recaption "$DS" --backend vllm --model "$MODEL" --layer vllm-grounded --task regions \
  --region-mode grounded --model-family "$FAMILY" --max-tokens 1024 --no-progress --set recaption.vllm.tensor_parallel_size="$TP"

# 2) the same model behind `vllm serve`, through the openai backend (the SGLang path is identical:
#    python -m sglang.launch_server --model-path "$MODEL" --port $PORT, then the same command)
vllm serve "$MODEL" --port "$PORT" --tensor-parallel-size "$TP" --served-model-name captioner \
  --limit-mm-per-prompt '{"image": 2}' > "$WORK/vllm-serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 600); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 1; done
"${FINEVIT[@]}" recaption "$DS" --endpoint "http://127.0.0.1:$PORT" --layer http-global --task global \
  --max-tokens 512 --max-in-flight 256 --no-progress
"${FINEVIT[@]}" recaption "$DS" --endpoint "http://127.0.0.1:$PORT" --layer http-proposals --task regions \
  --region-mode proposals --proposals-layer gt-regions --model-family "$FAMILY" --max-tokens 128 \
  --max-in-flight 256 --no-progress

"$PY" - "$DS" <<'PY'
import sys, duckdb
from engine.layers import read_layer
ds = sys.argv[1]
for layer in ("vllm-global", "vllm-grounded", "http-global", "http-proposals"):
    t = read_layer(ds, layer)  # committed shards only (their _stats.json marker exists)
    print(layer, duckdb.sql("select status, count(*) from t group by 1").fetchall())
    n = duckdb.sql("select count(*), count(distinct key) from t").fetchone()
    assert n[0] == n[1], f"{layer}: duplicate keys"
PY
