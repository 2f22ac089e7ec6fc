#!/usr/bin/env bash
# Every check that only a GPU can make, as one step, into one report (experiments/gpu_check.py says which):
#   bash experiments/gpu_check.sh                 # on one GPU, about 8 minutes
#   bash experiments/gpu_check.sh --dry-run       # the same steps at toy sizes on a CPU
set -euo pipefail
exec python "$(dirname "$0")/gpu_check.py" "$@"
