#!/usr/bin/env bash
# The whole performance benchmark in one command (about an hour on 2 cores):
#   bash benchmarks/all.sh
# 1.1B table against mergekit and read-sum-write, scaling runs, the memory-cap merge (root),
# then docs/benchmarks.md and its plots.
set -euo pipefail
cd "$(dirname "$0")/.."
make install-dev
.venv/bin/python benchmarks/run.py --root .bench --size 1.1b --repeats 2 --mergekit-repeats 1
.venv/bin/python benchmarks/scaling.py --root .bench
bash benchmarks/memory_cap.sh 2000000000 | tee .bench/cap.log
.venv/bin/python benchmarks/report.py
