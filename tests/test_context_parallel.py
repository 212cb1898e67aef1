"""diffattn under diffusers' context parallelism (Ulysses): 2 CPU processes equal 1 process.

One ``torchrun`` of ``tests/cp_on_cpu.py`` (2 processes, gloo, one thread each; it patches
``torch.accelerator.device_count`` for diffusers' ``enable_parallelism``, see its docstring) runs every case
of its ``CASES``; this module runs the same cases in one process and compares (fp32, <= 1e-5). About 45 s on
2 cores (the ``torchrun``: about 30 s).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cp_on_cpu import CASES, PAIRS, RADIAL, SUPPLIED, inputs, prepare, run, run_pipeline

import diffattn
from diffattn.processors.parallel import check_context_parallel, joint_order

pytestmark = pytest.mark.usefixtures("one_thread")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
TOL = 1e-5


@pytest.fixture(scope="module")
def parallel(tmp_path_factory) -> dict:
    """``{case: output or error message}`` from 2 processes under ``ulysses_degree=2``."""
    out = tmp_path_factory.mktemp("cp") / "out.pt"
    launcher = Path(__file__).with_name("cp_on_cpu.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(launcher), str(out)]
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    noise = ("Warning", "warn(", "all_gather_tensor", "experimental feature", "split will not be applied")
    err = "\n".join(line for line in res.stderr.splitlines() if not any(n in line for n in noise))
    assert res.returncode == 0, err[-6000:]
    return torch.load(out)


_ONE: dict[tuple, torch.Tensor] = {}


def one_process(model: str, method: str | None, options: dict | None = None) -> torch.Tensor:
    """The same call in this process, without parallelism."""
    key = (model, method, tuple(sorted((options or {}).items())))
    if key not in _ONE:
        m = prepare(model)
        if method is not None:
            diffattn.apply(m, method, **(options or {}))
        _ONE[key] = run(m, model)
    return _ONE[key]


def tensor(parallel: dict, name: str) -> torch.Tensor:
    got = parallel[name]
    assert isinstance(got, torch.Tensor), f"{name}: {got}"
    return got


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def test_stock_models_under_ulysses_equal_one_process(parallel):
    """Sanity of the launcher: diffusers alone, 2 processes vs 1."""
    for model in ("wan", "flux", "hunyuan-video"):  # HunyuanVideo: under the plan diffattn supplies
        assert diff(tensor(parallel, f"{model}-stock"), one_process(model, None)) <= TOL


def test_stock_processors_that_ignore_context_parallelism_are_refused(parallel):
    """diffusers' CogVideoX and Mochi processors call SDPA themselves: under the supplied plan they would
    attend within the shard, so the plan's pre-hook refuses the call (also after restore) and names the fix."""
    for name, cls in (("cogvideox-stock", "CogVideoXAttnProcessor2_0"), ("mochi-stock", "MochiAttnProcessor2_0"),
                      ("cogvideox-dense-restored", "CogVideoXAttnProcessor2_0")):
        got = parallel[name]
        assert isinstance(got, str) and got.startswith("ValueError"), name
        assert f"{cls} ignores context parallelism" in got and "ulysses_degree=2" in got
        assert "diffattn.apply(model, 'dense')" in got


def test_bad_sequences_are_refused_before_the_first_step(parallel):
    """A token count the degree does not divide, and padded text (HunyuanVideo, Mochi), are refused by the
    pre-hooks (apply's, and the supplied plan's) on the full input, naming the degree and the rule."""
    tokens = parallel["error-tokens-wan"]
    assert "45 video tokens" in tokens and "ulysses_degree=2" in tokens and "degree must divide the number of tokens" in tokens
    text = parallel["error-text-flux"]
    assert "7 text tokens" in text and "ulysses_degree=2" in text and "must divide the number of text tokens" in text
    for name in ("error-padding-hunyuan-video", "error-padding-hunyuan-video-stock", "error-padding-mochi"):
        got = parallel[name]
        assert isinstance(got, str) and "padded text tokens" in got and "ulysses_degree=2" in got, name


@pytest.mark.parametrize("model,method,options", PAIRS, ids=[f"{m}-{meth}" for m, meth, _ in PAIRS])
def test_method_under_ulysses_equals_one_process_in_either_order(parallel, model, method, options):
    one = one_process(model, method, options)
    for order in ("apply-first", "parallel-first"):
        assert diff(tensor(parallel, f"{model}-{method}-{order}"), one) <= TOL, order
    if method != "dense":  # not vacuous: the method really changes the output at this size
        assert diff(one, one_process(model, "dense")) > 1e-3


def test_wan22_pipeline_under_ulysses_equals_one_process(parallel):
    """A whole generation with both Wan 2.2 experts; the first step is dense (stock, diffusers' Ulysses)."""
    from diffattn import zoo

    pipe = zoo.load("wan22")
    diffattn.apply(pipe, "radial", **RADIAL, dense_timesteps=1)
    assert diff(tensor(parallel, "wan22-radial-pipeline"), run_pipeline(pipe, "wan22")) <= TOL


def test_dense_equals_stock_under_ulysses(parallel):
    for model in ("wan", "flux"):
        assert diff(tensor(parallel, f"{model}-dense-apply-first"), tensor(parallel, f"{model}-stock")) <= TOL


def test_shard_local_attention_is_caught(parallel):
    """Attention within each rank's shard (what a processor ignoring the parallel config computes) gives
    another output; the real one equals one process and differs from it."""
    for model in ("wan", "flux", "cogvideox"):
        local = tensor(parallel, f"{model}-dense-shard-local")
        full = one_process(model, "dense")
        assert diff(local, full) > 1e-3
        assert diff(tensor(parallel, f"{model}-dense-apply-first"), full) <= TOL


def test_restore_under_ulysses_gives_the_stock_output(parallel):
    """enable_parallelism after apply set its config on diffattn's processors: restore hands it to the
    stock processors it puts back."""
    assert diff(tensor(parallel, "wan-radial-restored"), one_process("wan", None)) <= TOL


@pytest.mark.parametrize("order", ["apply-first", "parallel-first"])
def test_unsupported_configs_are_refused_before_the_first_step(parallel, order):
    ring = parallel[f"error-ring-{order}"]
    assert isinstance(ring, str) and "ValueError" in ring and "ring_degree=2" in ring and "Ulysses" in ring
    heads = parallel[f"error-heads-{order}"]
    assert isinstance(heads, str) and "ulysses_degree=2" in heads and "3 attention heads" in heads
    assert "must divide the number of heads" in heads
    lam = parallel[f"error-lamamba-{order}"]
    assert isinstance(lam, str) and "LaMambaAttnProcessor does not run under context parallelism" in lam
    assert "mixes all channels" in lam


def test_every_case_ran():
    names = [c.name for c in CASES]
    assert len(names) == len(set(names))
    assert {meth for _, meth, _ in PAIRS} == {"dense", "radial", "agent", "hilbert_local"}


# ----- in this process: the checks and the reordering, without a process group ------------------------------


def test_checks_without_a_process_group():
    from diffusers import ContextParallelConfig, ParallelConfig

    from diffattn.processors import CoreAttnProcessor, LaMambaAttnProcessor

    proc = CoreAttnProcessor()
    check_context_parallel(proc, None)
    check_context_parallel(proc, ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=2)), {2, 4})
    with pytest.raises(ValueError, match="ring_degree=2.*ulysses_degree=N"):
        proc._parallel_config = ParallelConfig(context_parallel_config=ContextParallelConfig(ring_degree=2))
    with pytest.raises(ValueError, match="ulysses_anything"):
        check_context_parallel(proc, ContextParallelConfig(ulysses_degree=2, ulysses_anything=True))
    with pytest.raises(ValueError, match="ulysses_degree=4 does not divide the 6 attention heads"):
        check_context_parallel(proc, ContextParallelConfig(ulysses_degree=4), {8, 6})
    with pytest.raises(ValueError, match="does not run under context parallelism"):
        LaMambaAttnProcessor(8)._parallel_config = ContextParallelConfig(ulysses_degree=2)
    assert proc._parallel_config is None  # a refused config is not kept


def test_joint_order_puts_every_text_shard_first():
    # 2 ranks, each [t t v v v]: gathered t0 t0 v0 v0 v0 t1 t1 v1 v1 v1
    assert joint_order(5, 2, "first", 2).tolist() == [0, 1, 5, 6, 2, 3, 4, 7, 8, 9]
    assert joint_order(5, 2, "last", 2).tolist() == [0, 1, 2, 5, 6, 7, 3, 4, 8, 9]
    assert joint_order(5, 0, None, 2) is None


def test_supplied_plans():
    """The plans diffattn supplies: what they split, and the models they refuse."""
    from diffattn.processors import cp_plans

    for model in SUPPLIED:
        m = prepare(model)
        plan = cp_plans.for_model(m)
        assert plan["proj_out"].gather_dim == 1
        assert cp_plans._GUARD in m.__dict__  # the input check, registered once
        assert cp_plans.for_model(m) == plan and len(m._forward_pre_hooks) == 1
    assert set(cp_plans.for_model(prepare("hunyuan-video"))) == {"x_embedder", "context_embedder", "rope", "proj_out"}
    assert cp_plans.for_model(prepare("wan")) == type(prepare("wan"))._cp_plan  # diffusers' own
    with pytest.raises(ValueError, match="has no cp plan"):
        cp_plans.for_model(torch.nn.Linear(2, 2))
    hv = prepare("hunyuan-video")
    hv.register_to_config(image_condition_type="token_replace")
    with pytest.raises(ValueError, match="token_replace.*first_frame_num_tokens"):
        cp_plans.for_model(hv)


def test_inputs_split_evenly():
    wan, flux = inputs("wan"), inputs("flux")
    assert wan["hidden_states"].shape[2:] == (5, 8, 8)  # 5 x 4 x 4 = 80 tokens
    assert flux["hidden_states"].shape[1] % 2 == 0 and flux["encoder_hidden_states"].shape[1] % 2 == 0
