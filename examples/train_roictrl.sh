#!/usr/bin/env bash
# A ROICtrl adapter for Stable Diffusion (recipe roictrl): the base model stays frozen, the adapter learns
# to put each box's caption in its box; use it with examples/regional_control_sd.py --adapter runs/roictrl.
#
#   examples/train_roictrl.sh                                            # SD 1.5, boxes in data/scenes/boxes.jsonl
#   examples/train_roictrl.sh ./sd15 --data my-boxes.jsonl --output runs/my-roictrl --max-steps 500
#   accelerate launch --num_processes 8 -m diffattn.lora roictrl ...     # the same options on 8 GPUs
#   offline, seconds (boxes: diffattn testbed data scenes --count 4 --size 32 --out scenes):
#   examples/train_roictrl.sh zoo:sd --data scenes/boxes.jsonl --output runs/t --resolution 32 --max-steps 1 \
#       --batch-size 1 --mixed-precision no --cpu
#
# The first argument is the model (a hub id, a pipeline folder or zoo:sd); every other argument goes to
# `diffattn train` and overrides the defaults below (`diffattn train --help` lists them all). Boxes: one
# JSON line per image, {"file_name", "caption", "boxes": [[x1, y1, x2, y2], ...], "box_captions": [...],
# "normalized": true}.
set -euo pipefail
MODEL="stable-diffusion-v1-5/stable-diffusion-v1-5"
if [[ $# -gt 0 && $1 != -* ]]; then MODEL=$1; shift; fi

diffattn train roictrl --model "$MODEL" --data data/scenes/boxes.jsonl --output runs/roictrl \
    --resolution 512 --batch-size 16 --learning-rate 1e-4 --max-steps 2000 --checkpoint-every 250 \
    --mixed-precision bf16 "$@"
