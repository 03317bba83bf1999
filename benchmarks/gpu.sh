#!/usr/bin/env bash
# One run on a lent GPU: install the carried wheels, print the environment, run the CUDA tests
# (tests/test_cuda.py and every test named with "cuda"), benchmarks/gpu_check.py and benchmarks/gpu_profile.py,
# whose reports land in benchmarks/results/gpu-<gpu name>.md and gpu-<gpu name>-profile.md (and, with $OUT set,
# in $OUT with the whole log, gpu.log), then paper_cost.py's DiT-XL/2 probe (in the log). About 8-9 minutes on an
# H200 (5.3 measured without the profile and the probe): give the device tool's call its 600 s.
#
#   bash benchmarks/gpu.sh              # on the GPU machine; make .whl/ here first: bash benchmarks/gpu_wheels.sh
#   bash benchmarks/gpu.sh --dry-run    # on the CPU: every step up to the first CUDA call (tests collected only)
#   bash benchmarks/gpu.sh --out PATH   # the report somewhere else
#
# PYTHON (default python3) picks the interpreter. Exit status: 0 when the tests and the check passed.
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

if [ -n "${OUT:-}" ] && [ -z "${GPU_SH_TEED:-}" ]; then  # keep the whole log where the device tool returns files
    GPU_SH_TEED=1 bash "$repo/benchmarks/gpu.sh" "$@" 2>&1 | tee "$OUT/gpu.log"
    exit "${PIPESTATUS[0]}"
fi

PYTHON=${PYTHON:-python3}
dry_run=0
out_file=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --out) out_file=${2:?--out needs a path}; shift ;;
        -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
step() { echo; echo "== [${SECONDS} s] $*"; }
export PYTHONHASHSEED=0 MPLBACKEND=Agg PYTHONUNBUFFERED=1
if [ "$dry_run" = 1 ]; then  # tiny tensors: one thread is faster, and immune to OpenMP stalls on a busy machine
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1}
fi

step "packages"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
source benchmarks/gpu_site.sh
importable() { "$PYTHON" -c "import diffusers, torch_fidelity, fvcore, cleanfid" 2>/dev/null; }
missing="gpu.sh: diffusers, torch-fidelity, fvcore or clean-fid is missing:"
missing+=" run benchmarks/gpu_wheels.sh where pip works and carry .whl/"
if [ "$dry_run" = 1 ] && importable; then
    echo "dry run: the packages are importable here, .whl/ is not installed"
elif compgen -G ".whl/*.whl" >/dev/null; then
    install_carried_wheels gpu.sh || exit 1
    importable || { echo "$missing" >&2; exit 1; }
else
    importable || { echo "$missing" >&2; exit 1; }
fi

step "environment"
GPU_SH_DRY_RUN=$dry_run "$PYTHON" - <<'EOF' || exit 1
import importlib.metadata, os, platform, sys, torch
from adadiff_bench.device import cuda_absence, device_info
print(f"python {platform.python_version()} at {sys.executable}; torch {torch.__version__}, "
      f"built for CUDA {torch.version.cuda}; {torch.get_num_threads()} CPU threads")
for name in ("diffusers", "torch-fidelity", "fvcore", "clean-fid", "numpy", "scipy", "torchvision"):
    print(f"  {name} {importlib.metadata.version(name)}")
if torch.cuda.is_available():
    for index in range(torch.cuda.device_count()):
        print(f"  cuda:{index}: {device_info(torch.device('cuda', index))}")
elif os.environ["GPU_SH_DRY_RUN"] == "1":
    print(f"  no CUDA: {cuda_absence()}")
else:
    sys.exit(f"gpu.sh: no CUDA here ({cuda_absence()}); on a machine without a GPU use --dry-run")
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm \
    --format=csv,noheader

status=0
if [ "$dry_run" = 1 ]; then
    step "CUDA tests: tests/test_cuda.py collected only (dry run)"
    "$PYTHON" -m pytest -q -p no:cacheprovider --collect-only tests/test_cuda.py | tail -n 1 || status=1
    out_file=${out_file:-${TMPDIR:-/tmp}/gpu-dry-run.md}
    step "gpu_check.py --dry-run"
    "$PYTHON" benchmarks/gpu_check.py --dry-run --out "$out_file" || status=1
    device=(--dry-run)
else
    step "CUDA tests: tests/test_cuda.py, then every test named with 'cuda'"
    timeout 170 "$PYTHON" -m pytest -q -p no:cacheprovider -k cuda tests/test_cuda.py tests || status=1
    if [ -z "$out_file" ]; then
        name=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name(0))") || exit 1
        out_file=benchmarks/results/gpu-$(echo "$name" | tr 'A-Z' 'a-z' | sed -E 's/[^a-z0-9]+/-/g; s/^-+|-+$//g').md
    fi
    step "gpu_check.py (report: $out_file)"
    timeout 270 "$PYTHON" benchmarks/gpu_check.py --device cuda --out "$out_file" || status=1
    device=(--device cuda)
fi
profile_file=${out_file%.md}-profile.md
step "gpu_profile.py ${device[*]} (report: $profile_file)"
timeout 150 "$PYTHON" benchmarks/gpu_profile.py "${device[@]}" --out "$profile_file" || status=1
if [ -n "${OUT:-}" ]; then  # (before the last step: a call cut short at its limit still returns the reports)
    for report in "$out_file" "$profile_file"; do [ ! -f "$report" ] || cp "$report" "$OUT/"; done
fi
if [ "$dry_run" = 0 ]; then
    step "paper_cost.py: DiT-XL/2 at ImageNet 256 on the GPU, bf16 (random weights; cost per 1,000 samples)"
    timeout 120 "$PYTHON" benchmarks/paper_cost.py configs/paper/imagenet256_dit_xl2.toml --device cuda \
        --precision bf16 --steps 4 || status=1
fi
step "done (exit status $status; reports: $out_file, $profile_file)"
exit "$status"
