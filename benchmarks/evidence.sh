#!/usr/bin/env bash
# Does SoCo pretraining help on your data? One prepared experiment: selective-search proposals,
# short pretraining runs with three box sources through the same network -- SoCo's selective-search
# proposals, whole_image (image-level BYOL) and random boxes -- with several seeds, then the same
# budget for every init compared with random init: object kNN (soco compare --metric knn) and, on
# a GPU, Mask R-CNN fine-tunes (soco compare --metric finetune). Same labelled images and seeds for
# every init; the reports give mean +- sd and the paired difference against random init with a 95%
# interval: $OUT/compare_knn/report.{md,json,png} and $OUT/compare_ft/report.{md,json,png}.
#
#   PROFILE=gpu   one GPU, an estimated 10-15 minutes on an H200 (not run yet) (2 pretraining seeds x 3 sources, 300-iteration
#                 fine-tunes, 2 seeds)
#   PROFILE=cpu   2 CPU cores, about 80 minutes: 3 seeds x 3 sources of one tiny-preset epoch, object kNN
#                 only (the README's coco_pool table)
#   PROFILE=smoke every command at toy sizes on a CPU (under 2 minutes): checks the script, measures nothing
#
#   PROFILE=gpu PRETRAIN_IMAGES=unlabelled/ TRAIN_JSON=train.json VAL_JSON=val.json \
#       LABELLED_IMAGES=imgs/ OUT=evidence bash benchmarks/evidence.sh
#
# PRETRAIN_IMAGES (a folder or a list file) must not hold the val images: soco compare refuses, by
# content, when it does. Everything resumes: rerun the same command after an interruption.
set -euo pipefail

: "${PRETRAIN_IMAGES:?folder or list file of unlabelled pretraining images}"
: "${TRAIN_JSON:?COCO JSON of the labelled training images}"
: "${VAL_JSON:?COCO JSON of the evaluation images}"
: "${LABELLED_IMAGES:?image folder of both JSONs}"
OUT=${OUT:-transfer}
SOCO=${SOCO:-soco}

PROFILE=${PROFILE:-gpu}
case "$PROFILE" in
smoke)
    PRETRAIN_SEEDS=${PRETRAIN_SEEDS:-1}; SEEDS=${SEEDS:-1}; FT_ITERS=${FT_ITERS:-2}; DEVICE=${DEVICE:-cpu}
    PRETRAIN_SET=(--preset tiny --set train.epochs=1 --set train.warmup_epochs=0
                  --set train.per_device_batch=2 --set train.batch_size=2 --set train.workers=0
                  --set data.views.v1_size=64 --set data.views.v2_size=64 --set data.views.v3_size=32
                  --set "data.views.level_bounds=[14, 27, 55]" --max-steps 2)
    FT_SET=(--batch 1 --train-sizes 128 --max-size 160 --roi-batch 32 --test-proposals 50 --detections 10
            --precise-bn 0 --workers 0)
    KNN_SET=(--size 64 --workers 0)
    ;;
cpu)
    # The tiny preset (96 px views, batch 8, lr 0.125) for one epoch without warm-up: about 5 s a
    # step on 2 cores, so 3 sources x 3 seeds of a 541-image set take about an hour.
    PRETRAIN_SEEDS=${PRETRAIN_SEEDS:-3}; SEEDS=${SEEDS:-3}; FT_ITERS=${FT_ITERS:-0}; DEVICE=${DEVICE:-cpu}
    PRETRAIN_SET=(--preset tiny --set train.epochs="${EPOCHS:-1}" --set train.warmup_epochs=0 --workers 1)
    FT_SET=(--batch 2 --train-sizes 288 --max-size 480 --roi-batch 128 --workers 1)
    KNN_SET=(--workers 1)
    ;;
gpu)
    # A short run of the paper's FPN recipe (views 224/224/112, K=4, LARS, EMA 0.99 -> 1) at batch
    # 128 without compiling (compiling costs ~4 minutes, more than one arm). base_lr 8 gives lr 4 at
    # batch 128, the per-step LARS rate of the paper's lr 8 at batch 2048 halved for the short run.
    PRETRAIN_SEEDS=${PRETRAIN_SEEDS:-2}; SEEDS=${SEEDS:-2}; FT_ITERS=${FT_ITERS:-300}; DEVICE=${DEVICE:-cuda}
    PRETRAIN_SET=(--preset fpn-100ep --set train.batch_size=128 --set train.per_device_batch=128
                  --set train.epochs="${EPOCHS:-30}" --set train.warmup_epochs=2 --set train.compile=false
                  --set train.base_lr="${BASE_LR:-8.0}" --set train.checkpoint_every=1000000
                  --set train.workers="${WORKERS:-14}" --set data.views.no_proposals=whole_image)
    # Short fine-tunes at reduced sizes (bf16): the same budget for every init.
    FT_SET=(--batch 8 --train-sizes 512-640 --max-size 1066 --test-size 640 --precision bf16 --precise-bn 50
            --workers "${WORKERS:-14}")
    KNN_SET=(--workers "${WORKERS:-14}")
    ;;
*)
    echo "PROFILE must be gpu, cpu or smoke, got $PROFILE" >&2; exit 2 ;;
esac

echo "== proposals"
"$SOCO" proposals "$PRETRAIN_IMAGES" -o "$OUT/proposals"

declare -A SOURCE_ARGS=(
    [soco]="--proposals $OUT/proposals"
    [image]="--set data.views.proposal_source=whole_image"
    [random]="--set data.views.proposal_source=random"
)
INITS=(--init none)
for arm in soco image random; do
    runs=()
    for ((seed = 0; seed < PRETRAIN_SEEDS; seed++)); do
        run="$OUT/runs/$arm-s$seed"
        echo "== pretrain $arm, seed $seed -> $run"
        # shellcheck disable=SC2086  # SOURCE_ARGS holds several words on purpose
        "$SOCO" pretrain "${PRETRAIN_SET[@]}" ${SOURCE_ARGS[$arm]} --images "$PRETRAIN_IMAGES" --out "$run" \
            --set train.seed="$seed" --set data.seed="$seed"
        runs+=("$run")
    done
    INITS+=(--init "$arm=$(IFS=,; echo "${runs[*]}")")
done

DATA=(--train-json "$TRAIN_JSON" --train-images "$LABELLED_IMAGES" --val-json "$VAL_JSON"
      --val-images "$LABELLED_IMAGES" --seeds "$SEEDS" --device "$DEVICE")
echo "== object kNN of every init"
"$SOCO" compare --metric knn "${INITS[@]}" "${DATA[@]}" "${KNN_SET[@]}" --out "$OUT/compare_knn"
if [ "$FT_ITERS" -gt 0 ]; then
    echo "== fine-tune every init for $FT_ITERS iterations"
    "$SOCO" compare --metric finetune "${INITS[@]}" "${DATA[@]}" --max-iters "$FT_ITERS" "${FT_SET[@]}" \
        --out "$OUT/compare_ft"
    cat "$OUT/compare_ft/report.md"
fi
cat "$OUT/compare_knn/report.md"
