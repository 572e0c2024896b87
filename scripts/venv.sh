#!/usr/bin/env bash
# Create (or reuse) the project virtual environment and print its path.
# The venv lives outside the checkout, keyed by a hash of the dependency spec (setup.cfg's
# install_requires/extras + constraints.txt), so a fresh clone (CI) reuses it in seconds and a
# dependency change builds a new one. The package itself is (re)installed editable every time.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
SPEC_HASH=$("$PY" - <<'PYEOF'
import configparser, hashlib
cfg = configparser.ConfigParser(); cfg.read("setup.cfg")
spec = cfg["options"]["install_requires"] + str(dict(cfg["options.extras_require"]))
spec += open("constraints.txt").read()
print(hashlib.sha256(spec.encode()).hexdigest()[:12])
PYEOF
)
CACHE=${SEGREPORT_VENV_CACHE:-$HOME/.cache/segreport}
VENV=$CACHE/venv-$SPEC_HASH
export PIP_CONSTRAINT=$PWD/constraints.txt PIP_DISABLE_PIP_VERSION_CHECK=1
# sam2 (pulled by monailabel) builds as pure Python without its CUDA extension
export SAM2_BUILD_CUDA=0
if [ ! -f "$VENV/.complete" ]; then
    echo "[venv] building $VENV (first time for this dependency spec: a few minutes)" >&2
    rm -rf "$VENV"; mkdir -p "$CACHE"
    "$PY" -m venv "$VENV"
    # torch first, alone: it is the large pinned pair every other package must accept
    "$VENV/bin/pip" install -q torch torchvision >&2
    "$VENV/bin/pip" install -q -e ".[test,text-encoders,label]" >&2
    touch "$VENV/.complete"
else
    "$VENV/bin/pip" install -q --no-deps --no-build-isolation -e . >&2
fi
ln -sfn "$VENV" .venv
# WordNet for METEOR: found, downloaded, or taken from ../shared/nltk_data; else a clear error.
"$VENV/bin/python" -m segreport.text.nltk_setup >&2
echo "$VENV"
