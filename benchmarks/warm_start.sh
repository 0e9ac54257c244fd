#!/usr/bin/env bash
# Warm start vs from scratch at equal pretraining steps: does starting SoCo from supervised weights
# help, and does SoCo on top of them help? One prepared experiment:
#
#   1. a supervised ResNet-50 made here (nothing can be downloaded): benchmarks/supervised_crops.py
#      trains a torchvision ResNet-50 to classify TRAIN_JSON's labelled object crops;
#   2. three SoCo runs with the same steps, data, seed and views: from scratch (random init, the
#      paper), warm-head (--init the supervised file, train.freeze=backbone: FPN + box head
#      pretrained, as the fpn-head-warm preset) and warm-all (--init, everything trainable, a tenth
#      of the lr, as the fpn-warm preset);
#   3. object kNN of every init (soco compare --metric knn): random init, the supervised file
#      untouched, and the three runs. The supervised file has no FPN or box head, so kNN reads it
#      as a ResNet (res5 on C4 features, 2048-d; evaluate/knn.py), the runs through their FPN box
#      head (1024-d).
#
#   PROFILE=cpu   2 CPU cores, about an hour: 4 supervised epochs, one tiny-preset epoch per run
#   PROFILE=smoke every command at toy sizes (minutes): checks the script, measures nothing
#
#   PROFILE=cpu PRETRAIN_IMAGES=pretrain.txt TRAIN_JSON=train.json VAL_JSON=val.json \
#       LABELLED_IMAGES=imgs/ OUT=warm bash benchmarks/warm_start.sh
#
# PRETRAIN_IMAGES must not hold VAL_JSON's images (soco compare refuses, by content). Everything
# resumes: rerun the same command after an interruption.
set -euo pipefail

: "${PRETRAIN_IMAGES:?folder or list file of unlabelled pretraining images}"
: "${TRAIN_JSON:?COCO JSON of the labelled training images (also the supervised crops)}"
: "${VAL_JSON:?COCO JSON of the evaluation images}"
: "${LABELLED_IMAGES:?image folder of both JSONs}"
OUT=${OUT:-warm}
SOCO=${SOCO:-soco}
PYTHON=${PYTHON:-python}
HERE=$(cd "$(dirname "$0")" && pwd)

PROFILE=${PROFILE:-cpu}
case "$PROFILE" in
smoke)
    SUP_SET=(--epochs 1 --batch 8 --size 64)
    PRETRAIN_SET=(--preset tiny --set train.epochs=1 --set train.warmup_epochs=0
                  --set train.per_device_batch=2 --set train.batch_size=2 --set train.workers=0
                  --set data.views.v1_size=64 --set data.views.v2_size=64 --set data.views.v3_size=32
                  --set "data.views.level_bounds=[14, 27, 55]" --max-steps 2)
    LR_ALL=0.4; SEEDS=${SEEDS:-1}
    KNN_SET=(--size 64 --workers 0)
    ;;
cpu)
    # The tiny preset (96 px views, batch 8, base_lr 4 = lr 0.125) for one epoch without warm-up,
    # as the README's earlier coco_pool experiment: 67 steps on 541 photos.
    SUP_SET=(--epochs 4 --batch 32 --size 96)
    PRETRAIN_SET=(--preset tiny --set train.epochs="${EPOCHS:-1}" --set train.warmup_epochs=0 --workers 1)
    LR_ALL=0.4; SEEDS=${SEEDS:-1}   # warm-all: a tenth of the tiny preset's base_lr (fpn-warm's rule)
    KNN_SET=(--workers 1)
    ;;
*)
    echo "PROFILE must be cpu or smoke, got $PROFILE" >&2; exit 2 ;;
esac

SUP="$OUT/supervised_r50.pth"
if [ ! -f "$SUP" ]; then
    echo "== supervised ResNet-50 on the object crops of $TRAIN_JSON"
    "$PYTHON" "$HERE/supervised_crops.py" --train-json "$TRAIN_JSON" --images "$LABELLED_IMAGES" -o "$SUP" "${SUP_SET[@]}"
fi

echo "== proposals"
"$SOCO" proposals "$PRETRAIN_IMAGES" -o "$OUT/proposals"

declare -A ARM_ARGS=(
    [scratch]=""
    [warm-head]="--init $SUP --set train.freeze=backbone"
    [warm-all]="--init $SUP --set train.base_lr=$LR_ALL"
)
INITS=(--init none --init "supervised=$SUP")
for arm in scratch warm-head warm-all; do
    run="$OUT/runs/$arm"
    echo "== pretrain $arm -> $run"
    # shellcheck disable=SC2086  # ARM_ARGS holds several words on purpose
    "$SOCO" pretrain "${PRETRAIN_SET[@]}" ${ARM_ARGS[$arm]} --proposals "$OUT/proposals" \
        --images "$PRETRAIN_IMAGES" --out "$run"
    INITS+=(--init "$arm=$run")
done

echo "== object kNN of every init"
"$SOCO" compare --metric knn "${INITS[@]}" --train-json "$TRAIN_JSON" --train-images "$LABELLED_IMAGES" \
    --val-json "$VAL_JSON" --val-images "$LABELLED_IMAGES" --seeds "$SEEDS" --device cpu "${KNN_SET[@]}" \
    --out "$OUT/compare_knn"
cat "$OUT/compare_knn/report.md"
