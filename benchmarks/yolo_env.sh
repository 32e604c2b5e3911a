#!/usr/bin/env bash
# The peer's own environment for benchmarks/detect_vs_yolo.py: a separate venv with Ultralytics.
#
#     bash benchmarks/yolo_env.sh          # creates benchmarks/.venv-yolo; a second run is a no-op
#
# Ultralytics is never a cnnkit dependency: it lives only in this venv. torch/torchvision (and
# numpy, pillow, matplotlib, pyyaml) come from the repository's constraints.txt, so both sides
# of the benchmark run the same torch build. Override the interpreter with PYTHON=..., the
# Ultralytics version with ULTRALYTICS=... (default: the version the benchmark was written for).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/benchmarks/.venv-yolo"
PYTHON="${PYTHON:-python3}"
ULTRALYTICS="${ULTRALYTICS:-8.4.190}"
STAMP="$VENV/.yolo-env-installed"
WANT="ultralytics==$ULTRALYTICS constraints=$(sha256sum "$ROOT/constraints.txt" | cut -c1-16)"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
    echo "benchmarks/.venv-yolo is up to date ($WANT)"
    exit 0
fi

test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
quiet_pip() {  # drop pip's notes about the local index folders that lack a package
    "$VENV/bin/python" -m pip "$@" 2> >(grep -v "is neither a file nor a directory" >&2)
}
quiet_pip install --quiet --disable-pip-version-check -c "$ROOT/constraints.txt" "ultralytics==$ULTRALYTICS"

# opencv-python needs libGL; on a machine without it use the headless build of the same version.
if ! "$VENV/bin/python" -c "import cv2" 2>/dev/null; then
    CV="$("$VENV/bin/python" -c "from importlib.metadata import version; print(version('opencv-python'))")"
    quiet_pip uninstall --quiet -y opencv-python
    quiet_pip install --quiet --disable-pip-version-check "opencv-python-headless==$CV"
fi

# importing ultralytics writes a settings file into YOLO_CONFIG_DIR: keep it inside the venv
YOLO_CONFIG_DIR="$VENV/yolo-config" YOLO_OFFLINE=1 "$VENV/bin/python" - <<'EOF'
import torch, torchvision, ultralytics
print(f"benchmarks/.venv-yolo: ultralytics {ultralytics.__version__}, torch {torch.__version__}, "
      f"torchvision {torchvision.__version__}")
EOF
echo "$WANT" > "$STAMP"
