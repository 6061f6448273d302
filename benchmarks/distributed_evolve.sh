#!/usr/bin/env bash
# search evolve serially and on 2 Ray workers, on docs/data-dependent.md's worked example (two fine-tuned
# MiniLM classifiers and their task files, made by benchmarks/user_tasks/make_finetunes.py), then the best
# recipe merged and evaluated on the test splits.
#   nice -n 15 bash benchmarks/distributed_evolve.sh USER_TASKS_FOLDER OUT_FOLDER 2>&1 | tee evolve.log
set -euo pipefail
U=$(realpath "${1:-.bench/user-tasks}"); OUT=$(realpath -m "${2:-.bench/evolve-user}")
mkdir -p "$OUT"; cd "$OUT"
cat > evolve.yaml <<YAML
# no base: a linear merge whose weights per model and per third of the layers CMA-ES chooses
models: [$U/ft-gloss, $U/ft-fortune]
tasks: [$U/gloss.yaml, $U/fortune.yaml]
methods: [linear]
layer_groups: 3
normalize: true
max_evals: ${EVALS:-24}
population: 8
seed: 0
YAML
rm -f w1.* w2.*
for w in 1 2; do
  /usr/bin/time -f "[time] workers $w: wall %e s, user %U s, sys %S s (this process; Ray actors' CPU is in the CSV)" \
    alloykit search evolve evolve.yaml --out w$w.yaml --workers $w -q
  python - "w$w.evaluations.csv" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
print(f"[csv] {sys.argv[1]}: {len(rows)} evaluations, CPU seconds in evaluations {sum(float(r['cpu_seconds']) for r in rows):.1f}, "
      f"best validation score {max(float(r['score']) for r in rows):.4f}")
PY
done
cmp <(cut -d, -f1-9 w1.evaluations.csv) <(cut -d, -f1-9 w2.evaluations.csv) && echo "[same] serial and 2 workers: same evaluations"
alloykit merge w1.yaml merged-best -q --overwrite
alloykit eval merged-best --task $U/gloss.yaml $U/fortune.yaml
alloykit merge $U/average.yaml merged-average -q --overwrite
alloykit eval merged-average --task $U/gloss.yaml $U/fortune.yaml
