#!/usr/bin/env bash
# Recovery workers as a Slurm job array: each array task joins every cell a coordinator opens on
# the shared PostgreSQL and exits once none has opened for IDLE seconds.
#
#   sbatch --array=1-32 deploy/slurm-workers.sh postgresql://suite@db-host:5432/optuna
#
# Start the coordinator anywhere that reaches the database (it writes the tables and logs to
# MLflow), with the same URL as `recover.storage`:
#   dvc exp run -S 'recover.storage=postgresql://suite@db-host:5432/optuna'
#
#SBATCH --job-name=recover-workers
#SBATCH --cpus-per-task=1
#SBATCH --mem=2G
#SBATCH --time=04:00:00
#SBATCH --output=recover-worker-%A_%a.log
set -euo pipefail

STORAGE="${1:?usage: sbatch --array=1-N deploy/slurm-workers.sh POSTGRES_URL}"
IDLE="${IDLE:-600}"                      # seconds without an open cell before a worker exits
SUITE_DIR="${SUITE_DIR:-$SLURM_SUBMIT_DIR}"  # a checkout with .venv (make venv)

cd "$SUITE_DIR"
export OMP_NUM_THREADS=1 MLFLOW_DISABLE_TELEMETRY=true DVC_NO_ANALYTICS=1
# Scratch stays on the node's local disk: workers share the database, never a file.
WORK_DIR="${TMPDIR:-/tmp}/suite-worker-${SLURM_ARRAY_JOB_ID:-0}-${SLURM_ARRAY_TASK_ID:-0}"
exec .venv/bin/suite recover-worker \
    --storage "$STORAGE" \
    --idle "$IDLE" \
    --worker "${SLURM_ARRAY_TASK_ID:-1}" \
    --work-dir "$WORK_DIR"
