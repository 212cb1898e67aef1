#!/usr/bin/env bash
# LoRA length extension for Wan 2.1 (recipe long-video): radial attention is active while the LoRA trains
# on clips 4x longer than the model's 81 frames; use it with examples/radial_wan.py --lora runs/wan-long.
#
#   examples/train_long_video_lora.sh                                    # Wan 2.1 1.3B, clips in data/long-clips/
#   examples/train_long_video_lora.sh ./wan-1.3b --data my-clips/ --output runs/my-lora --max-steps 500
#   accelerate launch --num_processes 8 -m diffattn.lora long-video ...  # the same options on 8 GPUs
#   offline, seconds (clips: diffattn testbed data moving --count 4 --size 32 --frames 9 --out clips):
#   examples/train_long_video_lora.sh zoo:wan --data clips --output runs/t --num-frames 9 --resolution 32 \
#       --max-steps 1 --batch-size 1 --mixed-precision no --cpu
#
# The first argument is the model (a hub id, a pipeline folder or zoo:wan); every other argument goes to
# `diffattn train` and overrides the defaults below (`diffattn train --help` lists them all).
set -euo pipefail
MODEL="Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
if [[ $# -gt 0 && $1 != -* ]]; then MODEL=$1; shift; fi

diffattn train long-video --model "$MODEL" --data data/long-clips --output runs/wan-long \
    --num-frames 321 --resolution 480 --rank 32 --option decay_factor=0.2 \
    --learning-rate 1e-4 --max-steps 2000 --checkpoint-every 250 \
    --mixed-precision bf16 --gradient-checkpointing "$@"
