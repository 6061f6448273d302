#!/usr/bin/env bash
# A merge whose inputs (4 x 2.2 GB) far exceed the memory the process may use:
# run alloykit inside a memory cgroup capped below the size of ONE input model.
#   sudo bash benchmarks/memory_cap.sh [CAP_BYTES] [METHOD]
# Needs root and the cgroup v1 memory controller (/sys/fs/cgroup/memory) or cgroup v2.
set -euo pipefail
cap=${1:-1500000000}
method=${2:-task_arithmetic}
root=.bench/1.1b
.venv/bin/python benchmarks/generate.py --size 1.1b --finetunes 3 --out "$root" >/dev/null
params="weight: 0.5"
case $method in ties|dare_*|della*|breadcrumbs*|magnitude_prune) params="weight: 0.5, density: 0.5";; esac
cat > .bench/cap.yaml <<YAML
merge_method: $method
base_model: $root/base
models:
  - {model: $root/ft1, parameters: {$params}}
  - {model: $root/ft2, parameters: {$params}}
  - {model: $root/ft3, parameters: {$params}}
dtype: bfloat16
YAML
rm -rf .bench/cap-out
if [ -d /sys/fs/cgroup/memory ]; then
  cg=/sys/fs/cgroup/memory/alloykit-cap
  mkdir -p $cg
  echo "$cap" > $cg/memory.limit_in_bytes
  limit_file=$cg/memory.limit_in_bytes; peak_file=$cg/memory.max_usage_in_bytes; echo 0 > $peak_file || true
else
  cg=/sys/fs/cgroup/alloykit-cap
  mkdir -p $cg
  echo "$cap" > $cg/memory.max
  limit_file=$cg/memory.max; peak_file=$cg/memory.peak
fi
one_model=$(du -sb $root/base | cut -f1)
inputs=$(du -sb $root/base $root/ft1 $root/ft2 $root/ft3 | awk '{s+=$1} END {print s}')
echo "cap: $(cat $limit_file) bytes; one input model: $one_model bytes; all inputs: $inputs bytes"
start=$(date +%s.%N)
sh -c "echo \$\$ > $cg/cgroup.procs 2>/dev/null || echo \$\$ > $cg/tasks; exec .venv/bin/alloykit merge .bench/cap.yaml .bench/cap-out -q --memory-budget 1GB"
end=$(date +%s.%N)
echo "completed in $(echo "$end - $start" | bc) s; cgroup peak usage (page cache included): $(cat $peak_file) bytes"
.venv/bin/alloykit inspect .bench/cap-out | head -3
rm -rf .bench/cap-out
