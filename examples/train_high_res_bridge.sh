#!/usr/bin/env bash
# The Scale-DiT LoRA bridge for FLUX.1 (recipe high-res): the model learns to use the clean low-resolution
# tokens under local attention, from ordinary 1024 px images; use it with
# examples/high_res_flux.py --bridge runs/flux-bridge.
#
#   examples/train_high_res_bridge.sh                                    # FLUX.1-dev, images in data/images/
#   examples/train_high_res_bridge.sh ./flux-dev --data my-images/ --output runs/my-bridge --max-steps 500
#   accelerate launch --num_processes 8 -m diffattn.lora high-res ...    # the same options on 8 GPUs
#   offline, seconds (images: diffattn testbed data photos --count 4 --size 64 --out images):
#   examples/train_high_res_bridge.sh zoo:flux --data images --output runs/t --resolution 64 --max-steps 1 \
#       --batch-size 1 --max-sequence-length 16 --mixed-precision no --cpu
#
# The first argument is the model (a hub id, a pipeline folder or zoo:flux); every other argument goes to
# `diffattn train` and overrides the defaults below (`diffattn train --help` lists them all). Images need
# captions: sidecar .txt files or metadata.jsonl ({"file_name": ..., "text": ...}).
set -euo pipefail
MODEL="black-forest-labs/FLUX.1-dev"
if [[ $# -gt 0 && $1 != -* ]]; then MODEL=$1; shift; fi

diffattn train high-res --model "$MODEL" --data data/images --output runs/flux-bridge \
    --resolution 1024 --rank 16 --learning-rate 1e-4 --max-steps 2000 --checkpoint-every 250 \
    --mixed-precision bf16 --gradient-checkpointing "$@"
