#!/usr/bin/env bash
# Wall time and peak memory of the embedded default: `cdmbench bench --backbone digits`.
#
#   benchmarks/bench_walltime.sh            # --quick only (CI budget; a few minutes on 2 cores)
#   benchmarks/bench_walltime.sh full       # the full budget: about 10 minutes on a 2-core CPU
#   benchmarks/bench_walltime.sh both       # quick, then full
#   benchmarks/bench_walltime.sh full --seeds 0,1,2   # more arguments go to cdmbench bench
#
# Each run starts from an empty temporary directory (nothing is reused: bench is
# content-keyed, so a second run into the same folders would finish at once) and runs there,
# so its evaluation cache (.cdmbench/cache, relative to the working directory) is fresh too:
#
#   /usr/bin/time -v cdmbench bench --backbone digits [--quick] [ARGS...] \
#       --results <tmp> --runs <tmp>/runs --samples <tmp>/samples
#
# Reported: wall time; peak memory as /usr/bin/time sees it ("Maximum resident set size":
# the largest single process of the tree - bench trains the methods in 2 worker processes);
# and the peak of the whole process tree's summed RSS, sampled once a second (approximate).
# Prints a markdown table and writes results/benchmarks/bench_walltime.csv (temp file + mv).
# DESIGN section 9: the full run should take about ten minutes on a 2-core CPU; with
# --seeds 0,1,2 (three training seeds of every method) it should finish within 30 minutes.
set -euo pipefail

mode="${1:-quick}"
case "$mode" in
  quick) modes=(quick) ;;
  full) modes=(full) ;;
  both) modes=(quick full) ;;
  *) echo "usage: $0 [quick|full|both] [cdmbench bench arguments, e.g. --seeds 0,1,2]" >&2; exit 2 ;;
esac
shift $(( $# > 0 ? 1 : 0 ))
extra=("$@")

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
csv="${CSV:-$repo/results/benchmarks/bench_walltime.csv}"
TIME_BIN="${TIME_BIN:-/usr/bin/time}"
[ -x "$TIME_BIN" ] || { echo "needs GNU time at $TIME_BIN (apt-get install time)" >&2; exit 1; }
command -v cdmbench >/dev/null || { echo "cdmbench is not on PATH (pip install -e .)" >&2; exit 1; }

cpu="$(grep -m1 -i '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//' || uname -m)"
cores="$(nproc --all 2>/dev/null || getconf _NPROCESSORS_ONLN)"
usable="$(nproc 2>/dev/null || echo "$cores")"
torchv="$(python -c 'import torch; print(torch.__version__)')"
load0="$(cut -d' ' -f1-3 /proc/loadavg)"

# summed RSS (KiB) of a process and all its descendants
tree_rss() {
  ps -eo pid=,ppid=,rss= | awk -v root="$1" '
    { parent[$1] = $2; rss[$1] = $3 }
    END {
      total = 0
      for (p in rss) { q = p; while (q != "" && q != 0 && q != 1) { if (q == root) { total += rss[p]; break } q = parent[q] } }
      print total
    }'
}

rows=()
for m in "${modes[@]}"; do
  tmp="$(mktemp -d "${TMPDIR:-/tmp}/cdmbench-walltime-$m.XXXXXX")"
  flag=()
  [ "$m" = quick ] && flag=(--quick)
  echo "== cdmbench bench --backbone digits ${flag[*]:-} ${extra[*]:-} (in $tmp; log: $tmp/bench.log)" >&2
  (
    cd "$tmp"
    exec "$TIME_BIN" -v -o "$tmp/time.txt" cdmbench bench --backbone digits "${flag[@]}" \
      "${extra[@]}" --results "$tmp" --runs "$tmp/runs" --samples "$tmp/samples"
  ) >"$tmp/bench.log" 2>&1 &
  pid=$!
  peak=0
  while kill -0 "$pid" 2>/dev/null; do
    now="$(tree_rss "$pid")"
    [ "${now:-0}" -gt "$peak" ] && peak="$now"
    sleep 1
  done
  rc=0
  wait "$pid" || rc=$?
  wall="$(grep -F 'Elapsed (wall clock) time' "$tmp/time.txt" | awk '{print $NF}')"
  maxrss="$(grep -F 'Maximum resident set size' "$tmp/time.txt" | awk '{print $NF}')"
  secs="$(awk -F: '{ if (NF == 3) print $1 * 3600 + $2 * 60 + $3; else print $1 * 60 + $2 }' <<<"$wall")"
  rows+=("$m,$rc,$secs,$wall,$((maxrss / 1024)),$((peak / 1024)),$tmp")
  if [ "$rc" -ne 0 ]; then
    echo "bench ($m) exited with $rc; last lines of $tmp/bench.log:" >&2
    tail -n 20 "$tmp/bench.log" >&2
  fi
done

load1="$(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "## cdmbench bench --backbone digits ${extra[*]:-}: wall time and peak memory"
echo
echo "machine: $cpu, $cores cores ($usable usable), torch $torchv; bench trains in 2 worker processes, 1 torch thread each; load average $load0 at start, $load1 at end"
echo
echo "| budget | exit | wall s | wall (h:m:s) | max RSS one process (MiB) | peak RSS process tree, sampled (MiB) | folder |"
echo "|---|---|---|---|---|---|---|"
for r in "${rows[@]}"; do
  IFS=, read -r m rc secs wall mr pk dir <<<"$r"
  echo "| $m | $rc | $secs | $wall | $mr | $pk | $dir |"
done

mkdir -p "$(dirname "$csv")"
tmpcsv="$(mktemp "$(dirname "$csv")/.bench_walltime.csv.XXXXXX")"
{
  echo "budget,exit,wall_s,wall_hms,max_rss_one_process_mib,peak_rss_tree_mib,folder,cpu,cores,cores_usable,torch,threads,loadavg_start,loadavg_end,args"
  for r in "${rows[@]}"; do
    echo "$r,\"$cpu\",$cores,$usable,$torchv,\"2 workers x 1\",\"$load0\",\"$load1\",\"${extra[*]:-}\""
  done
} >"$tmpcsv"
mv -f "$tmpcsv" "$csv"
echo
echo "wrote $csv (the run folders are left for inspection; delete them when done)"
