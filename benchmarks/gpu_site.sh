# Sourced by benchmarks/gpu.sh and benchmarks/gpu_train.sh (run from the repository's root, $PYTHON set).
# install_carried_wheels NAME: install the wheels carried in .whl/ (benchmarks/gpu_wheels.sh makes them) into
# $GPU_SH_SITE (default /tmp/site) and put it on PYTHONPATH; NAME prefixes the one-line error.
install_carried_wheels() {
    local site=${GPU_SH_SITE:-/tmp/site}
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
        || { echo "$1: installing the wheels in .whl/ failed" >&2; return 1; }
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    echo "installed $(ls .whl/*.whl | wc -l) wheels from .whl/ into $site"
}
