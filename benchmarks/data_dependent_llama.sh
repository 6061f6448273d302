#!/usr/bin/env bash
# Run by hand after `python benchmarks/generate.py --size 0.1b --out .bench/0.1b`: the three data-dependent commands on the performance benchmark's 0.1B Llama-shaped checkpoints.
set -euo pipefail
cd "$(dirname "$0")/.."
A=.venv/bin/alloykit; B=.bench/0.1b; W=.bench/llama-dd; mkdir -p $W
grep -hv '^%' /usr/share/games/fortunes/fortunes | awk 'length>40' | head -96 > $W/calib.txt
grep -hv '^%' /usr/share/games/fortunes/fortunes | awk 'length>40' | sed -n 200,263p > $W/heldout.txt
t() { local s=$(date +%s.%N); "$@"; echo "TIME $(echo "$(date +%s.%N) - $s" | bc) s: $*" >&2; }
for m in ${COLLECT-ft1 ft2 ft3}; do
  t $A stats collect $B/$m --data $W/calib.txt --kind all --samples 32 --max-len 64 --out $W/stats-$m
done
cat > $W/regmean.yaml <<Y
merge_method: regmean   # no base_model: regmean merges the fine-tunes themselves (a listed base would be merged too)
models:
  - {model: $B/ft1, stats: $W/stats-ft1, calibration: $W/calib.txt}
  - {model: $B/ft2, stats: $W/stats-ft2, calibration: $W/calib.txt}
  - {model: $B/ft3, stats: $W/stats-ft3, calibration: $W/calib.txt}
parameters: {alpha: 0.9}
dtype: bfloat16
Y
sed 's/merge_method: regmean/merge_method: fisher/; s/parameters: {alpha: 0.9}/parameters: {normalize: true}/' $W/regmean.yaml > $W/fisher.yaml
t $A merge $W/regmean.yaml $W/out-regmean --overwrite
t $A merge $W/fisher.yaml $W/out-fisher --overwrite
t $A search adamerging --base $B/base --models $B/ft1 $B/ft2 $B/ft3 --data $W/calib.txt --granularity task --steps 10 --samples 32 --batch-size 4 --max-len 64 --out $W/ada.yaml
t $A merge $W/ada.yaml $W/out-ada --overwrite
for m in $B/base $B/ft1 $B/ft2 $B/ft3 $W/out-regmean $W/out-fisher $W/out-ada; do
  t $A stats evaluate $m --data $W/heldout.txt --samples 64 --max-len 64
done
