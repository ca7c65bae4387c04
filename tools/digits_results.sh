#!/usr/bin/env bash
# The results table of docs/RESULTS.md: the digits demo (40 labels) with supervised only,
# FixMatch (Sohn et al.'s), SimMatch without its bank, SimMatch, SimMatchV2 and ISD
# pretraining, three seeds each, as one sweep over the config files; then SimMatch initialised
# from the ISD run of each seed (a second sweep: it needs the first one's ISD runs), then the
# tables. Given again, it trains only the runs that are not finished.
#   bash tools/digits_results.sh [DATA_DIR] [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-data/digits}
out=${2:-runs/results}
[ -d "$data/train" ] || python tools/make_digits.py --out "$data"
configs=yaml/digits_supervised.yaml,yaml/digits_fixmatch.yaml,yaml/digits_nobank.yaml,yaml/digits.yaml
configs=$configs,yaml/digits_v2.yaml,yaml/digits_isd.yaml
python tools/sweep.py --local --grid cfg=$configs --seeds 0,1,2 --out "$out/methods" data.root="$data"
python tools/sweep.py --local --cfg yaml/digits.yaml --seeds 0,1,2 --out "$out/from_isd" data.root="$data" \
  "model.init_from=$out/methods/cfg=digits_isd/s{seed}"
python tools/summarize.py "$out/methods"
python tools/summarize.py "$out/from_isd"
