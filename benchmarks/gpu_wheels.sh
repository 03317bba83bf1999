#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the wheels a lent GPU machine lacks, for benchmarks/gpu.sh to install there.
# Run it here, where pip reaches the package registries: Python 3.12 on manylinux x86_64, no dependencies
# fetched, each package at the version this environment has. That machine has torch, torchvision, numpy,
# scipy, pillow, tqdm, requests, regex, filelock, safetensors, huggingface-hub, pyyaml, tabulate,
# portalocker, typing-extensions and zipp, not the packages below. fvcore and iopath publish sources only:
# they are built here into pure-Python wheels. diffusers' importlib-metadata is not needed on Python 3.12.
# It ends by listing every requirement of the wheels that neither that machine nor .whl/ provides, and the
# total size (the device tool carries 64 MiB with the working tree).
#
#   bash benchmarks/gpu_wheels.sh       # PYTHON (default python3) is the environment whose versions are used
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PACKAGES=(diffusers torch-fidelity clean-fid fvcore iopath yacs termcolor)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)

rm -rf .whl && mkdir .whl
for package in "${PACKAGES[@]}"; do
    version=$("$PYTHON" -c "import importlib.metadata as m; print(m.version('$package'))")
    if ! "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            "${PLATFORMS[@]/#/--platform=}" -d .whl "$package==$version" 2>/dev/null; then
        echo "$package $version: no wheel published; building one from its source"
        "$PYTHON" -m pip wheel -q --no-deps -w .whl "$package==$version"
        compgen -G ".whl/${package//-/_}-$version-*-none-any.whl" >/dev/null \
            || { echo "gpu_wheels.sh: $package $version did not build a pure-Python wheel" >&2; exit 1; }
    fi
done

"$PYTHON" - <<'EOF'
import re, sys, zipfile
from pathlib import Path
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ON_THE_GPU_MACHINE = {"torch", "torchvision", "numpy", "scipy", "pillow", "tqdm", "requests", "regex", "filelock",
                      "safetensors", "huggingface-hub", "pyyaml", "tabulate", "portalocker", "typing-extensions",
                      "zipp"}
# required on paper only: diffusers imports the standard library's importlib.metadata on Python >= 3.8
NOT_NEEDED = {"importlib-metadata"}
wheels = sorted(Path(".whl").glob("*.whl"))
carried = {canonicalize_name(wheel.name.split("-")[0]) for wheel in wheels}
missing = []
for wheel in wheels:
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(archive.read(n).decode() for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
    for line in re.findall(r"^Requires-Dist: (.+)$", metadata, re.M):
        requirement = Requirement(line)
        if requirement.marker and not requirement.marker.evaluate({"python_version": "3.12", "extra": ""}):
            continue
        if canonicalize_name(requirement.name) not in ON_THE_GPU_MACHINE | carried | NOT_NEEDED:
            missing.append(f"{wheel.name}: {requirement}")
size = sum(wheel.stat().st_size for wheel in wheels)
for wheel in wheels:
    print(f"  {wheel.name}  {wheel.stat().st_size / 2**20:.2f} MiB")
print(f"{len(wheels)} wheels in .whl/, {size / 2**20:.1f} MiB in all")
if missing:
    sys.exit("gpu_wheels.sh: requirements that neither the GPU machine nor .whl/ provides:\n  " + "\n  ".join(missing))
if size > 40 * 2**20:
    sys.exit("gpu_wheels.sh: over 40 MiB; the device tool carries 64 MiB with the working tree")
EOF
