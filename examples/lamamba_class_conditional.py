"""Class-conditional images from a LaMamba-Diff model: window attention + Mamba, no dense attention.

    python examples/lamamba_class_conditional.py --model runs/lamamba/pipeline --labels 207 360 387 --steps 50
    python examples/lamamba_class_conditional.py --labels 0 1 2 3 --out digits.png   # offline: the shipped digits model

LaMamba-Diff (Fu et al.) replaces global self-attention with 8x8 window attention plus a selective
state-space (Mamba) branch in a U-Net: linear in the number of tokens, on any image size. The default
model is the testbed's ``digits-lamamba`` (32x32 digits, trained here and shipped with the package);
``--model`` also takes the ``pipeline/`` folder that ``diffattn train lamamba`` writes (on a GPU,
mamba-ssm's CUDA scan is used when installed). Writes one image per label: ``OUT`` for one label,
``OUT_0.png, OUT_1.png, ...`` for several.
"""

from __future__ import annotations

import argparse
import time

import torch
from diffattn.pipelines import LaMambaDiffPipeline

from diffattn.io import save_images
from diffattn.loading import load

p = argparse.ArgumentParser(description="Class-conditional images from a LaMamba-Diff model")
p.add_argument("--model", default="testbed:digits-lamamba", help="testbed:digits-lamamba or a pipeline folder")
p.add_argument("--labels", type=int, nargs="+", default=None, help="class labels (default: the first four)")
p.add_argument("--size", type=int, default=None, help="side in pixels (default: the model's)")
p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's, else 50)")
p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (default: the model's, else 4)")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
               help="default: bfloat16 on a GPU, float32 on a CPU")
p.add_argument("--out", default="lamamba.png")
args = p.parse_args()

dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
src = load(args.model, dtype=dtype, device=args.device)
if not isinstance(src.pipe, LaMambaDiffPipeline):
    p.error(f"--model {args.model} is a {type(src.pipe).__name__}, not a LaMambaDiffPipeline")
num_classes = src.pipe.transformer.config.num_classes
labels = args.labels if args.labels is not None else list(range(min(4, num_classes)))
kw = {"num_inference_steps": 50, "guidance_scale": 4.0, **src.call_kwargs}
kw.update({k: v for k, v in {"height": args.size, "width": args.size, "num_inference_steps": args.steps,
                             "guidance_scale": args.guidance}.items() if v is not None})

start = time.perf_counter()
images = src.pipe(class_labels=labels, generator=torch.Generator().manual_seed(args.seed), **kw).images
print(f"lamamba: {len(images)} images in {time.perf_counter() - start:.2f} s ({kw['num_inference_steps']} steps)")
for label, path in zip(labels, save_images(images, args.out)):
    print(f"wrote {path} (class {label})")
