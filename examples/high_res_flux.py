"""4K images from FLUX.1 with hierarchical local attention (Scale-DiT), in two stages.

    python examples/high_res_flux.py --size 4096 --bridge runs/flux-bridge      # FLUX.1-dev on a GPU (bf16)
    python examples/high_res_flux.py --model zoo:flux --size 64 --radius 3 --out high_res.png   # offline, seconds
    python examples/high_res_flux.py ... --lr-mode sliding   # LR guidance centred on each token: no window seams

Stage 1 makes the base image (<= 1024 px) with the plain model; stage 2 denoises the upsampled image at the
target size with local attention (each token sees +-``radius`` tokens along the Hilbert curve) and the
base image's latent as guidance tokens. The LoRA bridge (``examples/train_high_res_bridge.sh``) is
optional: without it the result is training-free.
"""

from __future__ import annotations

import argparse
import time

import torch
from diffattn.pipelines import HighResPipeline

from diffattn.io import save_images
from diffattn.loading import load

p = argparse.ArgumentParser(description="High-resolution images from FLUX.1 with local attention")
p.add_argument("--model", default="black-forest-labs/FLUX.1-dev", help="hub id, pipeline folder, zoo:flux")
p.add_argument("--prompt", default="a lighthouse on a cliff at dusk, highly detailed")
p.add_argument("--size", type=int, default=4096, help="target side in pixels")
p.add_argument("--base", type=int, default=None, help="stage-1 side (default: <= 1024 px; zoo: the model's 32)")
p.add_argument("--steps", type=int, default=None, help="steps of the schedule (default: 28; zoo: 3)")
p.add_argument("--hr-steps", type=int, default=None, help="stage 2 runs the last N steps (default: 18; zoo: 2)")
p.add_argument("--radius", type=int, default=8, help="local attention radius in tokens")
p.add_argument("--lr-mode", choices=["window", "sliding", "all"], default="window",
               help="LR guidance: the reference's windows, or 'sliding' (no seams at window borders)")
p.add_argument("--bridge", default=None, help="LoRA bridge folder (diffattn train high-res)")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
               help="default: bfloat16 on a GPU, float32 on a CPU")
p.add_argument("--out", default="high_res.png")
args = p.parse_args()

dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
src = load(args.model, dtype=dtype, device=args.device)
pipe = HighResPipeline(**src.pipe.components)
if args.bridge:
    pipe.load_lora_weights(args.bridge)
small = src.call_kwargs.get("height")  # the zoo's tiny size; None for a hub id or a folder
kw = {k: src.call_kwargs[k] for k in ("max_sequence_length", "guidance_scale") if k in src.call_kwargs}
base = args.base or small
if base:
    kw.update(lr_height=base, lr_width=base)
steps = args.steps or (3 if small else 28)
hr_steps = args.hr_steps or (2 if small else 18)

start = time.perf_counter()
image = pipe(
    args.prompt, height=args.size, width=args.size, num_inference_steps=steps, hr_steps=hr_steps,
    radius=args.radius, lr_mode=args.lr_mode, generator=torch.Generator().manual_seed(args.seed), **kw,
).images[0]
seconds = time.perf_counter() - start
out = save_images([image], args.out)[0]
print(f"high-res: {seconds:.2f} s, wrote {out} ({image.size[0]}x{image.size[1]})")
