#!/usr/bin/env bash
# Run vision-ft on a Cloud TPU VM (or a multi-host slice) with gcloud.
#
#   scripts/tpu_vm.sh [--dry-run] create  NAME ZONE [ACCELERATOR] [RUNTIME]
#   scripts/tpu_vm.sh [--dry-run] install NAME ZONE GIT_URL [REF]
#   scripts/tpu_vm.sh [--dry-run] launch  NAME ZONE [fit arguments...]
#   scripts/tpu_vm.sh [--dry-run] logs    NAME ZONE [WORKER]
#   scripts/tpu_vm.sh [--dry-run] delete  NAME ZONE
#
# create:  a TPU VM; ACCELERATOR defaults to v4-8 (a v4-32 is a 4-host slice), RUNTIME to
#          tpu-ubuntu2204-base.
# install: installs Python 3.11 (vision-ft needs >= 3.11; Ubuntu 22.04's python3 is 3.10), clones
#          vision-ft (GIT_URL at REF, default main) on every worker (--worker=all) and installs it
#          with the `tpu` and `lite` extras.
# launch:  starts `vision-ft fit` on every worker at once, detached, logging to ~/vision-ft-fit.log.
#          jax.distributed.initialize() finds the slice's hosts by itself; every host runs the same
#          command. On a multi-host slice give --checkpoint-dir gs://BUCKET/RUN: the hosts must share
#          the checkpoints (each keeps its own --output). A SIGTERM (maintenance, spot preemption) checkpoints and exits with code 75;
#          launching the same command again resumes.
# logs:    streams one worker's log (worker 0, which writes the reports, by default).
# delete:  tears the VM down.
#
# --dry-run prints every command instead of running it.
set -euo pipefail

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then
    DRY_RUN=1
    shift
fi

run() {
    # print the command, shell-quoted, then run it unless this is a dry run
    printf '+'
    printf ' %q' "$@"
    printf '\n'
    if [[ "$DRY_RUN" == 0 ]]; then
        "$@"
    fi
}

usage() {
    sed -n '2,8p' "$0" >&2
    exit 2
}

[[ $# -ge 3 ]] || usage
action=$1 name=$2 zone=$3
shift 3

case "$action" in
    create)
        accelerator=${1:-v4-8}
        runtime=${2:-tpu-ubuntu2204-base}
        run gcloud compute tpus tpu-vm create "$name" --zone="$zone" \
            --accelerator-type="$accelerator" --version="$runtime"
        ;;
    install)
        repo=${1:?install needs the GIT_URL of vision-ft}
        ref=${2:-main}
        run gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command \
            "sudo apt-get update -q && sudo apt-get install -y -q python3.11 python3.11-venv && git clone --depth 1 --branch $ref $repo vision-ft && python3.11 -m venv vision-ft/.venv && vision-ft/.venv/bin/pip install -e 'vision-ft[tpu,lite]'"
        ;;
    launch)
        fit_args=""
        if [[ $# -gt 0 ]]; then
            fit_args=$(printf ' %q' "$@")
        fi
        run gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command \
            "cd vision-ft && nohup .venv/bin/vision-ft fit --no-progress$fit_args > ~/vision-ft-fit.log 2>&1 &"
        ;;
    logs)
        worker=${1:-0}
        run gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker="$worker" --command \
            "tail -n +1 -f ~/vision-ft-fit.log"
        ;;
    delete)
        run gcloud compute tpus tpu-vm delete "$name" --zone="$zone" --quiet
        ;;
    *)
        usage
        ;;
esac
