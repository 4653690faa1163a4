#!/usr/bin/env bash
# Download the wheels that scripts/gpu_check.sh installs offline on the GPU machine into
# .whl/ (gitignored). That machine has python 3.12 with torch, numpy, pyyaml, tqdm,
# matplotlib, tensorboard, cloudpickle and pytest, but no gymnasium, MuJoCo or SB3.
# Usage (repo root, with network): bash scripts/fetch_gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=.whl
mkdir -p "$DEST"
# name==version, pinned to what this project is tested with here; mujoco 4 is split
# into mujoco + mujoco-core (+ mujoco-studio, the viewer: never imported here, so left out;
# installed with --no-deps). Requires-Dist of each wheel is printed below.
PACKAGES=(
    gymnasium==1.4.0
    farama-notifications==0.0.6
    mujoco==4.0.0
    mujoco-core==4.0.0
    glfw==2.11.0
    pyopengl==3.1.10
    stable-baselines3==2.9.2
)
for pkg in "${PACKAGES[@]}"; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 -d "$DEST" "$pkg"
done
echo "wheels in $DEST ($(du -sh "$DEST" | cut -f1)):"
for w in "$DEST"/*.whl; do
    deps=$(unzip -p "$w" '*.dist-info/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' \
        | sed 's/Requires-Dist: //' | tr '\n' ',' || true)
    echo "  $(basename "$w")  requires: ${deps%,}"
done
