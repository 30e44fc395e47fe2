#!/usr/bin/env bash
# Makes docs/images/ecflow-ui-demo.png again: the demo suite in ecFlow UI, on a virtual X display.
#
#   docs/images/make-ecflow-ui-picture.sh [WORKSPACE]
#
# WORKSPACE defaults to a new temporary folder, removed at the end; a given one is kept, and must not
# have the suites /demo or /broken loaded yet (the script refuses). The script
#   1. starts `maelflow demo` in the background with its Lightning training `tiny` only, for 250
#      epochs instead of 3 (outputs in WORKSPACE/picture-outputs, so the training starts from
#      epoch 0 even where one has run before),
#   2. deploys a second suite, /broken, whose dataset has a source that does not exist and no
#      recipe to build it: its publish task aborts,
#   3. opens ecflow_ui on a private Xvfb display, expands the tree with xdotool, waits until the
#      training is past epoch 100, refreshes (F5) and takes the picture with ImageMagick's import,
#   4. lets the demo finish, stops ecflow_ui and Xvfb (by PID) and runs `maelflow services down`.
# Needs the Debian packages xvfb, xdotool, imagemagick and ecflow-client (scripts/install.sh).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
MAELFLOW="${MAELFLOW:-$root/.venv/bin/maelflow}"
PYTHON="${PYTHON:-$root/.venv/bin/python}"
if [ $# -ge 1 ]; then ws="$1" own_ws=""; else own_ws="$(mktemp -d)"; ws="$own_ws/ws"; fi
out="$here/ecflow-ui-demo.png"
scratch="$(mktemp -d)"
screen_w=1600 screen_h=1100   # Xvfb screen; the window is sized to it for the clicks
pic_w=1280                    # the picture keeps the left part, where the tree is
xvfb_pid="" ui_pid="" demo_pid="" services_started=0

for tool in Xvfb xdotool import convert ecflow_ui; do
  command -v "$tool" >/dev/null || { echo "make-ecflow-ui-picture: $tool not found (apt-get install xvfb xdotool imagemagick ecflow-client)" >&2; exit 1; }
done

mf() { "$MAELFLOW" "$@" --workspace "$ws"; }
say() { echo "make-ecflow-ui-picture: $*"; }

cleanup() {
  set +e
  if [ -n "$ui_pid" ]; then kill -- "-$ui_pid" 2>/dev/null; fi   # ecflow_ui (a shell wrapper) and ecflow_ui.x: own process group
  if [ -n "$xvfb_pid" ]; then kill "$xvfb_pid" 2>/dev/null; wait "$xvfb_pid" 2>/dev/null; fi
  if [ -n "$demo_pid" ] && kill -0 "$demo_pid" 2>/dev/null; then
    # stopped early: a running job outlives the server (it waits for it to come back), kill it first
    mf kill /demo/local/train >/dev/null 2>&1
    for _ in $(seq 60); do kill -0 "$demo_pid" 2>/dev/null || break; sleep 1; done
    kill "$demo_pid" 2>/dev/null; wait "$demo_pid" 2>/dev/null
  fi
  if [ "$services_started" = 1 ]; then mf services down && [ -n "$own_ws" ] && rm -rf "$own_ws"; fi
  rm -rf "$scratch"
}
trap cleanup EXIT

# ---- the suites ---------------------------------------------------------------------------------
say "workspace $ws"
services_started=1
mf services up >/dev/null
# deploying over a loaded suite would replace it; this script wants fresh ones
if mf status --json | grep -q '"path": "/\(demo\|broken\)"'; then
  echo "make-ecflow-ui-picture: $ws already has the suite /demo or /broken: use a new workspace" >&2
  exit 1
fi
rm -rf "$ws/picture-outputs"
mf demo 'trainings=[tiny]' training.tiny.config.max_epochs=250 "site.local.paths.outputs=$ws/picture-outputs" \
  --timeout 900 \
  >"$scratch/demo.log" 2>&1 &
demo_pid=$!
for _ in $(seq 120); do mf status demo >/dev/null 2>&1 && break; sleep 1; done   # /demo loaded first
# expected to abort: exit status 1
mf deploy demo name=broken 'description=demo whose dataset source is missing' 'trainings=[]' \
   dataset.synth-demo-local-5p0-2020-2020-6h-v1.recipe=null dataset.synth-demo-local-5p0-2020-2020-6h-v1.source=/nonexistent/synth-demo-local-5p0-2020-2020-6h-v1.zarr \
   --wait --timeout 120 || true
port="$(mf services status --json | "$PYTHON" -c 'import json, sys; print(json.load(sys.stdin)["ecflow"]["port"])')"
# the server admits only its owner, with the workspace's password file
export ECF_PASSWD="$(mf services status --json | "$PYTHON" -c 'import json, sys; print(json.load(sys.stdin)["ecflow"]["passwd_file"] or "")')"
say "ecflow_server on 127.0.0.1:$port"

# ---- ecFlow UI on a private display -------------------------------------------------------------
# -displayfd: Xvfb picks a free display number itself and writes it to fd 5
Xvfb -displayfd 5 -screen 0 "${screen_w}x${screen_h}x24" -nolisten tcp 5>"$scratch/display" 2>"$scratch/xvfb.log" &
xvfb_pid=$!
for _ in $(seq 100); do [ -s "$scratch/display" ] && break; sleep 0.1; done
[ -s "$scratch/display" ] || { echo "Xvfb did not start: $(cat "$scratch/xvfb.log")" >&2; exit 1; }
export DISPLAY=":$(head -1 "$scratch/display")"
say "Xvfb on display $DISPLAY (pid $xvfb_pid)"

mkdir -p "$scratch/home" "$scratch/tmp"
# throwaway HOME (ecflow_ui keeps its settings in ~/.ecflow_ui_v5) and TMPDIR; -ts: a temporary session, no dialogs
HOME="$scratch/home" TMPDIR="$scratch/tmp" QT_X11_NO_MITSHM=1 \
  setsid ecflow_ui -ts 127.0.0.1 "$port" >"$scratch/ui.log" 2>&1 </dev/null &
ui_pid=$!
win="$(timeout 60 xdotool search --sync --onlyvisible --name 'ecFlowUI.*session' | head -1)"
sleep 5   # let the UI load the server's tree
xdotool windowmove "$win" 0 0 windowsize "$win" "$screen_w" "$screen_h"
sleep 2

key() { xdotool key "$@"; sleep 0.4; }
xdotool mousemove $((screen_w - 57)) 64 click 1; sleep 1   # "Maximise" of the tree panel
xdotool mousemove 85 87 click 1; sleep 0.5                 # the server node
# Rows are nodes and their attributes (labels, meters, events, limits, triggers), one per line.
key Right                    # server: shows the suites demo and broken
key Down Down                # broken (demo is still collapsed)
key Right                    # broken, one level: info, 2 limits, provenance, publish, local
key Down Down Down Down Down # broken/publish
key asterisk                 # expand everything under it, down to the aborted task
key Up Up Up Up Up Up        # back to demo
key asterisk                 # expand all of demo
key Down Down Down Down Down Down  # demo/publish: complete and like stage below, so
key Left                     # collapse it to make room for /broken
key Up Up Up Up Up Up        # leave demo selected

# ---- wait until the training shows a meter well under way, then take the picture -------------
say "waiting for the training to pass epoch 100"
for _ in $(seq 300); do
  epoch="$(mf status demo --json | "$PYTHON" -c '
import json, sys
def walk(n):
    if n["path"] == "/demo/local/train/tiny/train":
        print(n["meters"]["epoch"]["value"] if n["state"] == "active" else -1); return True
    return any(walk(c) for c in n.get("children", []))
walk(json.load(sys.stdin)["suites"][0])')"
  [ "$epoch" -ge 100 ] && break
  sleep 1
done
[ "$epoch" -ge 100 ] || { echo "the training did not reach epoch 100 (last: $epoch)" >&2; exit 1; }
key F5                       # refresh now (the UI polls every 60 s)
sleep 3
xdotool windowsize "$win" "$pic_w" "$screen_h"; sleep 2
import -window root "$scratch/shot.png"
convert "$scratch/shot.png" -crop "${pic_w}x${screen_h}+0+0" +repage -strip -colors 256 "$out"
say "wrote $out ($(stat -c %s "$out") bytes)"
say "letting the demo finish"
wait "$demo_pid" || true
demo_pid=""
cat "$scratch/demo.log"
