"""``diffattn train RECIPE ...`` and ``python -m diffattn.lora RECIPE ...``: one parser, one code path.

Under ``accelerate launch -m diffattn.lora`` or ``torchrun -m diffattn.lora`` every process runs this
same entry point; accelerate reads the process group from the environment.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .recipes import get_recipe, recipe_names


def _csv_list(s: str) -> list[str]:
    return [p.strip() for p in s.split(",") if p.strip()]


def build_parser(prog: str = "diffattn train") -> argparse.ArgumentParser:
    """The training options; each maps to the :class:`~diffattn.lora.trainer.TrainConfig` field of the same name."""
    lines = "\n".join(f"  {n:12s} {get_recipe(n).description}" for n in recipe_names())
    p = argparse.ArgumentParser(
        prog=prog,
        description=f"Train a LoRA (and adapters) on a diffusers pipeline.\n\nrecipes:\n{lines}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipe", help="one of: " + ", ".join(recipe_names()))
    p.add_argument(
        "--model", default="zoo:sd", help="zoo:NAME, a local pipeline folder, or a hub id (cached)"
    )
    p.add_argument("--data", required=True, help="image/video folder, or a boxes .jsonl (or its folder)")
    p.add_argument(
        "--output", required=True, help="folder for the LoRA, model card, logs, samples, checkpoints"
    )
    g = p.add_argument_group("optimisation")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--max-steps", type=int, default=1000)
    g.add_argument("--batch-size", type=int, default=1, help="per process and micro-step")
    g.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    g.add_argument("--learning-rate", "--lr", dest="learning_rate", type=float, default=1e-4)
    g.add_argument(
        "--lr-scheduler", default="constant", help="diffusers scheduler name (constant, cosine, linear ...)"
    )
    g.add_argument("--lr-warmup-steps", type=int, default=0)
    g.add_argument("--weight-decay", type=float, default=1e-2)
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="0 turns clipping off")
    g.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument(
        "--ema", action="store_true", help="keep an EMA of the trainable weights; the saved LoRA is the EMA"
    )
    g.add_argument("--ema-decay", type=float, default=0.999)
    g.add_argument("--timestep-sampling", choices=["uniform", "logit_normal"], default="uniform")
    g.add_argument("--logit-mean", type=float, default=0.0)
    g.add_argument("--logit-std", type=float, default=1.0)
    g.add_argument("--caption-dropout", type=float, default=0.0, help="probability of an empty caption")
    g.add_argument("--cpu", action="store_true", help="train on CPU even when a GPU is present")
    g.add_argument("--num-workers", type=int, default=0, help="data loader worker processes")
    lo = p.add_argument_group("LoRA")
    lo.add_argument("--rank", type=int, default=4)
    lo.add_argument("--lora-alpha", type=float, default=None, help="default: the rank")
    lo.add_argument("--lora-dropout", type=float, default=0.0)
    lo.add_argument(
        "--lora-init", default="default", help="peft init_lora_weights: default, gaussian, pissa, olora ..."
    )
    lo.add_argument(
        "--lora-targets",
        type=_csv_list,
        default=None,
        help="comma-separated module names (default: the recipe's)",
    )
    lo.add_argument(
        "--train-modules", type=_csv_list, default=None, help="comma-separated modules trained in full"
    )
    lo.add_argument("--expert", choices=["high", "low"], default=None, help="Wan 2.2: which expert to train")
    lo.add_argument(
        "--attention", default=None, help="method applied while training (default: the recipe's; 'none')"
    )
    lo.add_argument(
        "--option", action="append", metavar="KEY=VALUE", help="attention method option (repeatable)"
    )
    d = p.add_argument_group("data")
    d.add_argument(
        "--resolution", type=int, default=None, help="square side in pixels (default: the recipe's)"
    )
    d.add_argument("--crop", choices=["center", "random"], default="center")
    d.add_argument("--buckets", default=None, help="size bucketing by aspect ratio: 'auto' or HxW,HxW,...")
    d.add_argument("--num-frames", type=int, default=None, help="frames per clip (video)")
    d.add_argument("--fps", type=float, default=None, help="resample clips to this frame rate (video)")
    d.add_argument("--default-caption", default=None, help="caption for files without one (else: an error)")
    d.add_argument("--max-sequence-length", type=int, default=None, help="text tokens (T5 / UMT5 encoders)")
    o = p.add_argument_group("checkpoints, logs, samples")
    o.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints (0: none)")
    o.add_argument("--checkpoints-total-limit", type=int, default=None)
    o.add_argument(
        "--resume",
        default=None,
        help="'latest' (the newest valid checkpoint: a damaged newer one is skipped with a warning) or a checkpoint folder",
    )
    o.add_argument(
        "--no-checkpoint-fallback",
        action="store_true",
        help="with --resume latest: a damaged newest checkpoint is an error instead of being skipped",
    )
    o.add_argument(
        "--validation-every", type=int, default=0, help="steps between validation samples (0: none)"
    )
    o.add_argument(
        "--validation-prompt", action="append", default=None, help="repeatable (default: the first caption)"
    )
    o.add_argument("--validation-inference-steps", type=int, default=None)
    o.add_argument("--log-every", type=int, default=1)
    o.add_argument("--eval-samples", type=int, default=8, help="samples in the fixed-set loss (0: off)")
    o.add_argument(
        "--save-pipeline",
        action="store_true",
        default=None,
        help="also save the whole pipeline (save_pretrained) in OUTPUT/pipeline (default: the recipe's)",
    )
    o.add_argument("--push-to-hub", default=None, metavar="REPO_ID", help="upload the result (needs network)")
    return p


def config_from_args(args: argparse.Namespace) -> Any:
    from diffattn.loading import parse_options

    from .trainer import TrainConfig

    fields = dict(vars(args))
    options = parse_options(fields.pop("option", None))
    return TrainConfig(**fields, attention_options=options)


def main(argv: list[str] | None = None, prog: str = "diffattn train") -> int:
    """Parse, train, print where the result is; errors print one line and return 2."""
    from .data import DataError

    args = build_parser(prog).parse_args(argv)
    try:
        from diffattn.checks import check_train_args  # everything checkable before data or model is read

        check_train_args(args, get_recipe(args.recipe))
        from .trainer import train

        result = train(config_from_args(args))
    except (DataError, ValueError, TypeError, FileNotFoundError, NotImplementedError, RuntimeError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(
            f"trained {result.steps} steps; final loss {result.final_loss}; fixed-set loss "
            f"{result.fixed_loss_start} -> {result.fixed_loss_end}; LoRA in {result.output}"
        )
    return 0
