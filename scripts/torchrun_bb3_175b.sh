#!/usr/bin/env bash
# BB3-175B at model-parallel degree 16 on two 8-GPU nodes, with torchrun. Run this on both
# nodes, with NODE_RANK=0 on the node that should serve HTTP and NODE_RANK=1 on the other:
#
#   MASTER=node0.example NODE_RANK=0 bash scripts/torchrun_bb3_175b.sh     # on node 0
#   MASTER=node0.example NODE_RANK=1 bash scripts/torchrun_bb3_175b.sh     # on node 1
#
# RDZV=c10d uses dynamic (c10d) rendezvous instead of a static master address:
#   MASTER=node0.example RDZV=c10d bash scripts/torchrun_bb3_175b.sh       # on both nodes
set -euo pipefail
CKPT=${CKPT:-/data/bb3_175b/mp16}
MASTER=${MASTER:?set MASTER to the hostname of node 0}
NNODES=${NNODES:-2}
GPUS=${GPUS:-8}
PORT=${PORT:-6010}
if [ "${RDZV:-static}" = "c10d" ]; then
  launch=(--rdzv-backend c10d --rdzv-endpoint "$MASTER:29400" --rdzv-id "${RDZV_ID:-bb3-175b}")
else
  launch=(--node-rank "${NODE_RANK:?set NODE_RANK to 0 or 1}" --master-addr "$MASTER" --master-port 29500)
fi
exec torchrun --nnodes "$NNODES" --nproc-per-node "$GPUS" "${launch[@]}" \
  -m opt_serving.server.cli --checkpoint-folder "$CKPT" --host 0.0.0.0 --port "$PORT" --dtype fp16
