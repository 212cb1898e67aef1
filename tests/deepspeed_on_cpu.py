"""Run ``diffattn.lora``'s command line under DeepSpeed on CPU processes (a test helper for ``torchrun``).

DeepSpeed runs on CPU (its CPU accelerator, gloo), and accelerate selects DeepSpeed for a CPU group
when ``ACCELERATE_USE_DEEPSPEED=true``, but then reports one process of rank 0 on every process (its
CPU path never reads the group it just initialised). This sets the process count and rank from
``torch.distributed``, which is what accelerate does for accelerator groups; DeepSpeed's engine and
ZeRO optimizer then run unchanged:

    ACCELERATE_USE_DEEPSPEED=true ACCELERATE_DEEPSPEED_ZERO_STAGE=2 \\
        torchrun --standalone --nproc_per_node 2 tests/deepspeed_on_cpu.py image --model zoo:sd ...
"""

from __future__ import annotations

import os
import sys

import torch.distributed as dist
from accelerate.state import PartialState
from accelerate.utils import DistributedType

_init = PartialState.__init__


def _init_ranks(self, *args, **kwargs):  # type: ignore[no-untyped-def]
    _init(self, *args, **kwargs)
    if self.distributed_type == DistributedType.DEEPSPEED and dist.is_initialized():
        self.num_processes = dist.get_world_size()
        self.process_index = dist.get_rank()
        self.local_process_index = int(os.environ.get("LOCAL_RANK", self.process_index))


PartialState.__init__ = _init_ranks


def _report_layout() -> None:
    from diffattn.lora.trainer import Trainer

    train = Trainer.train

    def train_and_report(self):  # type: ignore[no-untyped-def]
        acc = self.accelerator
        print(
            f"deepspeed_on_cpu: {acc.distributed_type.name}, rank {acc.process_index} of {acc.num_processes}, "
            f"engine {type(self.model).__name__}",
            file=sys.stderr,
        )
        return train(self)

    Trainer.train = train_and_report


if __name__ == "__main__":
    from diffattn.lora.cli import main

    _report_layout()
    raise SystemExit(main(sys.argv[1:], prog="deepspeed_on_cpu"))
