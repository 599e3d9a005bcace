#!/usr/bin/env bash
# ci_slurm.sh - the SLURM integration tests: start the local single-node cluster, run the tests
# marked `slurm`, stop the cluster (only the daemons start-local-slurm.sh started), and exit with
# pytest's status. Run from anywhere, as root (the cluster scripts need it):
#   bash scripts/ci_slurm.sh [extra pytest args]
# SKIP_SLURM=1 skips it all (exit 0), e.g. on a machine where apt cannot install slurm-wlm.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
log() { echo "[ci_slurm] $*" >&2; }

if [ "${SKIP_SLURM:-0}" = 1 ]; then
    log "SKIP_SLURM=1: not running the SLURM tests"
    exit 0
fi

t0=$(date +%s)
if ! bash scripts/slurm/start-local-slurm.sh > /tmp/ci-slurm-start.log 2>&1; then
    log "start-local-slurm.sh failed; its output:"
    cat /tmp/ci-slurm-start.log >&2
    bash scripts/slurm/stop-local-slurm.sh || true
    exit 1
fi
log "cluster up in $(( $(date +%s) - t0 )) s"

# the stop runs however pytest ends (failure, Ctrl-C, timeout of the CI step)
trap 'bash scripts/slurm/stop-local-slurm.sh' EXIT

python -m pytest -m slurm tests/test_slurm.py -q -rs --durations=5 "$@"
rc=$?
log "pytest -m slurm exited with $rc after $(( $(date +%s) - t0 )) s"
exit $rc
