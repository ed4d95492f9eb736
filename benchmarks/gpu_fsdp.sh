#!/usr/bin/env bash
# FSDP2 vs DDP on one machine's GPUs (NCCL, bf16): throughput and peak memory per GPU,
# and the checkpoint stall of sharded sync vs async saves across the GPUs.
# For a lent GPU machine: one short script (about 5 minutes on 8 GPUs; 1 GPU works too).
#   bash benchmarks/gpu_fsdp.sh            # every GPU of the machine
#   NPROC=2 bash benchmarks/gpu_fsdp.sh    # two of them
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
nvidia-smi --query-gpu=name,memory.total --format=csv
NPROC="${NPROC:-$(nvidia-smi --list-gpus | wc -l)}"
export OMP_NUM_THREADS=4 PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
# ~150M-parameter GPT (width 1024, 12 blocks, context 1024), 8 sequences per GPU per step.
.venv/bin/python -m torch.distributed.run --standalone --nproc_per_node="$NPROC" \
    benchmarks/fsdp_throughput.py --out benchmarks/results/fsdp_throughput_gpu.json
# Sharded checkpoints of a ~13M-parameter GPT written from every GPU, sync vs async.
.venv/bin/python -m torch.distributed.run --standalone --nproc_per_node="$NPROC" \
    benchmarks/checkpoint_stall.py --kinds fsdp --out benchmarks/results/checkpoint_stall_gpu.json
