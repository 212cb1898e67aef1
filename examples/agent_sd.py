"""AgentSD: Stable Diffusion with agent attention, training-free (Han et al., "Agent Attention").

    python examples/agent_sd.py --size 1024 --compare                        # SD 1.5 on a GPU (fp16)
    python examples/agent_sd.py --model zoo:sd --steps 2 --compare --out agent.png   # offline, seconds

A few agent tokens (merged queries) stand between the queries and the keys of the UNet's top-level
self-attention, with the reference's schedule: agents for the first 40% of the steps, then token merging
alone. ``--compare`` also generates with the stock attention (same seed), writes it as ``OUT-dense.png``
and prints the speed-up; the gain grows with the image size.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import diffattn
from diffattn.io import save_images
from diffattn.loading import load

p = argparse.ArgumentParser(description="AgentSD: Stable Diffusion with agent attention")
p.add_argument("--model", default="stable-diffusion-v1-5/stable-diffusion-v1-5",
               help="hub id, pipeline folder, zoo:sd, testbed:digits-unet")
p.add_argument("--prompt", default=None, help="default: the model's own (a digit caption for testbed models)")
p.add_argument("--size", type=int, default=None, help="side in pixels (default: the model's)")
p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
p.add_argument("--ratio", type=float, default=None, help="token-merging ratio in every phase (schedule: 0.4)")
p.add_argument("--agent-ratio", type=float, default=None, help="agent merging ratio in every phase")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--compare", action="store_true", help="also generate with the stock attention and time both")
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
               help="default: float16 on a GPU, float32 on a CPU")
p.add_argument("--out", default="agent_sd.png")
args = p.parse_args()

dtype = getattr(torch, args.dtype or ("float16" if args.device.startswith("cuda") else "float32"))
src = load(args.model, dtype=dtype, device=args.device)
prompt = args.prompt or src.prompt or ("a 7" if src.num_classes else "a corgi on a beach at sunset, photo")
kw = dict(src.call_kwargs)  # the zoo's / testbed's tiny sizes; empty for a hub id (the pipeline's defaults)
kw.update({k: v for k, v in {"height": args.size, "width": args.size, "num_inference_steps": args.steps}.items()
           if v is not None})


def generate() -> tuple[list, float]:
    if args.compare:  # warm-up (kernels, caches) so that both timings are fair
        src.pipe(prompt, **{**kw, "num_inference_steps": 1})
    start = time.perf_counter()
    images = src.pipe(prompt, generator=torch.Generator().manual_seed(args.seed), **kw).images
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return images, time.perf_counter() - start


options = {k: v for k, v in {"ratio": args.ratio, "agent_ratio": args.agent_ratio}.items() if v is not None}
with diffattn.apply(src.pipe, "agent", **options) as patch:
    print(f"agent attention on {len(patch.layers)} layers")
    images, seconds = generate()
out = save_images(images, args.out)[0]
print(f"agent: {seconds:.2f} s, wrote {out}")
if args.compare:  # after the `with` block the pipeline is stock again
    dense, dense_seconds = generate()
    dense_out = save_images(dense, Path(args.out).with_name(f"{out.stem}-dense{out.suffix}"))[0]
    print(f"dense: {dense_seconds:.2f} s, wrote {dense_out}; speed-up {dense_seconds / seconds:.2f}x")
