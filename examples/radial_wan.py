"""Long videos from Wan 2.1 with radial attention, a length-extension LoRA and tiled VAE decoding.

    python examples/radial_wan.py --frames 321 --lora runs/wan-long --compare    # Wan 2.1 1.3B on a GPU (bf16)
    python examples/radial_wan.py --model zoo:wan --frames 17 --tile-size 16 --option granularity=token \
        --compare --out long.gif                                            # offline, seconds

Radial attention (Li et al., "Radial Attention"; ``decay_factor`` 0.2, the first block and the first
quarter of the steps dense: the reference's Wan settings) makes the attention of a 4x longer video cost
O(n log n); the LoRA (``examples/train_long_video_lora.sh``) adapts the model to that length; tiling
bounds the VAE decode of the long clip. ``--compare`` also generates with dense attention and prints
the speed-up. At the zoo's toy size every token pair lies in one 128-token block, so the offline
command asks for the exact token rule (``--option granularity=token``; any radial option works). MP4 needs the video extra (``pip install 'diffattn[video]'``); ``.gif`` always works.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from diffattn.pipelines import long_video_decoding

import diffattn
from diffattn.io import save_frames
from diffattn.loading import call_kwargs, load, parse_options

p = argparse.ArgumentParser(description="Long videos from Wan 2.1 with radial attention")
p.add_argument("--model", default="Wan-AI/Wan2.1-T2V-1.3B-Diffusers", help="hub id, pipeline folder, zoo:wan")
p.add_argument("--prompt", default="a red fox running through fresh snow, tracking shot")
p.add_argument("--frames", type=int, default=321, help="4k + 1 for Wan (321 = 4x the trained 81)")
p.add_argument("--height", type=int, default=None, help="default: 480 (zoo: the model's 32)")
p.add_argument("--width", type=int, default=None, help="default: 832 (zoo: the model's 32)")
p.add_argument("--steps", type=int, default=None, help="default: 50 (zoo: the model's 2)")
p.add_argument("--decay-factor", type=float, default=0.2)
p.add_argument("--dense-timesteps", type=int, default=None, help="first steps kept dense (default: a quarter)")
p.add_argument("--option", action="append", metavar="KEY=VALUE", help="any other radial option (repeatable)")
p.add_argument("--lora", default=None, help="length-extension LoRA folder (diffattn train long-video)")
p.add_argument("--tile-size", type=int, default=None, help="VAE tile size in pixels (default: the VAE's)")
p.add_argument("--compare", action="store_true", help="also generate with dense attention and time both")
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
               help="default: bfloat16 on a GPU, float32 on a CPU")
p.add_argument("--out", default="radial_wan.mp4")
args = p.parse_args()

dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
# the zoo's tiny sizes and schedule, else Wan 2.1's 480x832 and 50 steps; then what was asked for
kw = {"height": 480, "width": 832, "num_inference_steps": 50, **call_kwargs(args.model)}
kw.update({k: v for k, v in {"height": args.height, "width": args.width, "num_inference_steps": args.steps}.items()
           if v is not None})
kw.update(num_frames=args.frames, output_type="np")
kw.pop("prompt", None)  # --prompt is ours
steps = kw["num_inference_steps"]
dense_steps = steps // 4 if args.dense_timesteps is None else args.dense_timesteps
if dense_steps >= steps:
    p.error(f"--dense-timesteps {dense_steps} >= --steps {steps}: radial attention would never run")
src = load(args.model, dtype=dtype, device=args.device)
if args.lora:
    src.pipe.load_lora_weights(args.lora)


def generate() -> tuple[list, float]:
    start = time.perf_counter()
    with long_video_decoding(src.pipe, tile_size=args.tile_size):
        frames = src.pipe(args.prompt, generator=torch.Generator().manual_seed(0), **kw).frames[0]
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return list(frames), time.perf_counter() - start


with diffattn.apply(src.pipe, "radial", decay_factor=args.decay_factor, dense_layers=1,
                    dense_timesteps=dense_steps, **parse_options(args.option)) as patch:
    print(f"radial attention on {len(patch.layers)} layers, steps {dense_steps + 1}-{steps} of {steps}")
    frames, seconds = generate()
out = save_frames(frames, args.out, fps=16)[0]
print(f"radial: {seconds:.2f} s, wrote {out} ({len(frames)} frames, {frames[0].shape[1]}x{frames[0].shape[0]})")
if args.compare:
    dense, dense_seconds = generate()
    dense_out = save_frames(dense, Path(args.out).with_name(f"{out.stem}-dense{out.suffix}"), fps=16)[0]
    print(f"dense: {dense_seconds:.2f} s, wrote {dense_out}; speed-up {dense_seconds / seconds:.2f}x")
