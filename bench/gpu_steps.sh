# Sourced by the GPU scripts (run_gpu.sh, frontier.sh): `step NAME LIMIT CMD...` runs CMD with its log in
# $OUTDIR/NAME.log when NAME is in $STEPS, within LIMIT seconds and what is left of $BUDGET since $start.
left() { echo $(( BUDGET - ($(date +%s) - start) )); }
step() {
  local name=$1 limit=$2; shift 2
  case ",$STEPS," in *",$name,"*) ;; *) return 0 ;; esac
  local l; l=$(left); [ "$limit" -gt "$l" ] && limit=$l
  if [ "$limit" -le 10 ]; then echo "== $name: skipped (no time left)"; return 0; fi
  echo "== $name (limit ${limit}s)"
  local t0; t0=$(date +%s)
  timeout "$limit" "$@" > "$OUTDIR/$name.log" 2>&1
  echo "== $name: exit $? after $(( $(date +%s) - t0 ))s"
}
