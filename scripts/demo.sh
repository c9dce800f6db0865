#!/usr/bin/env bash
# Set up (./.venv) and run shmkv's main job on its built-in default workload.
# Extra arguments are passed to the command, e.g. `scripts/demo.sh --request-count 2000`.
set -euo pipefail
source "$(dirname "$0")/_env.sh"
exec python -m shmkv replay \
  --data-parallel-size 2 --router-mode kv \
  --shared-prefix-ratio 0.5 --num-prefix-groups 4 \
  --num-gpu-blocks-override 2048 --num-g2-blocks 4096 --kv-bytes-per-token 131072 \
  --request-count 400 --replay-concurrency 32 "$@"
