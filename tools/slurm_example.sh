#!/bin/bash
# kd-train on SLURM: N nodes x G GPUs with train.strategy=fsdp (FSDP2), one torchrun per node,
# meeting at a c10d rendezvous on the job's first node (README, "Scaling out: DDP and FSDP2").
#
#   sbatch --nodes 2 tools/slurm_example.sh configs/tinyllama/dskd-fkl.yaml [key=value ...]
#
# A preempted or requeued job continues from its newest checkpoint: SIGTERM (sent 120 s before
# the time limit) makes every rank save a checkpoint and stop; train.resume=true on the next start
# resumes it (and starts from scratch when there is none). fsdp checkpoints are distributed
# (torch.distributed.checkpoint), so the job may come back on a different number of nodes: keep
# micro_batch_size x grad_accum x WORLD_SIZE (the global batch) the same, e.g. by changing
# train.grad_accum with train.resume_allow_changes=true.
#
# A grid instead of one config: one line per run, each started on every node,
#   python tools/grid.py GRID.yaml --emit-commands --nnodes "$SLURM_NNODES" --nproc-per-node "$GPUS" \
#       --rdzv-endpoint "$HEAD:$PORT" --set train.strategy=fsdp | while read -r cmd; do srun bash -c "$cmd"; done
#
#SBATCH --job-name=kd-fsdp
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@120
#SBATCH --requeue
#SBATCH --output=%x-%j.out
set -euo pipefail

CONFIG=${1:?usage: sbatch tools/slurm_example.sh CONFIG [key=value ...]}
shift
GPUS=${SLURM_GPUS_ON_NODE:-8}
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=${PORT:-29500}
export OMP_NUM_THREADS=$(( ${SLURM_CPUS_PER_TASK:-$GPUS} / GPUS > 0 ? ${SLURM_CPUS_PER_TASK:-$GPUS} / GPUS : 1 ))
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}   # models and data are read from the shared cache, never downloaded

# fsdp does not generate during training (eval.generate / eval.test_split): evaluate final/ with kd-eval.
srun --kill-on-bad-exit=1 torchrun \
    --nnodes "$SLURM_NNODES" --nproc_per_node "$GPUS" \
    --rdzv_backend c10d --rdzv_endpoint "$HEAD:$PORT" --rdzv_id "$SLURM_JOB_ID" \
    -m kdcore.cli --config "$CONFIG" \
    train.strategy=fsdp eval.generate=false eval.select_by=ce eval.test_split=null train.resume=true "$@"
