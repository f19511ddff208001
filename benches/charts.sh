#!/usr/bin/env bash
# Charts from benches/proxy.sh's own results, as SVG, with gnuplot (Debian
# package gnuplot-nox; installed with apt-get when missing and run as root).
#
#   bash benches/charts.sh RESULTS.tsv [LATENCY.tsv] [OUTDIR]
#
# RESULTS.tsv: proxy.sh's per-run rows, tab-separated:
#   round clients mode target ok tps latency_ms pooler_cpu_us_per_txn
# For each mode it writes OUTDIR/tps-<mode>.svg and OUTDIR/cpu-<mode>.svg:
# the median over rounds of TPS, and of the pooler's CPU per transaction,
# against the client count, one line per target (direct, PgBouncer,
# lagrouter-proxy per policy).
#
# LATENCY.tsv (optional): read latency percentiles of the read-your-writes
# workload, rows "target p50_ms p90_ms p99_ms p999_ms"; gives
# OUTDIR/ryw-latency.svg, a bar group per target.
#
# OUTDIR defaults to docs/bench next to BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:?usage: charts.sh RESULTS.tsv [LATENCY.tsv] [OUTDIR]}
LATENCY=${2:-}
OUT=${3:-docs/bench}
mkdir -p "$OUT"
if ! command -v gnuplot >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gnuplot-nox >/dev/null
  else
    echo "charts.sh: gnuplot is missing (apt-get install gnuplot-nox)" >&2
    exit 1
  fi
fi
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# Medians per (mode, target, clients) of successful runs.
awk -F'\t' '
  $5 == 1 {
    k = $3 "\t" $4 "\t" $2
    n[k]++; tps[k, n[k]] = $6; cpu[k, n[k]] = $8
  }
  function median(arr, k, cnt,   i, j, t, v) {
    m = 0
    for (i = 1; i <= cnt; i++) if (arr[k, i] != "-") v[++m] = arr[k, i] + 0
    if (m == 0) return "NaN"
    for (i = 1; i <= m; i++) for (j = i + 1; j <= m; j++) if (v[j] < v[i]) { t = v[i]; v[i] = v[j]; v[j] = t }
    return (m % 2) ? v[(m + 1) / 2] : (v[m / 2] + v[m / 2 + 1]) / 2
  }
  END { for (k in n) print k "\t" median(tps, k, n[k]) "\t" median(cpu, k, n[k]) }
' "$RESULTS" | sort -t$'\t' -k1,1 -k2,2 -k3,3n >"$TMP/medians.tsv"

for mode in $(cut -f1 "$TMP/medians.tsv" | sort -u); do
  targets=$(awk -F'\t' -v m="$mode" '$1 == m {print $2}' "$TMP/medians.tsv" | sort -u)
  plots_tps=()
  plots_cpu=()
  for t in $targets; do
    dat="$TMP/$mode-${t//\//_}.dat"
    awk -F'\t' -v m="$mode" -v t="$t" '$1 == m && $2 == t {print $3, $4, $5}' "$TMP/medians.tsv" >"$dat"
    plots_tps+=("'$dat' using 1:2 with linespoints lw 2 pt 7 title '$t'")
    plots_cpu+=("'$dat' using 1:(\$3 == \$3 ? \$3 : 1/0) with linespoints lw 2 pt 7 title '$t'")
  done
  xs=$(awk -F'\t' -v m="$mode" '$1 == m {print $3}' "$TMP/medians.tsv" | sort -un | wc -l)
  logx=""
  [ "$xs" -gt 2 ] && logx="set logscale x 10"
  common="set terminal svg size 720,420 dynamic enhanced font 'sans,12' background rgb 'white'
set grid; set key outside right top; set xlabel 'clients'; $logx
set xtics nomirror; set ytics nomirror; set yrange [0:*]"
  if [ "$xs" -le 1 ]; then common="$common; set xrange [0:*]"; fi
  gnuplot <<GP
$common
set output '$OUT/tps-$mode.svg'
set title 'pgbench -S, $mode protocol: transactions per second (median)'
set ylabel 'TPS'
plot $(IFS=,; echo "${plots_tps[*]}")
GP
  gnuplot <<GP
$common
set output '$OUT/cpu-$mode.svg'
set title 'pgbench -S, $mode protocol: pooler CPU per transaction (median)'
set ylabel 'µs per transaction (user + system)'
plot $(IFS=,; echo "${plots_cpu[*]}")
GP
  echo "charts.sh: $OUT/tps-$mode.svg $OUT/cpu-$mode.svg" >&2
done

if [ -n "$LATENCY" ] && [ -s "$LATENCY" ]; then
  gnuplot <<GP
set terminal svg size 720,420 dynamic enhanced font 'sans,12' background rgb 'white'
set output '$OUT/ryw-latency.svg'
set title 'read-your-writes workload: read latency percentiles'
set style data histograms; set style histogram clustered gap 1; set style fill solid 0.85 border -1
set grid ytics; set ylabel 'ms'; set yrange [0:*]; set key outside right top
set xtics nomirror rotate by -20; set ytics nomirror
plot '$LATENCY' using 2:xtic(1) title 'p50', '' using 3 title 'p90', '' using 4 title 'p99', '' using 5 title 'p99.9'
GP
  echo "charts.sh: $OUT/ryw-latency.svg" >&2
fi
