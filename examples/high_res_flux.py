"""4K images from FLUX.1 with hierarchical local attention (Scale-DiT), in two stages.

    python examples/high_res_flux.py --model black-forest-labs/FLUX.1-dev --size 4096 --bridge bridge/
    python examples/high_res_flux.py --model zoo:flux --size 64 --base 32 --steps 3 --hr-steps 2 --radius 3  # offline
    python examples/high_res_flux.py ... --lr-mode sliding   # LR guidance centred on each token: no window seams

Stage 1 makes the 1024 px image with the plain model; stage 2 denoises the upsampled image at the target
size with local attention (each token sees +-8 tokens) and the 1024 px latent as guidance tokens. The LoRA
bridge (``diffattn train high-res``) is optional: without it the result is training-free.
"""

from __future__ import annotations

import argparse

import torch
from diffattn.pipelines import HighResPipeline

from diffattn.loading import load_pipeline

p = argparse.ArgumentParser()
p.add_argument("--model", default="black-forest-labs/FLUX.1-dev")
p.add_argument("--prompt", default="a lighthouse on a cliff at dusk, highly detailed")
p.add_argument("--size", type=int, default=4096)
p.add_argument("--base", type=int, default=None, help="stage-1 size (default: <= 1024 px)")
p.add_argument("--steps", type=int, default=28)
p.add_argument("--hr-steps", type=int, default=18)
p.add_argument("--radius", type=int, default=8)
p.add_argument("--lr-mode", choices=["window", "sliding", "all"], default="window",
               help="LR guidance: the reference's windows, or 'sliding' (no seams at window borders)")
p.add_argument("--bridge", default=None, help="LoRA bridge folder")
p.add_argument("--out", default="high_res.png")
args = p.parse_args()

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
flux = load_pipeline(args.model, dtype=dtype, device=device)
pipe = HighResPipeline(**flux.components)
if args.bridge:
    pipe.load_lora_weights(args.bridge)
lr = {"lr_height": args.base, "lr_width": args.base} if args.base else {}
kw = {"max_sequence_length": 16} if args.model.startswith("zoo:") else {}
image = pipe(
    args.prompt, height=args.size, width=args.size, num_inference_steps=args.steps, hr_steps=args.hr_steps,
    radius=args.radius, lr_mode=args.lr_mode, generator=torch.Generator().manual_seed(0), **lr, **kw,
).images[0]
image.save(args.out)
print(f"wrote {args.out} ({image.size[0]}x{image.size[1]})")
