#!/usr/bin/env bash
# The CPU-sized Table 1 check of docs/RESULTS.md: yaml/digits_table1.yaml (the cifar10_40 recipe on
# the digits written as a CIFAR-10 archive) with labels only, FixMatch, SimMatch
# and ReMixMatch (the seed draws the labeled split too), then the summary.
#   bash tools/table1_results.sh [DATA_DIR] [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-data/digits_cifar10}
out=${2:-runs/table1_cpu}
[ -d "$data/cifar-10-batches-py" ] || python tools/make_digits.py --format cifar10 --out "$data"
for seed in 0 1 2; do
  common=(data.root="$data" train.seed="$seed" data.split_seed="$seed")
  python tools/train.py --cfg yaml/digits_table1.yaml "${common[@]}" method.name=supervised train.run_dir="$out/supervised_s$seed"
  python tools/train.py --cfg yaml/digits_table1.yaml "${common[@]}" method.name=fixmatch train.run_dir="$out/fixmatch_s$seed"
  python tools/train.py --cfg yaml/digits_table1.yaml "${common[@]}" train.run_dir="$out/simmatch_s$seed"
  python tools/train.py --cfg yaml/digits_table1.yaml "${common[@]}" method.name=remixmatch train.run_dir="$out/remixmatch_s$seed"
done
python tools/summarize.py "$out"/supervised_s* "$out"/fixmatch_s* "$out"/simmatch_s* "$out"/remixmatch_s*
