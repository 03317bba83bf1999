#!/usr/bin/env bash
# Train on a lent GPU in stages until a deadline, and send back the state that resumes the training here.
#
#   bash benchmarks/gpu_train.sh CONFIG SECONDS [STAGE_STEPS]
#
# Installs the carried wheels (.whl/, made by benchmarks/gpu_wheels.sh) when there are any, then reruns
# `adadiff-bench train` on a copy of CONFIG whose [train] steps grow by STAGE_STEPS (default 2000) a stage, up to
# the config's own cap. Each stage resumes from out_dir/last.pt, as a rerun of the same config does. It stops
# when the held-out rule ends the training, at the cap, or before a stage that would not end within SECONDS.
# With $OUT set (the device tool), out_dir/last.pt comes back split into 15 MiB parts; here,
#   cat last.pt.part-* > <out_dir>/last.pt && adadiff-bench train --config CONFIG
# resumes it (on the CPU or the next GPU) and, once it has stopped, exports the checkpoint and its report.
# Exit status: 0 when every stage it started ended well; 2 for bad arguments.
set -uo pipefail
cd "$(dirname "$0")/.."
config=${1:-}
seconds=${2:-}
stage=${3:-2000}
if [ -z "$config" ] || [ ! -f "$config" ] || ! [[ "$seconds" =~ ^[0-9]+$ && "$stage" =~ ^[0-9]+$ ]]; then
    echo "gpu_train.sh: usage: bash benchmarks/gpu_train.sh CONFIG SECONDS [STAGE_STEPS] (CONFIG a training TOML)" >&2
    exit 2
fi
PYTHON=${PYTHON:-python3}
source benchmarks/gpu_site.sh
if compgen -G ".whl/*.whl" >/dev/null; then
    install_carried_wheels gpu_train.sh || exit 1
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONHASHSEED=0 MPLBACKEND=Agg PYTHONUNBUFFERED=1

read -r cap out_dir < <("$PYTHON" -c "import sys
from adadiff_bench.errors import UserError
from adadiff_bench.training import load_train_config
try:
    t = load_train_config(sys.argv[1]).train
except UserError as error:
    sys.exit(f'gpu_train.sh: {error}')
print(t.steps, t.out_dir)" "$config") || exit 2
staged=$(mktemp --suffix=.toml)
log=${OUT:-/tmp}/gpu_train.log
status=0
target=0
last_stage_s=0
while [ "$target" -lt "$cap" ]; do
    if [ $((SECONDS + last_stage_s + 10)) -gt "$seconds" ]; then
        echo "== [${SECONDS} s] deadline: the next stage would end after ${seconds} s"
        break
    fi
    target=$((target + stage > cap ? cap : target + stage))
    sed -E "s/^steps[[:space:]]*=.*/steps = $target/" "$config" > "$staged"
    echo "== [${SECONDS} s] stage: steps up to $target of $cap"
    started=$SECONDS
    "$PYTHON" -m adadiff_bench train --config "$staged" --no-progress --no-end-report 2>&1 | tee -a "$log"
    [ "${PIPESTATUS[0]}" = 0 ] || { status=1; break; }
    last_stage_s=$((SECONDS - started))
    if grep -q "held-out loss has not improved" "$log"; then
        echo "== [${SECONDS} s] the held-out rule stopped the training"
        break
    fi
done
rm -f "$staged"
if [ -n "${OUT:-}" ] && [ -f "$out_dir/last.pt" ]; then
    split -b 15M -d "$out_dir/last.pt" "$OUT/last.pt.part-"
    ls -l "$OUT"
fi
echo "== [${SECONDS} s] done (exit status $status)"
exit "$status"
