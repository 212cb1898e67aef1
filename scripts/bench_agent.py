"""Agent attention (AgentSD) vs dense vs ToMe for SD on the real SD 1.5 UNet config, side by side.

Random weights (speed does not depend on them), batch 2 (classifier-free guidance), fp32 on CPU by
default (``--device cuda --dtype fp16`` times the same on a GPU). For each image size it times

* the UNet forward: dense (stock ``AttnProcessor2_0``); AgentSD in each phase of the default schedule
  (phase 1: agents + ToMe, ``sx = sy = 4``; phase 2: ToMe alone, ``sx = sy = 2``, ratio 0.4) and the
  schedule as a whole (40% phase 1 + 60% phase 2: the time per step of a full run); ToMe for SD from
  the ``tomesd`` package at the same ratio (0.4). Where tomesd is missing or broken the script says so
  and the faithful ToMe of ours stands in (``agent`` with ``agent_ratio=0``, identical work to phase 2);
* one level-1 self-attention layer alone (``down_blocks.0...attn1``: N = (px/8)^2 tokens, 320 wide,
  8 heads): dense SDPA vs AgentSD per phase and the schedule vs tomesd's merge -> attention -> unmerge
  around the same layer (what its patched block does).

Variants are timed interleaved (one call of each per round, median over rounds) so that load on a
shared machine hits them alike. Writes ``OUT.json`` and ``OUT.png``. A full run (512/768/1024 px,
3 rounds) is about 30 UNet forwards per size: budget an hour on a 16-core CPU.

    python scripts/bench_agent.py                                        # 512, 768, 1024 px
    python scripts/bench_agent.py --sizes 512 --rounds 1 --skip-layer     # a quick look
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from tqdm import tqdm

import diffattn
from diffattn.benchmark import DTYPES, environment, interleaved, save_figure, write_json
from diffattn.processors.agent import DEFAULT_SCHEDULE, AgentAttnProcessor

RATIO = 0.4  # ToMe ratio of both phases of the default AgentSD schedule; tomesd runs at the same ratio
PHASE1, PHASE2 = DEFAULT_SCHEDULE[0][1], DEFAULT_SCHEDULE[1][1]
W1, W2 = DEFAULT_SCHEDULE[0][0], 1.0 - DEFAULT_SCHEDULE[0][0]  # fractions of the steps in each phase


def sd15_unet() -> UNet2DConditionModel:
    """The Stable Diffusion 1.5 UNet architecture (runwayml/stable-diffusion-v1-5 unet/config.json)."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
    ).eval()


def tomesd_status(unet: UNet2DConditionModel) -> tuple[Any | None, str]:
    """The tomesd module if it patches this diffusers' UNet and changes its output, else None and why."""
    try:
        import tomesd
    except ImportError:
        return None, "tomesd is not installed (pip install tomesd); ours-ToMe stands in for it"
    x = torch.randn(2, 4, 16, 16).to(unet.device, unet.dtype)
    t = torch.tensor([500.0, 500.0], device=unet.device)
    ctx = torch.randn(2, 7, unet.config.cross_attention_dim).to(unet.device, unet.dtype)
    try:
        with torch.no_grad():
            base = unet(x, t, ctx).sample
            tomesd.apply_patch(unet, ratio=RATIO)
            try:
                merged = unet(x, t, ctx).sample
            finally:
                tomesd.remove_patch(unet)
            back = unet(x, t, ctx).sample
    except Exception as e:  # an incompatible diffusers: report it, fall back to ours
        return None, f"tomesd fails with this diffusers ({type(e).__name__}: {e}); ours-ToMe stands in for it"
    if torch.equal(merged, base) or not torch.equal(back, base):
        return None, "tomesd did not patch this UNet as expected; ours-ToMe stands in for it"
    return tomesd, f"tomesd {getattr(tomesd, '__version__', '')} works with this diffusers".replace("  ", " ")


class Patched(AbstractContextManager):
    """Enter: apply a variant to the UNet; exit: take it off."""

    def __init__(self, enter: Callable[[], Any], leave: Callable[[Any], None]):
        self._enter, self._leave, self._state = enter, leave, None

    def __enter__(self) -> Patched:
        self._state = self._enter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._leave(self._state)


def unet_variants(unet: UNet2DConditionModel, tomesd: Any | None) -> dict[str, Callable[[], AbstractContextManager]]:
    def agent(**options: Any) -> Callable[[], AbstractContextManager]:
        return lambda: Patched(lambda: diffattn.apply(unet, "agent", **options), lambda p: p.remove())

    variants = {
        "dense": lambda: nullcontext(),
        "agent phase 1": agent(schedule=[(1.0, PHASE1)]),
        "agent phase 2": agent(schedule=[(1.0, PHASE2)]),
    }
    if tomesd is not None:
        variants["tomesd"] = lambda: Patched(lambda: tomesd.apply_patch(unet, ratio=RATIO), tomesd.remove_patch)
    else:
        variants["ours-ToMe"] = agent(sx=2, sy=2, ratio=RATIO, agent_ratio=0.0, schedule=[(1.0, PHASE2)])
    return variants


DEVICE, DTYPE = torch.device("cpu"), torch.float32  # set by --device / --dtype


def agent_layer_count(unet: UNet2DConditionModel) -> int:
    """Self-attention layers at full latent resolution: the ones the default ``max_downsample = 1`` covers on
    SD 1.5 (the patch sits on every ``attn1`` and passes the deeper ones to dense attention)."""
    top = ("down_blocks.0.", f"up_blocks.{len(unet.up_blocks) - 1}.")
    return sum(1 for name, _ in unet.named_modules() if name.endswith("attn1") and name.startswith(top))


def schedule_bound(unet_dense: float, layer_dense: float, layers: int) -> dict[str, float]:
    """The most the default schedule can speed the UNet up, from measured dense times.

    The patched layers cost ``layers * layer_dense`` of the dense forward, and the rest of the UNet is
    untouched. Phase 1 at best makes that attention free. Phase 2 is ToMe alone at ratio ``r``: attention
    over ``(1 - r) N`` tokens costs at least ``(1 - r)^2`` of dense, even with merging free. The time per step
    of a full run weights the phases by their share of the steps.
    """
    attention = layers * layer_dense
    rest = unet_dense - attention
    floor = W1 * rest + W2 * (rest + (1.0 - RATIO) ** 2 * attention)
    return {"layers": layers, "attention_share": attention / unet_dense, "free_attention_bound": unet_dense / rest,
            "schedule_bound": unet_dense / floor}


def with_schedule(t: dict[str, float]) -> dict[str, float]:
    """Add the time per step of a full run of the default schedule."""
    return {**t, "agent (schedule)": W1 * t["agent phase 1"] + W2 * t["agent phase 2"]}


def bench_unet(unet: UNet2DConditionModel, size: int, tomesd: Any | None, rounds: int) -> dict[str, float]:
    lat = size // 8
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, lat, lat, generator=g).to(DEVICE, DTYPE)
    t = torch.tensor([500.0, 500.0], device=DEVICE)
    ctx = torch.randn(2, 77, 768, generator=g).to(DEVICE, DTYPE)
    fns = {}
    for name, make in unet_variants(unet, tomesd).items():

        def call(make: Callable[[], AbstractContextManager] = make) -> None:
            with make(), torch.no_grad():
                unet(x, t, ctx)

        fns[name] = call
    return with_schedule(interleaved(fns, rounds, DEVICE, desc=f"unet {size}px"))


def bench_layer(unet: UNet2DConditionModel, size: int, tomesd: Any | None, rounds: int) -> dict[str, float]:
    attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    lat = size // 8
    x = torch.randn(2, lat * lat, attn.to_q.in_features, generator=torch.Generator().manual_seed(0)).to(DEVICE, DTYPE)
    stock = AttnProcessor2_0()
    procs = {
        "dense": stock,
        "agent phase 1": AgentAttnProcessor(height=lat, width=lat, schedule=[(1.0, PHASE1)]),
        "agent phase 2": AgentAttnProcessor(height=lat, width=lat, schedule=[(1.0, PHASE2)]),
    }
    old = attn.processor
    fns = {}
    for name, proc in procs.items():

        def call(proc: Any = proc) -> None:
            attn.processor = proc  # set directly: set_processor would log each swap
            with torch.no_grad():
                attn(x)

        fns[name] = call
    if tomesd is not None:
        gen = torch.Generator().manual_seed(0)

        def tome() -> None:
            # what tomesd's patched block does around attn1 (compute_merge, m_a, attn1, u_a)
            attn.processor = stock
            with torch.no_grad():
                m, u = tomesd.merge.bipartite_soft_matching_random2d(
                    x, lat, lat, 2, 2, int(x.shape[1] * RATIO), no_rand=False, generator=gen
                )
                u(attn(m(x)))

        fns["tomesd"] = tome
    else:
        ours_tome = AgentAttnProcessor(height=lat, width=lat, sx=2, sy=2, ratio=RATIO, agent_ratio=0.0)
        fns["ours-ToMe"] = lambda: (setattr(attn, "processor", ours_tome), attn(x))
    try:
        return with_schedule(interleaved(fns, rounds, DEVICE, desc=f"layer {size}px"))
    finally:
        attn.processor = old


def plot(rows: list[dict[str, Any]], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in ("unet", "layer") if any(r["kind"] == k for r in rows)]
    fig, axes = plt.subplots(1, len(kinds), figsize=(7 * len(kinds), 4.5), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        sel = [r for r in rows if r["kind"] == kind]
        sizes = sorted({r["px"] for r in sel})
        names = list(dict.fromkeys(r["variant"] for r in sel if r["variant"] != "dense"))
        width = 0.8 / max(1, len(names))
        for i, name in enumerate(names):
            ys = [next((r["speedup"] for r in sel if r["px"] == s and r["variant"] == name), 0.0) for s in sizes]
            xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(sizes))]
            ax.bar(xs, ys, width, label=name)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(sizes)), [f"{s} px" for s in sizes])
        ax.set_ylabel("speedup over dense (x)")
        where = f"{DEVICE.type} {str(DTYPE).removeprefix('torch.')}"
        title = f"UNet forward (SD 1.5, batch 2, {where})" if kind == "unet" else f"one level-1 self-attention layer ({where})"
        ax.set_title(title)
        ax.legend(fontsize=8)
    save_figure(fig, f"{out}.png")
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 768, 1024], help="image sizes in px (latent = px / 8)")
    p.add_argument("--rounds", type=int, default=3, help="timed calls of each variant (median)")
    p.add_argument("--layer-rounds", type=int, default=5)
    p.add_argument("--skip-unet", action="store_true")
    p.add_argument("--skip-layer", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu", help="cpu (the issue's figures) or cuda")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    p.add_argument("--out", default="outputs/bench_agent")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)  # inference timing only

    global DEVICE, DTYPE
    DEVICE = torch.device(args.device)
    DTYPE = DTYPES[args.dtype]
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA GPU here")
    env = environment()
    env.update(device=str(DEVICE), dtype=args.dtype)
    unet = sd15_unet().to(DEVICE, DTYPE)
    tomesd, status = tomesd_status(unet)
    print(f"device={env['device']} torch={env['torch']} threads={env['threads']}")
    print(f"ToMe for SD: {status}")
    rows: list[dict[str, Any]] = []

    def report(kind: str, size: int, times: dict[str, float]) -> None:
        dense = times["dense"]
        for name, sec in times.items():
            rows.append({"kind": kind, "px": size, "tokens": (size // 8) ** 2, "variant": name, "seconds": sec,
                         "speedup": dense / sec})
        line = "  ".join(f"{k}={v * 1e3:.0f}ms ({dense / v:.2f}x)" for k, v in times.items())
        tqdm.write(f"{kind:5s} {size:5d}px N={(size // 8) ** 2:6d}  {line}")

    for size in args.sizes:
        if size % 64:
            raise SystemExit(f"--sizes must be multiples of 64 px (the UNet downsamples latents 3 times), got {size}")
        if not args.skip_layer:
            report("layer", size, bench_layer(unet, size, tomesd, args.layer_rounds))
        if not args.skip_unet:
            report("unet", size, bench_unet(unet, size, tomesd, args.rounds))

    def measured(kind: str, size: int, name: str, field: str = "speedup") -> float | None:
        return next((r[field] for r in rows if (r["kind"], r["px"], r["variant"]) == (kind, size, name)), None)

    def speedup(kind: str, size: int, name: str) -> float | None:
        return measured(kind, size, name)

    def dense_seconds(kind: str, size: int) -> float | None:
        return measured(kind, size, "dense", "seconds")

    checks = {}
    big = max(args.sizes)
    if speedup("layer", big, "agent (schedule)") is not None:
        checks[f"layer {big}px schedule >= 3x dense"] = speedup("layer", big, "agent (schedule)") >= 3.0
    if speedup("unet", big, "agent (schedule)") is not None:
        checks[f"unet {big}px schedule >= 1.8x dense"] = speedup("unet", big, "agent (schedule)") >= 1.8
    bounds = {}
    for size in args.sizes:
        unet_dense, layer_dense = dense_seconds("unet", size), dense_seconds("layer", size)
        if unet_dense is not None and layer_dense is not None:
            bounds[str(size)] = schedule_bound(unet_dense, layer_dense, agent_layer_count(unet))
            b = bounds[str(size)]
            print(f"bound {size}px: the {b['layers']} patched layers are {b['attention_share']:.0%} of the dense UNet; "
                  f"at most {b['free_attention_bound']:.2f}x with free attention, {b['schedule_bound']:.2f}x for the "
                  f"default schedule (phase 2's ToMe keeps >= {(1 - RATIO) ** 2:.2f} of the attention)")
    ref = "tomesd" if tomesd is not None else "ours-ToMe"
    for kind in ("layer", "unet"):
        for size in args.sizes:
            ours, theirs = speedup(kind, size, "agent (schedule)"), speedup(kind, size, ref)
            if ours is not None and theirs is not None:
                checks[f"{kind} {size}px schedule faster than {ref}"] = ours > theirs
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    write_json(f"{args.out}.json", {"environment": env, "tomesd": status, "ratio": RATIO,
                                    "schedule": [[u, vars(ph)] for u, ph in DEFAULT_SCHEDULE],
                                    "rows": rows, "bounds": bounds, "checks": checks})
    plot(rows, args.out)
    print(f"wrote {args.out}.json and {args.out}.png")


if __name__ == "__main__":
    main()
