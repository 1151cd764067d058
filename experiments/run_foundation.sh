#!/usr/bin/env bash
# Section-3 statistics and the baseline table on every shared dataset (needs ../shared/data).
# Usage: bash experiments/run_foundation.sh [RIB_EDGE_BIN]
set -uo pipefail
cd "$(dirname "$0")/.."
bin=${1:-.venv/bin/rib-edge}
raw="jdata2018_mkmsr_demo jdata2016_sample yoochoose_100k diginetica_sample taobao_userbehavior_timeslice"
for name in $raw; do
  $bin data stats "$name" --out "benchmarks/results/stats/$name" || echo "stats failed: $name"
done
$bin data stats taobao_userbehavior_timeslice --min-item-support 2 --out benchmarks/results/stats/taobao_userbehavior_timeslice_support2
for name in $raw synthetic; do
  $bin bench baselines --dataset "$name" --out "benchmarks/results/$name" || echo "bench failed: $name"
done
for name in jdata2018_mkmsr_demo taobao_userbehavior_timeslice diginetica_sample; do
  $bin bench baselines --dataset "$name" --min-item-support 2 --out "benchmarks/results/${name}_support2" || echo "bench failed: $name support 2"
done
for name in diginetica tmall nowplaying yoochoose1_64; do
  $bin bench baselines --dataset "$name" --out "benchmarks/results/srgnn_$name" || echo "bench failed: $name"
done
