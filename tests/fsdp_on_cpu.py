"""Run ``diffattn.lora``'s command line under FSDP2 on CPU processes (a test helper for ``torchrun``).

accelerate turns FSDP on only for accelerator process groups (``MULTI_GPU`` and kin) and leaves a CPU
group as plain data parallel, so sharded training could not otherwise be exercised without a GPU. FSDP2
itself (``fully_shard`` over a gloo mesh) runs on CPU; this patch lets accelerate's own FSDP2 preparation
(auto-wrap, DTensor parameters, optimizer re-pointing, sharded grad clipping) run there:

    torchrun --standalone --nproc_per_node 2 tests/fsdp_on_cpu.py image --model zoo:sd ...
"""

from __future__ import annotations

import os
import sys

from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

_init = AcceleratorState.__init__


def _init_fsdp(self, *args, **kwargs):  # type: ignore[no-untyped-def]
    _init(self, *args, **kwargs)
    # every AcceleratorState() call re-copies the process group's MULTI_CPU into the shared state
    if self.distributed_type == DistributedType.MULTI_CPU:
        if getattr(self, "fsdp_plugin", None) is None:
            self.fsdp_plugin = FullyShardedDataParallelPlugin(
                fsdp_version=int(os.environ.get("FSDP_VERSION", "2"))
            )
        self.distributed_type = DistributedType.FSDP


AcceleratorState.__init__ = _init_fsdp


def _report_layout() -> None:
    from diffattn.lora.trainer import Trainer

    train = Trainer.train

    def train_and_report(self):  # type: ignore[no-untyped-def]
        kinds = sorted({type(p).__name__ for p in self.params})
        print(f"fsdp_on_cpu: {self.accelerator.distributed_type.name}, trainable {kinds}", file=sys.stderr)
        return train(self)

    Trainer.train = train_and_report

if __name__ == "__main__":
    from diffattn.lora.cli import main

    _report_layout()
    raise SystemExit(main(sys.argv[1:], prog="fsdp_on_cpu"))
