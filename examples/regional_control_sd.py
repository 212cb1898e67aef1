"""Regional control on Stable Diffusion: boxes, each with its own caption (ROICtrl or a mask baseline).

    python examples/regional_control_sd.py --adapter runs/roictrl                 # SD 1.5 + a trained ROICtrl adapter
    python examples/regional_control_sd.py                                        # training-free regional_mask baseline
    python examples/regional_control_sd.py --model zoo:sd --steps 2 --compare --out rc.png   # offline, seconds
    python examples/regional_control_sd.py --instances boxes.json   # [{"box": [x1, y1, x2, y2], "caption": ...}]

Boxes are normalized (x1, y1, x2, y2) in [0, 1]. ``--adapter`` takes the output folder of
``examples/train_roictrl.sh`` (or a saved ``ROICtrlAdapter``); without one the pipeline runs the
training-free ``regional_mask`` baseline. Writes OUT, ``OUT-boxes.png`` (the boxes drawn on it) and, with
``--compare``, ``OUT-plain.png``: the same seed without instances.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from diffattn.lora.recipe_roictrl import load_adapter
from diffattn.pipelines import RegionalControlPipeline, draw_instances
from diffattn.pipelines.regional_control import load_instances

from diffattn.io import save_images
from diffattn.loading import load
from diffattn.models import ROICtrlAdapter

INSTANCES = [{"box": (0.05, 0.1, 0.5, 0.9), "caption": "a red cat"},
             {"box": (0.5, 0.3, 0.95, 0.95), "caption": "a blue dog"}]

p = argparse.ArgumentParser(description="Regional control on Stable Diffusion")
p.add_argument("--model", default="stable-diffusion-v1-5/stable-diffusion-v1-5",
               help="hub id, pipeline folder (SD 1.x/2.x, SDXL, ControlNet), zoo:sd")
p.add_argument("--prompt", default="two animals in a park")
p.add_argument("--instances", default=None, help="JSON file of boxes and captions (default: a cat and a dog)")
p.add_argument("--adapter", default=None, help="roictrl training output or ROICtrlAdapter folder")
p.add_argument("--size", type=int, default=None, help="side in pixels (default: the model's)")
p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--compare", action="store_true", help="also generate without instances")
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
               help="default: float16 on a GPU, float32 on a CPU")
p.add_argument("--out", default="regional_control.png")
args = p.parse_args()

dtype = getattr(torch, args.dtype or ("float16" if args.device.startswith("cuda") else "float32"))
src = load(args.model, dtype=dtype, device=args.device)
adapter = None
if args.adapter:  # a training run holds extra_modules.safetensors; a saved adapter holds config.json
    trained = (Path(args.adapter) / "extra_modules.safetensors").is_file()
    adapter = load_adapter(args.adapter) if trained else ROICtrlAdapter.from_pretrained(args.adapter)
rc = RegionalControlPipeline(src.pipe, adapter=adapter)
instances = load_instances(args.instances) if args.instances else INSTANCES
kw = {k: v for k, v in src.call_kwargs.items() if k != "prompt"}
kw.update({k: v for k, v in {"height": args.size, "width": args.size, "num_inference_steps": args.steps}.items()
           if v is not None})
kw["output_type"] = "pil"

start = time.perf_counter()
image = rc(args.prompt, instances=instances, generator=torch.Generator().manual_seed(args.seed), **kw).images[0]
print(f"{rc.method}, {len(instances)} instances: {time.perf_counter() - start:.2f} s")
out = save_images([image], args.out)[0]
boxes = save_images([draw_instances(image, instances)], out.with_name(f"{out.stem}-boxes{out.suffix}"))[0]
print(f"wrote {out} and {boxes} ({image.size[0]}x{image.size[1]})")
if args.compare:
    plain = rc(args.prompt, generator=torch.Generator().manual_seed(args.seed), **kw).images[0]
    print(f"wrote {save_images([plain], out.with_name(f'{out.stem}-plain{out.suffix}'))[0]} (no instances)")
