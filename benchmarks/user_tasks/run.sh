#!/usr/bin/env bash
# docs/data-dependent.md's worked example, command line only: two fine-tuned sequence classifiers and the
# user's JSONL files -> statistics -> Fisher and RegMean merges (and the plain average) -> evaluation.
#   python benchmarks/user_tasks/make_finetunes.py      # the starting point (once)
#   bash benchmarks/user_tasks/run.sh [.bench/user-tasks] 2>&1 | tee .bench/user-tasks.log
set -euo pipefail
cd "${1:-.bench/user-tasks}"
t() { local s=$SECONDS; "$@"; echo "[$(( SECONDS - s ))s] $*" >&2; }

cat > gloss.yaml <<'YAML'
# WordNet glosses: is the word defined a noun or a verb?
data:
  train: gloss-train.jsonl
  validation: gloss-val.jsonl
  test: gloss-test.jsonl
head: ft-gloss
YAML
cat > fortune.yaml <<'YAML'
# fortune cookies: English or German?
data:
  train: fortune-train.jsonl
  validation: fortune-val.jsonl
  test: fortune-test.jsonl
head: ft-fortune
YAML

for m in ft-gloss ft-fortune; do t alloykit eval $m --task gloss.yaml fortune.yaml; done
t alloykit stats collect ft-gloss --task gloss.yaml --kind all --samples 256 --out gloss.stats
t alloykit stats collect ft-fortune --task fortune.yaml --kind all --samples 256 --out fortune.stats

cat > regmean.yaml <<'YAML'
merge_method: regmean
parameters: {alpha: 0.9}
models:
  - {model: ft-gloss, stats: gloss.stats, calibration: gloss.yaml}
  - {model: ft-fortune, stats: fortune.stats, calibration: fortune.yaml}
YAML
sed 's/merge_method: regmean/merge_method: fisher/; s/parameters: {alpha: 0.9}/parameters: {}/' regmean.yaml > fisher.yaml
sed 's/parameters: {}/parameters: {normalize: false}/' fisher.yaml > fisher-raw.yaml
t alloykit search uniform-soup --models ft-gloss ft-fortune --task gloss.yaml fortune.yaml --out average.yaml
for r in regmean fisher fisher-raw average; do
  t alloykit merge $r.yaml merged-$r --overwrite -q
  t alloykit eval merged-$r --task gloss.yaml fortune.yaml
done
