#!/usr/bin/env bash
# Reproduce both published Fashion-MNIST density rows (docs/density.md): experiment=fmnist_density, the
# standard-prior VAE (228.70 nats in the Exemplar VAE paper), and experiment=fmnist_density_vamp, the VampPrior VAE
# (227.35 nats). Run it again at any time: each run is started, or resumed where it stopped, in the background
# (nohup, one torch thread each); a run whose training has ended gets its K = 5000 test figure (vaelab-eval on its
# best checkpoint, also in the background) unless it has one. It prints what it started and where the logs are.
#
#   scripts/reproduce_density.sh                          # both runs, under /work/runs
#   RUNS=/elsewhere scripts/reproduce_density.sh fmnist_density_vamp
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-$PWD/.venv/bin}
RUNS=${RUNS:-/work/runs}
mkdir -p "$RUNS"
experiments=("$@")
[ ${#experiments[@]} -gt 0 ] || experiments=(fmnist_density fmnist_density_vamp)

for experiment in "${experiments[@]}"; do
  run="$RUNS/$experiment"
  evaluated="$run-eval5000"
  if [ -f "$run/metrics.json" ]; then  # training has ended (early stopping or its last epoch)
    best=$(ls "$run"/checkpoints/best-epoch*.ckpt | tail -n 1)
    if [ -f "$evaluated/eval.json" ]; then
      echo "$experiment: done; the K = 5000 test figure is in $evaluated/eval.json"
    elif [ -e "$evaluated" ]; then  # never overwrite=true here: the evaluation may still be running
      echo "$experiment: $evaluated exists without eval.json: an evaluation is running, or was stopped (then remove it and rerun)"
    else
      nohup "$BIN/vaelab-eval" ckpt_path="$best" num_importance_samples=5000 hydra.run.dir="$evaluated" \
        > "$evaluated.out" 2>&1 &
      echo "$experiment: evaluating $best with K = 5000 (pid $!) into $evaluated; log $evaluated.out"
    fi
  elif [ -d "$run" ]; then  # started before: continue in place from its newest checkpoint (refused while it runs)
    nohup "$BIN/vaelab-resume" "$run" >> "$run.out" 2>&1 &
    echo "$experiment: resuming $run (pid $!); log $run.out"
  else
    nohup "$BIN/vaelab-train" experiment="$experiment" threads=1 hydra.run.dir="$run" '~callbacks.progress_bar' \
      > "$run.out" 2>&1 &
    echo "$experiment: started in $run at $(date -Is) (pid $!); log $run.out"
  fi
done
