"""LoRA recovery for agent attention on the testbed DiT (``digits-dit``), before and after.

Training-free, pooled agent attention (64 agents for 256 image tokens) moves ``digits-dit``'s samples
far from dense. This script trains a LoRA under agent attention (the ``image`` recipe, attention
projections only) and evaluates the method before and after against dense attention on the same seeds:
class accuracy, Fréchet distance to the held-out digits (classifier features, n stated, bootstrap std)
and PSNR / SSIM against dense. The same steps as the commands::

    diffattn testbed data digits --split train --out DATA
    diffattn train image --model testbed:digits-dit --data DATA --output OUT/lora --attention agent \\
        --lora-targets to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out \\
        --rank 16 --resolution 32 --max-steps 2000 --batch-size 32 --learning-rate 1e-3 ...
    diffattn evaluate --model testbed:digits-dit --method agent --samples 359 --out OUT/before
    diffattn evaluate --model testbed:digits-dit --method agent --samples 359 --lora OUT/lora --out OUT/after

Writes ``OUT/agent_lora_recovery.json`` (and the two evaluations' ``report.json`` / ``grid.png``).
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch
from diffattn.lora.cli import main as train_main

from diffattn.benchmark import write_json
from diffattn.testbed.data import DigitsDataset, write_image_folder
from diffattn.testbed.evaluate import evaluate

MODEL = "testbed:digits-dit"
# the attention projections only, of the image and the text stream (Flux's joint blocks project the text
# with add_*; its single blocks have no to_out): the text path matters, since the prompt reaches the image
# tokens through the agents
TARGETS = "to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out"


def _summary(report: dict) -> dict:
    acc, fd = report["class_accuracy"], report["frechet_distance"]
    return {
        "accuracy_dense": acc["dense"]["accuracy"],
        "accuracy_method": acc["method"]["accuracy"],
        "fd_dense": fd["dense"]["fd"],
        "fd_dense_std": fd["dense"]["std"],
        "fd_method": fd["method"]["fd"],
        "fd_method_std": fd["method"]["std"],
        "fd_n": fd["dense"]["n"],
        "psnr_db": report["psnr_db"]["mean"],
        "ssim": report["ssim"]["mean"],
        "layer_rel_error": report["layer_rel_error_mean"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/agent_lora_recovery")
    p.add_argument("--samples", type=int, default=359, help="evaluation samples (359: every held-out digit in the FD)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--num-agents", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--targets", default=TARGETS, help="comma-separated module names LoRA wraps")
    p.add_argument(
        "--reuse-lora", action="store_true", help="evaluate the finished LoRA in OUT/lora (training time from its log)"
    )
    args = p.parse_args()
    if min(args.samples, args.rank, args.steps, args.batch_size, args.num_agents, args.threads) < 1:
        p.error("--samples, --rank, --steps, --batch-size, --num-agents and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    lora_dir = out / "lora"
    if lora_dir.exists() and not args.reuse_lora:
        p.error(f"--out: {lora_dir} exists; pass another --out (nothing is overwritten) or --reuse-lora")
    if args.reuse_lora and not (lora_dir / "pytorch_lora_weights.safetensors").is_file():
        p.error(f"--reuse-lora: {lora_dir} holds no finished LoRA (pytorch_lora_weights.safetensors)")
    data = out / "data"
    option = f"num_agents={args.num_agents}"
    train_argv = [
        "image", "--model", MODEL, "--data", str(data), "--output", str(lora_dir),
        "--attention", "agent", "--option", option, "--lora-targets", args.targets,
        "--rank", str(args.rank), "--resolution", "32", "--max-steps", str(args.steps),
        "--batch-size", str(args.batch_size), "--learning-rate", str(args.lr),
        "--lr-warmup-steps", "50", "--caption-dropout", "0.1", "--max-sequence-length", "16",
        "--timestep-sampling", "logit_normal", "--seed", "0", "--log-every", "20", "--cpu",
    ]  # fmt: skip
    if args.reuse_lora:  # the finished run's own clock: its log's last elapsed time
        with (lora_dir / "logs" / "train_log.csv").open() as f:
            train_s = float(list(csv.DictReader(f))[-1]["elapsed_s"])
    else:
        write_image_folder(DigitsDataset("train", channels=3), data, progress=False)
        t0 = time.perf_counter()
        rc = train_main(train_argv)
        train_s = time.perf_counter() - t0
        if rc:
            raise SystemExit(f"training failed (exit {rc})")
    options = {"num_agents": args.num_agents}
    reports = {}
    for key, lora in (("before", None), ("after", lora_dir)):
        reports[key] = evaluate(MODEL, "agent", options=options, samples=args.samples, out_dir=out / key, lora=lora)
    record = {
        "model": MODEL,
        "method": "agent",
        "options": options,
        "lora": {"targets": args.targets, "rank": args.rank, "steps": args.steps, "batch_size": args.batch_size,
                 "learning_rate": args.lr, "train_seconds": round(train_s, 1), "threads": args.threads},
        "train_command": "diffattn train " + " ".join(train_argv),
        "samples": args.samples,
        "before": _summary(reports["before"]),
        "after": _summary(reports["after"]),
        "torch": torch.__version__,
    }  # fmt: skip
    write_json(out / "agent_lora_recovery.json", record)
    for key in ("before", "after"):
        s = record[key]
        print(
            f"{key}: accuracy {s['accuracy_method']:.3f} (dense {s['accuracy_dense']:.3f}); "
            f"FD {s['fd_method']:.2f} +- {s['fd_method_std']:.2f} (dense {s['fd_dense']:.2f} +- {s['fd_dense_std']:.2f}, "
            f"n={s['fd_n']}); PSNR {s['psnr_db']} dB"
        )
    print(f"LoRA training: {train_s:.0f} s; {out / 'agent_lora_recovery.json'}")


if __name__ == "__main__":
    main()
