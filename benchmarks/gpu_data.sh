#!/usr/bin/env bash
# Photos and proposals for benchmarks/gpu.py's end-to-end rows, made here (CPU) before a GPU lease.
#
#     bash benchmarks/gpu_data.sh PHOTO_FOLDER [N]     # default N = 200 photos
#
# Copies the first N JPEGs of PHOTO_FOLDER (sorted) into .gpu_data/images (ignored by git: never
# commit photos) and runs `soco proposals` on them into .gpu_data/proposals (the paper's search;
# resumes if interrupted). The folder stays under the device tool's 64 MiB working-tree limit for
# COCO-sized photos (200 x ~230 KB = ~46 MB); name it in the tool's `carry`. Then, on the GPU machine:
#
#     PYTHONPATH=src PYTHONUNBUFFERED=1 python3 benchmarks/gpu.py --out $OUT \
#         --images .gpu_data/images --proposals .gpu_data/proposals --workers 14 --budget-s 450
set -euo pipefail
src=${1:?usage: bash benchmarks/gpu_data.sh PHOTO_FOLDER [N]}
n=${2:-200}
root=$(cd "$(dirname "$0")/.." && pwd)
out="$root/.gpu_data"
soco=${SOCO:-soco}
mkdir -p "$out/images"
# (process substitution: head closing the pipe early must not fail the script under pipefail)
mapfile -t photos < <(find "$src" -maxdepth 1 -type f \( -iname '*.jpg' -o -iname '*.jpeg' \) | sort | head -n "$n")
if [ "${#photos[@]}" -eq 0 ]; then
    echo "gpu_data.sh: $src: no .jpg or .jpeg files (the end-to-end rows time JPEG decoding)" >&2
    exit 2
fi
cp -n "${photos[@]}" "$out/images/"
echo "$(find "$out/images" -type f | wc -l) photos in $out/images ($(du -sh "$out/images" | cut -f1))"
"$soco" proposals "$out/images" -o "$out/proposals" --no-progress
echo "done: carry .gpu_data (total $(du -sh "$out" | cut -f1))"
