#!/usr/bin/env bash
# Installs maelflow and everything it runs against on a fresh Debian bookworm machine, as root.
#
# Idempotent: re-running installs only what is missing. The Debian packages are the real services
# maelflow drives (ecflow_server, sshd, SLURM, munge); the virtual environment is built from the
# Debian interpreter with system site-packages because python3-ecflow is compiled against it and is
# not on PyPI. Services are never started by the packages (policy-rc.d): maelflow starts its own,
# on loopback, in a workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
# --anemoi-current: also the second environment .venv-anemoi17, with the current anemoi line (0.17)
# for its tests (scripts/install-anemoi-current.sh); .venv keeps anemoi 0.10
ANEMOI_CURRENT=0
for arg in "$@"; do
  case "$arg" in
    --anemoi-current) ANEMOI_CURRENT=1 ;;
    *) echo "install: unknown option $arg (known: --anemoi-current)" >&2; exit 2 ;;
  esac
done

DEBS=(ecflow-server ecflow-client python3-ecflow python3-venv openssh-server slurm-wlm munge gcc libc6-dev
      xvfb xdotool imagemagick chromium chromium-driver rsync postgresql
      bubblewrap)  # bubblewrap: the container prefix of a site (docs/sites.md) tried without Apptainer
missing=()
for p in "${DEBS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install: Debian packages: ${missing[*]}"
  policy_created=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\n# maelflow install: packages must not start services\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d; policy_created=1
  fi
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
  [ "$policy_created" = 1 ] && rm -f /usr/sbin/policy-rc.d
fi

if [ ! -x .venv/bin/python ]; then
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
.venv/bin/python -m pip install -q -U pip wheel
# The CPU torch build is pinned in constraints.txt: letting pip choose would download CUDA wheels.
.venv/bin/python -m pip install -q -c constraints.txt torch==2.13.0
.venv/bin/python -m pip install -q -c constraints.txt -e ./transfer -e ./registry -e '.[test,anemoi]' -e ./sandbox -e ./tests/plugins/maelflow-testsched
# pip does not byte-compile editable installs. Compiled once here, the project's modules are not
# compiled again by every command and job that imports them where bytecode cannot be written (a
# checkout owned by another user than the one running the jobs, PYTHONDONTWRITEBYTECODE).
.venv/bin/python -m compileall -q src transfer/src registry/src sandbox/src
# ecflow_server, slurmctld and slurmd have no bind option: an LD_PRELOAD helper keeps them on
# 127.0.0.1. Compiled here, once (again only when its source is newer), beside its sandbox module.
.venv/bin/python -m maelflow.services.loopback
# PyPI's torchvision is a CUDA build that cannot load beside CPU torch; timm (anemoi) imports it.
# A start-up hook declares the two missing operator schemas when torch is CPU-only (see the module).
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "import maelflow_sandbox.tvshim" > "$site/zz_maelflow_tvshim.pth"
.venv/bin/python -c 'import ecflow, maelflow; print("install: ecflow", ecflow.__version__, "maelflow", maelflow.__version__)'
if [ "$ANEMOI_CURRENT" = 1 ]; then
  bash scripts/install-anemoi-current.sh
fi
