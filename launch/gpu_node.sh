#!/usr/bin/env bash
# One jaxlora job on every GPU of one machine: a single process drives all local GPUs (the mesh
# spans them; set `mesh:` in the config or with --set, e.g. --set mesh.adapter=8).
#
#   launch/gpu_node.sh configs/phonebook_capacity_llama3_8b.yaml runs/pb --set mesh.adapter=8
#
# CUDA_VISIBLE_DEVICES picks the GPUs. JAX preallocates 75% of each GPU's memory by default;
# this script lets it take 92% (override XLA_PYTHON_CLIENT_MEM_FRACTION).
set -euo pipefail

if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG OUT [jaxlora train options...]" >&2
  exit 2
fi
config=$1 out=$2
shift 2
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
read -r -a cmd <<<"${JAXLORA_CMD:-jaxlora}"
exec "${cmd[@]}" train "$config" --out "$out" "$@"
