#!/bin/bash
# Usage: scripts/ablation_stage2.sh (from the repository root, after the varied recipe data exist; ~25 min on 2 cores)
# ConvLSTM vs GRU stage 2 on the same frozen stage 1 (bundle 0.3.0's weights + spatial maps), both tests.
set -e
cd /work/main
C=training/configs/varied.yaml
COMMON="--set stage1.spatial_channels=3"
CONV="$COMMON --set stage2.rnn=convlstm --set stage2.hidden=8"
GRU="$COMMON"
T0=$(date +%s)
.venv/bin/python scripts/stage1_from_bundle.py runs/abl-convlstm stage1.spatial_channels=3 stage2.rnn=convlstm stage2.hidden=8
.venv/bin/petriage-train features --config $C --run runs/abl-convlstm $CONV
echo "features $(( $(date +%s) - T0 )) s"
mkdir -p runs/abl-gru
cp runs/abl-convlstm/stage1.pt runs/abl-convlstm/features.npy runs/abl-convlstm/slice_logits.npy runs/abl-gru/
for arm in convlstm gru; do
  if [ $arm = convlstm ]; then S=$CONV; else S=$GRU; fi
  T=$(date +%s)
  .venv/bin/petriage-train stage2 --config $C --run runs/abl-$arm $S
  echo "$arm stage2 $(( $(date +%s) - T )) s"
  .venv/bin/petriage-train evaluate --config $C --run runs/abl-$arm $S
  .venv/bin/petriage-export runs/abl-$arm --out runs/abl-$arm-bundle --name abl-$arm --version 0.3.0-$arm
  .venv/bin/python scripts/check_bundle.py --bundle runs/abl-$arm-bundle \
      --test in-distribution=data/varied:runs/abl-convlstm/splits.json --test shifted=data/shifted --out runs/abl-$arm-check
  echo "$arm done $(( $(date +%s) - T0 )) s"
done
