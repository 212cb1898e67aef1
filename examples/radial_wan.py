"""Long videos from Wan 2.1 with radial attention, a length-extension LoRA and tiled VAE decoding.

    python examples/long_video_wan.py --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --frames 321 --lora runs/wan-long
    python examples/long_video_wan.py --model zoo:wan --frames 33 --height 32 --width 32 --steps 2 --tile-size 16  # offline

Radial attention (``decay_factor`` 0.2, the first block and the first 12 steps dense: the reference's Wan
settings) makes the attention of a 4x longer video cost O(n log n); the LoRA (``diffattn train
long-video``) adapts the model to that length; tiling bounds the VAE decode of the long clip.
"""

from __future__ import annotations

import argparse

import torch
from diffattn.pipelines import long_video_decoding

import diffattn
from diffattn.loading import load_pipeline
from diffattn.io import save_frames

p = argparse.ArgumentParser()
p.add_argument("--model", default="Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
p.add_argument("--prompt", default="a red fox running through fresh snow, tracking shot")
p.add_argument("--frames", type=int, default=321, help="4k + 1 for Wan (321 = 4x the trained 81)")
p.add_argument("--height", type=int, default=480)
p.add_argument("--width", type=int, default=832)
p.add_argument("--steps", type=int, default=50)
p.add_argument("--decay-factor", type=float, default=0.2)
p.add_argument("--dense-timesteps", type=int, default=12)
p.add_argument("--lora", default=None, help="length-extension LoRA folder (diffattn train long-video)")
p.add_argument("--tile-size", type=int, default=None, help="VAE tile size in pixels (default: the VAE's)")
p.add_argument("--out", default="long_video.mp4")
args = p.parse_args()

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
pipe = load_pipeline(args.model, dtype=dtype, device=device)
if args.lora:
    pipe.load_lora_weights(args.lora)
kw = {"max_sequence_length": 16} if args.model.startswith("zoo:") else {}
attention = diffattn.apply(
    pipe, "radial", decay_factor=args.decay_factor, dense_layers=1,
    dense_timesteps=min(args.dense_timesteps, args.steps),
)
with attention, long_video_decoding(pipe, tile_size=args.tile_size):
    frames = pipe(
        args.prompt, height=args.height, width=args.width, num_frames=args.frames,
        num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0), output_type="np", **kw,
    ).frames[0]
paths = save_frames(list(frames), args.out, fps=16)
print(f"wrote {paths[0]} ({len(frames)} frames, {frames.shape[2]}x{frames.shape[1]})")
