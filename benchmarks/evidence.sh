#!/usr/bin/env bash
# Does SoCo pretraining help on your data? One prepared experiment: selective-search proposals,
# pretraining runs with three box sources through the same network -- SoCo's selective-search
# proposals, whole_image (image-level BYOL) and random boxes -- with several seeds, then the same
# probe for every init against random init: the object probe (soco compare --metric knn) and, on a
# GPU, Mask R-CNN fine-tunes (soco compare --metric finetune). Same labelled images and seeds for
# every init; the reports give mean +- sd and the paired difference against random init with a 95%
# interval: $OUT/compare_knn/report.{md,json,png} and $OUT/compare_ft/report.{md,json,png}.
#
#   PROFILE=cpu   2 CPU cores: the cpu-small preset (ResNet-18-FPN, 64 px views, batch 32, 1,024
#                 steps, LARS, constant EMA; about 1.5 h a run on an idle machine), 3 seeds of SoCo and
#                 one of each other source, a supervised positive control (the same ResNet-18
#                 trained with labels on the train JSON's object crops for the same steps and batch),
#                 the object-crop probe (64 px crops, classes with >= 30 train objects) and a
#                 learning curve per run (the monitor's probe every 200 steps on a split of the
#                 train JSON, never the val JSON): $OUT/curves.png
#   PROFILE=gpu   one GPU, an estimated 10-15 minutes on an H200 (not run yet) (2 pretraining seeds x 3 sources, 300-iteration
#                 fine-tunes, 2 seeds)
#   PROFILE=smoke every command at toy sizes on a CPU (under 2 minutes): checks the script, measures nothing
#
#   PROFILE=cpu PRETRAIN_IMAGES=unlabelled/ TRAIN_JSON=train.json VAL_JSON=val.json \
#       LABELLED_IMAGES=imgs/ OUT=evidence bash benchmarks/evidence.sh
#   ARMS="soco" ... bash benchmarks/evidence.sh      # only some sources (the runs of the others are kept)
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
HERE=$(cd "$(dirname "$0")" && pwd)
PYTHON=${PYTHON:-python}
MONITOR=()       # the learning curve: the object probe during pretraining (cpu profile)
SUPERVISED=()    # the positive control's arguments (cpu profile; empty: no control)
case "$PROFILE" in
smoke)
    PRETRAIN_SEEDS=${PRETRAIN_SEEDS:-1}; OTHER_SEEDS=${OTHER_SEEDS:-1}; SEEDS=${SEEDS:-1}; FT_ITERS=${FT_ITERS:-2}
    DEVICE=${DEVICE:-cpu}
    PRETRAIN_SET=(--preset cpu-small --set train.epochs=1 --set train.warmup_steps=0
                  --set train.per_device_batch=2 --set train.batch_size=2 --set train.workers=0 --max-steps 2)
    MONITOR=(--set monitor.json="$TRAIN_JSON" --set monitor.images="$LABELLED_IMAGES" --set monitor.every=1
             --set monitor.objects=crop)
    SUPERVISED=(--arch resnet18 --size 64 --steps 2 --batch 2)
    FT_SET=(--batch-size 1 --train-sizes 128 --max-size 160 --roi-batch 32 --test-proposals 50 --detections 10
            --precise-bn 0 --workers 0)
    KNN_SET=(--objects crop --size 64 --workers 0 --set backbone=resnet18)
    ;;
cpu)
    # cpu-small (src/soco_pretrain/presets/cpu-small.yaml says how it was chosen); the monitor's
    # probe every 200 steps on the train JSON split by image (classes with >= 15 neighbours).
    PRETRAIN_SEEDS=${PRETRAIN_SEEDS:-3}; OTHER_SEEDS=${OTHER_SEEDS:-1}; SEEDS=${SEEDS:-3}; FT_ITERS=${FT_ITERS:-0}
    DEVICE=${DEVICE:-cpu}
    PRETRAIN_SET=(--preset cpu-small --workers 1)
    MONITOR=(--set monitor.json="$TRAIN_JSON" --set monitor.images="$LABELLED_IMAGES" --set monitor.every=200
             --set monitor.objects=crop --set monitor.min_instances=15)
    # The positive control: the pretraining's budget (1,024 steps of 32) with labels.
    SUPERVISED=(--arch resnet18 --size 64 --steps "${SUPERVISED_STEPS:-1024}" --batch 32 --min-instances 30)
    FT_SET=(--batch-size 2 --train-sizes 288 --max-size 480 --roi-batch 128 --workers 1)
    # 64 px crops (the views' size), the classes with >= 30 train objects (11 on coco_pool).
    KNN_SET=(--objects crop --size 64 --min-instances 30 --workers 1 --set backbone=resnet18)
    ;;
gpu)
    # A short run of the paper's FPN recipe (views 224/224/112, K=4, LARS, EMA 0.99 -> 1) at batch
    # 128 without compiling (compiling costs ~4 minutes, more than one arm). base_lr 8 gives lr 4 at
    # batch 128, the per-step LARS rate of the paper's lr 8 at batch 2048 halved for the short run.
    PRETRAIN_SEEDS=${PRETRAIN_SEEDS:-2}; OTHER_SEEDS=${OTHER_SEEDS:-$PRETRAIN_SEEDS}; SEEDS=${SEEDS:-2}
    FT_ITERS=${FT_ITERS:-300}; DEVICE=${DEVICE:-cuda}
    PRETRAIN_SET=(--preset fpn-100ep --set train.batch_size=128 --set train.per_device_batch=128
                  --set train.epochs="${EPOCHS:-30}" --set train.warmup_epochs=2 --set train.compile=false
                  --set train.base_lr="${BASE_LR:-8.0}" --set train.checkpoint_every=1000000
                  --set train.workers="${WORKERS:-14}" --set data.views.no_proposals=whole_image)
    # Short fine-tunes at reduced sizes (bf16): the same budget for every init.
    FT_SET=(--batch-size 8 --train-sizes 512-640 --max-size 1066 --test-size 640 --precision bf16 --precise-bn 50
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
RUNS=()
for arm in ${ARMS:-soco image random}; do
    runs=()
    seeds=$OTHER_SEEDS
    [ "$arm" = soco ] && seeds=$PRETRAIN_SEEDS
    for ((seed = 0; seed < seeds; seed++)); do
        run="$OUT/runs/$arm-s$seed"
        echo "== pretrain $arm, seed $seed -> $run"
        # shellcheck disable=SC2086  # SOURCE_ARGS holds several words on purpose
        "$SOCO" pretrain "${PRETRAIN_SET[@]}" "${MONITOR[@]}" ${SOURCE_ARGS[$arm]} --images "$PRETRAIN_IMAGES" \
            --out "$run" --set train.seed="$seed" --set data.seed="$seed"
        runs+=("$run")
    done
    RUNS+=("${runs[@]}")
    INITS+=(--init "$arm=$(IFS=,; echo "${runs[*]}")")
done
if [ ${#SUPERVISED[@]} -gt 0 ]; then
    echo "== supervised positive control -> $OUT/supervised/resnet18.pth"
    if [ ! -f "$OUT/supervised/resnet18.pth" ]; then
        mkdir -p "$OUT/supervised"
        "$PYTHON" "$HERE/supervised_crops.py" --train-json "$TRAIN_JSON" --images "$LABELLED_IMAGES" \
            "${SUPERVISED[@]}" -o "$OUT/supervised/resnet18.pth"
    fi
    INITS+=(--init "supervised=$OUT/supervised/resnet18.pth")
fi
if [ ${#MONITOR[@]} -gt 0 ]; then
    "$PYTHON" "$HERE/evidence_curves.py" "${RUNS[@]}" -o "$OUT/curves.png"
fi

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
