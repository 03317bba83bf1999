#!/usr/bin/env bash
# The device tool carries the working tree to a lent GPU only under 64 MiB, and the committed reference runs
# make it about 100 MiB. `aside` moves the committed run folders (no GPU step reads them) out of the tree (to
# $GPU_TREE_ASIDE, default /tmp/adadiff-gpu-aside) and prints the size left; `back` puts them back. They are
# committed, so `git checkout -- results reports` also restores them if the move back is ever lost.
#
#   bash benchmarks/gpu_tree.sh aside   # before the device tool's run
#   bash benchmarks/gpu_tree.sh back    # after it
set -euo pipefail
cd "$(dirname "$0")/.."
aside=${GPU_TREE_ASIDE:-/tmp/adadiff-gpu-aside}
# every committed folder under results/ and reports/ but the demo's, as git lists them (a run committed later is
# moved too); git's index still lists them while they are aside, so `back` finds the same folders
mapfile -t FOLDERS < <(git ls-files -- results reports | awk -F/ 'NF > 2 {print $1 "/" $2}' | sort -u \
                       | grep -v -x -e results/demo -e reports/demo || true)
case "${1:-}" in
    aside)
        for folder in "${FOLDERS[@]}"; do
            if [ -e "$folder" ]; then
                mkdir -p "$aside/$(dirname "$folder")"
                [ ! -e "$aside/$folder" ] || { echo "gpu_tree.sh: $aside/$folder exists; run 'back' first" >&2; exit 2; }
                mv "$folder" "$aside/$folder"
            fi
        done
        size=$({ git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null || true; } \
               | awk '{s += $1} END {printf "%.1f", s / 2^20}')  # (files moved aside fail stat: not counted)
        echo "moved aside to $aside; the tree that travels is now $size MiB (+ carried paths; the limit is 64)"
        ;;
    back)
        for folder in "${FOLDERS[@]}"; do
            [ -e "$aside/$folder" ] || continue
            [ ! -e "$folder" ] || { echo "gpu_tree.sh: both $folder and $aside/$folder exist; keep one" >&2; exit 2; }
            mv "$aside/$folder" "$folder"
        done
        echo "put back from $aside"
        ;;
    *)
        echo "gpu_tree.sh: usage: bash benchmarks/gpu_tree.sh aside|back" >&2
        exit 2
        ;;
esac
