#!/usr/bin/env bash
# One jaxlora job over a whole TPU pod slice. Run this script on every worker at once:
#
#   gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command \
#     "cd ~/jaxlora && launch/tpu_pod.sh configs/phonebook_capacity_llama3_8b.yaml /mnt/shared/runs/pb"
#
# jax.distributed reads the slice's topology from the TPU environment (--distributed-auto), so
# every worker runs the same command. OUT must be a directory every worker sees (a Filestore/NFS
# mount): process 0 writes the run files, all processes write their checkpoint shards.
set -euo pipefail

if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG OUT [jaxlora train options...]" >&2
  exit 2
fi
config=$1 out=$2
shift 2
read -r -a cmd <<<"${JAXLORA_CMD:-jaxlora}"
exec "${cmd[@]}" train "$config" --out "$out" --distributed-auto "$@"
