#!/usr/bin/env bash
# The results table of docs/RESULTS.md: the digits demo (40 labels) with supervised only,
# FixMatch (Sohn et al.'s), SimMatch without its bank, SimMatch, SimMatchV2 and SimMatch
# initialised from ISD, three seeds each, then the summary.
#   bash tools/digits_results.sh [DATA_DIR] [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-data/digits}
out=${2:-runs/results}
[ -d "$data/train" ] || python tools/make_digits.py --out "$data"
for seed in 0 1 2; do
  common=(data.root="$data" train.seed="$seed")
  python tools/train.py --cfg yaml/digits.yaml "${common[@]}" method.name=supervised train.run_dir="$out/supervised_s$seed"
  python tools/train.py --cfg yaml/digits.yaml "${common[@]}" method.name=fixmatch train.run_dir="$out/fixmatch_s$seed"
  python tools/train.py --cfg yaml/digits.yaml "${common[@]}" method.simmatch.use_bank=false train.run_dir="$out/nobank_s$seed"
  python tools/train.py --cfg yaml/digits.yaml "${common[@]}" train.run_dir="$out/simmatch_s$seed"
  python tools/train.py --cfg yaml/digits_v2.yaml "${common[@]}" train.run_dir="$out/simmatchv2_s$seed"
  python tools/train.py --cfg yaml/digits_isd.yaml "${common[@]}" train.run_dir="$out/isd_pretrain_s$seed"
  python tools/train.py --cfg yaml/digits.yaml "${common[@]}" model.init_from="$out/isd_pretrain_s$seed" \
    train.run_dir="$out/simmatch_from_isd_s$seed"
done
python tools/summarize.py "$out"/supervised_s* "$out"/fixmatch_s* "$out"/nobank_s* "$out"/simmatch_s* "$out"/simmatchv2_s* \
  "$out"/isd_pretrain_s* "$out"/simmatch_from_isd_s*
