#!/bin/bash
# ---- maelflow job header (suites/include/head.h) --------------------------------------------
# Every maelflow task starts here. It tells ecFlow the job has started (init), and turns any
# failure or signal into an abort whose reason an operator can read in ecFlow UI ("Why?").
set -eu -o pipefail
# SLURM sends its warning (USR1) at its first time-limit check inside the warning window plus 30 s:
# with a short limit that is any time from the job's first second. Untrapped, USR1 kills this shell
# before it can tell ecFlow anything: remember it from the first line; the full trap comes below.
if [ -n "%MAELFLOW_WARNING_SIGNAL:%" ]; then trap 'MAELFLOW_TIME_LIMIT=1' "%MAELFLOW_WARNING_SIGNAL:%"; fi
export ECF_PORT=%ECF_PORT% ECF_HOST=%MAELFLOW_ECF_HOST% ECF_NAME=%ECF_NAME% ECF_PASS=%ECF_PASS%
# The scheduler (configs/sites/<site>.yaml) names the variable holding the job id; plain processes use their pid.
export MAELFLOW_SCHEDULER=%MAELFLOW_SCHEDULER:local% MAELFLOW_RANK_VAR=%MAELFLOW_RANK_VAR:%
export ECF_TRYNO=%ECF_TRYNO% ECF_RID=%MAELFLOW_JOB_ID:$$% ECF_TIMEOUT=%MAELFLOW_CHILD_TIMEOUT:86400%
export MAELFLOW_REPORT=%MAELFLOW_REPORT% MAELFLOW_SPOOL=%MAELFLOW_SPOOL:%
export MAELFLOW_CONFIG=%MAELFLOW_CONFIG% MAELFLOW_WORKSPACE=%MAELFLOW_WORKSPACE%
export MAELFLOW_SITE=%SITE:% MAELFLOW_SUITE=%SUITE% MAELFLOW_DEPLOY_ID=%MAELFLOW_DEPLOY_ID:0%
# benchmark mode (the suite's benchmark family): which benchmark, which repeat, which day's cycle
export MAELFLOW_BENCHMARK=%MAELFLOW_BENCHMARK:% MAELFLOW_REPEAT=%MAELFLOW_REPEAT:% MAELFLOW_ROUND=%ECF_DATE%
MAELFLOW="%MAELFLOW_SITE_CMD%"

# Child commands go straight to the server (direct) or to the site's spool, replayed by maelflow (relay).
ecf() {
  if [ "$MAELFLOW_REPORT" = relay ]; then $MAELFLOW report "$@"; else ecflow_client "$@"; fi
}
ecf --init="$ECF_RID"

abort_job() {
  set +eu
  local why="$1"
  if [ "$why" = signal ]; then
    kill $(jobs -p) 2>/dev/null
    if [ -n "${MAELFLOW_TIME_LIMIT:-}" ]; then
      why="TIMEOUT: the ${MAELFLOW_SCHEDULER^^} time limit of job $ECF_RID was reached"
    else
      why="killed by a signal (ecFlow kill or the scheduler)"
    fi
  fi
  [ "$why" = exit ] && why="${MAELFLOW_ABORT_REASON:-a command failed with exit status $2 - see the job output}"
  if [ "$1" = signal ]; then
    # the scheduler SIGKILLs this shell a few seconds after its TERM (SLURM's KillWait): a step that
    # is slow to exit (a training tearing down its data loaders) must not keep the abort from being
    # told, or the task stays active for ever and is never resubmitted. Give it 2 s, then report.
    local i
    for i in 1 2 3 4 5 6 7 8 9 10; do
      [ -z "$(jobs -pr)" ] && break
      sleep 0.2
    done
    ecf --abort="$why"
    trap - 0
    wait
    exit 0
  fi
  wait
  ecf --abort="$why"
  trap - 0
  exit 0
}
trap 'abort_job exit $?' 0
trap 'abort_job signal' 1 2 3 15
# A scheduler with time limits warns the batch shell before one (SLURM: sbatch --signal=B:USR1@SECONDS):
# remember it, so the SIGTERM that follows is reported as TIMEOUT, which the suite resubmits from a checkpoint
MAELFLOW_WARNING_SIGNAL="%MAELFLOW_WARNING_SIGNAL:%"
time_limit_approaching() {
  MAELFLOW_TIME_LIMIT=1
  echo "maelflow: ${MAELFLOW_SCHEDULER^^} time limit approaching"
  ecf --event=timeout || true
}
if [ -n "$MAELFLOW_WARNING_SIGNAL" ]; then
  trap time_limit_approaching "$MAELFLOW_WARNING_SIGNAL"
  # it came while the header was starting (the first line's trap remembered it)
  if [ -n "${MAELFLOW_TIME_LIMIT:-}" ]; then time_limit_approaching; fi
fi

# Steps write a one-line reason here before failing; the abort then shows it instead of an exit code.
export MAELFLOW_ABORT_FILE="${TMPDIR:-/tmp}/maelflow-abort.$$"
rm -f "$MAELFLOW_ABORT_FILE"
# run: start one step in the background and wait, so a kill reaches it at once
run() {
  "$@" &
  local pid=$! rc=0
  while :; do
    rc=0
    wait $pid || rc=$?
    # a trapped signal (the warning) interrupts wait while the step runs on: wait again
    if [ $rc -gt 128 ] && kill -0 $pid 2>/dev/null; then continue; fi
    break
  done
  if [ $rc -ne 0 ]; then
    [ -s "$MAELFLOW_ABORT_FILE" ] && MAELFLOW_ABORT_REASON="$(head -c 400 "$MAELFLOW_ABORT_FILE")"
    rm -f "$MAELFLOW_ABORT_FILE"
    exit $rc
  fi
}
%include <site.h>
# ---- end of header ---------------------------------------------------------------------------
