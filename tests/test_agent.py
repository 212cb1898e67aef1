"""Agent attention: token merging, AgentSD processor, pooled agents for transformers, the trainable module."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

import diffattn
from diffattn import zoo
from diffattn.context import AttentionContext
from diffattn.models import AgentAttention
from diffattn.ops.agent_attention import agent_attention, agent_grid, pool_agents
from diffattn.ops.token_merging import bipartite_soft_matching, merge, random_partition, unmerge
from diffattn.processors import AgentAttnProcessor, AgentConfig, PooledAgentAttnProcessor
from diffattn.processors.agent import DEFAULT_SCHEDULE, AgentPhase
from diffattn.processors.layout import TokenLayout

# ----- plain references ---------------------------------------------------------------------------------


def top_left_dst(h: int, w: int, sx: int, sy: int) -> list[int]:
    return sorted((i * sy) * w + j * sx for i in range(h // sy) for j in range(w // sx))


def brute_merge(x: torch.Tensor, metric: torch.Tensor, dst_pos: list[int], r: int):
    """ToMe by hand, one sample at a time: returns merged (B, N - r, C) and, per sample, the row of the
    merged output that each original position ends up in."""
    b, n, _ = x.shape
    src_pos = [p for p in range(n) if p not in set(dst_pos)]
    outs, rows = [], []
    for i in range(b):
        m = metric[i].double()
        m = m / m.norm(dim=-1, keepdim=True)
        best = []
        for s in src_pos:
            sims = [float(m[s] @ m[d]) for d in dst_pos]
            j = max(range(len(sims)), key=lambda t: sims[t])
            best.append((sims[j], j))
        order = sorted(range(len(src_pos)), key=lambda t: -best[t][0])  # stable: ties keep src order
        merged, kept = order[:r], order[r:]
        groups = {j: [dst_pos[j]] for j in range(len(dst_pos))}
        for t in merged:
            groups[best[t][1]].append(src_pos[t])
        tokens = [x[i, src_pos[t]] for t in kept]
        tokens += [torch.stack([x[i, p] for p in groups[j]]).mean(0) for j in range(len(dst_pos))]
        row = {}
        for k, t in enumerate(kept):
            row[src_pos[t]] = k
        for j in range(len(dst_pos)):
            for p in groups[j]:
                row[p] = len(kept) + j
        outs.append(torch.stack(tokens))
        rows.append([row[p] for p in range(n)])
    return torch.stack(outs), rows


def brute_unmerge(y: torch.Tensor, rows: list[list[int]]) -> torch.Tensor:
    return torch.stack([y[i, rows[i]] for i in range(y.shape[0])])


def softmax_attention(q, k, v, scale, bias=None):
    s = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    if bias is not None:
        s = s + bias
    return torch.einsum("bhij,bhjd->bhid", s.float().softmax(-1).to(q.dtype), v)


def reference_agentsd(attn, x, dst_pos, r, agent_r, use_agents, k_scale2, k_shortcut):
    """The AgentSD formula, loop-free except for the brute-force merge."""
    b, n, c = x.shape
    heads = attn.heads
    merged, rows = brute_merge(x, x, dst_pos, r)
    agents_in, _ = brute_merge(x, x, dst_pos, agent_r)

    def lin(layer, t):
        return t @ layer.weight.T + (layer.bias if layer.bias is not None else 0)

    def split(t):
        return t.reshape(b, t.shape[1], heads, -1).transpose(1, 2)

    q, k, v = split(lin(attn.to_q, merged)), split(lin(attn.to_k, merged)), split(lin(attn.to_v, merged))
    d = q.shape[-1]
    if use_agents:
        a = split(lin(attn.to_q, agents_in))
        agent_v = softmax_attention(a, k, v, d**-0.5)
        out = softmax_attention(q, a, agent_v, d ** (-0.5 * k_scale2)) + k_shortcut * v
    else:
        out = softmax_attention(q, k, v, d**-0.5)
    out = lin(attn.to_out[0], out.transpose(1, 2).reshape(b, -1, c))
    return brute_unmerge(out, rows)


def _attn(c=32, heads=2, seed=0):
    torch.manual_seed(seed)
    attn = Attention(c, heads=heads, dim_head=c // heads, bias=True, out_bias=True)
    return attn.eval()


# ----- token merging ------------------------------------------------------------------------------------


@pytest.mark.parametrize("h,w,sx,sy", [(8, 8, 2, 2), (6, 10, 4, 4), (7, 9, 2, 3), (4, 4, 1, 1)])
def test_random_partition_one_dst_per_window(h, w, sx, sy):
    g = torch.Generator().manual_seed(3)
    src, dst = random_partition(h, w, sx, sy, generator=g)
    assert sorted(torch.cat([src, dst]).tolist()) == list(range(h * w))
    assert len(dst) == (h // sy) * (w // sx)
    windows = {((p // w) // sy, (p % w) // sx) for p in dst.tolist()}
    assert len(windows) == len(dst), "one dst per window"
    assert all(p // w < (h // sy) * sy and p % w < (w // sx) * sx for p in dst.tolist()), "leftovers are src"
    again = random_partition(h, w, sx, sy, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again[1], dst)
    assert random_partition(h, w, sx, sy, randomize=False)[1].tolist() == top_left_dst(h, w, sx, sy)
    with pytest.raises(ValueError, match="does not fit"):
        random_partition(h, w, w + 1, sy)


@pytest.mark.parametrize("chunk", [None, 7], ids=["one_slice", "slices_of_rows"])
@pytest.mark.parametrize("h,w,sx,sy,ratio", [(6, 6, 2, 2, 0.5), (5, 7, 2, 2, 0.3), (8, 8, 4, 4, 0.9), (4, 6, 2, 3, 0.0)])
def test_bipartite_matching_matches_brute_force(h, w, sx, sy, ratio, chunk, monkeypatch):
    if chunk is not None:  # scores computed a few rows at a time (uneven last slice), as on large grids
        import importlib

        monkeypatch.setattr(importlib.import_module("diffattn.ops.token_merging"), "_SCORE_CHUNK_ELEMENTS", chunk)
    torch.manual_seed(1)
    x = torch.randn(2, h * w, 6, dtype=torch.float64)
    metric = torch.randn(2, h * w, 5, dtype=torch.float64)
    src, dst = random_partition(h, w, sx, sy, generator=torch.Generator().manual_seed(0))
    m = bipartite_soft_matching(metric, src, dst)
    r = min(int(h * w * ratio), m.num_src)
    y = merge(x, m, r)
    ref, rows = brute_merge(x, metric, dst.tolist(), r)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(unmerge(y, m, r), brute_unmerge(ref, rows), rtol=0, atol=1e-12)
    # other reductions go through scatter_reduce: "sum" conserves the token total
    torch.testing.assert_close(merge(x, m, r, mode="sum").sum(1), x.sum(1), rtol=0, atol=1e-10)


def test_merge_unmerge_ratio_zero_is_identity():
    x = torch.randn(3, 48, 8)
    src, dst = random_partition(6, 8, 2, 2, generator=torch.Generator().manual_seed(0))
    m = bipartite_soft_matching(x, src, dst)
    assert torch.equal(unmerge(merge(x, m, 0), m, 0), x)
    with pytest.raises(ValueError, match="r="):
        merge(x, m, m.num_src + 1)


def test_merge_unmerge_gradients():
    src, dst = random_partition(4, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    metric = torch.randn(2, 16, 3, dtype=torch.float64)
    m = bipartite_soft_matching(metric, src, dst)
    x = torch.randn(2, 16, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 11, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: merge(t, m, 5), (x,))
    assert torch.autograd.gradcheck(lambda t: unmerge(t, m, 5), (y,))


def test_merge_matches_tomesd_when_installed():
    tomesd_merge = pytest.importorskip("tomesd.merge")
    torch.manual_seed(0)
    h = w = 8
    x = torch.randn(2, h * w, 16)
    r = 20
    # tomesd with no_rand picks the top-left token of each window, like randomize=False
    m_fn, u_fn = tomesd_merge.bipartite_soft_matching_random2d(x, w, h, 2, 2, r, no_rand=True)
    src, dst = random_partition(h, w, 2, 2, randomize=False)
    ours = bipartite_soft_matching(x, src, dst)
    # token order inside the merged sequence may differ (tomesd's argsorts are unstable): compare the
    # round trip, which places every value back at its positions
    torch.testing.assert_close(unmerge(merge(x, ours, r), ours, r), u_fn(m_fn(x)), rtol=0, atol=1e-6)


# ----- the agent attention formula ----------------------------------------------------------------------


def test_agent_attention_matches_formula_with_biases_and_mask():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 40, 8) for _ in range(3))
    a = torch.randn(2, 3, 6, 8)
    kb, qb = torch.randn(1, 3, 6, 40) * 0.1, torch.randn(1, 3, 40, 6) * 0.1
    keep = torch.rand(2, 1, 1, 40) > 0.2
    out = agent_attention(q, k, v, a, agent_scale=0.7, shortcut=0.1, key_bias=kb, query_bias=qb, key_mask=keep)
    agent_v = softmax_attention(a, k, v, 8**-0.5, kb + torch.where(keep, 0.0, float("-inf")))
    ref = softmax_attention(q, a, agent_v, 0.7, qb) + 0.1 * v
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    # low precision: bf16 inputs against the fp32 result, in bf16 (default) and with upcast=True
    full = agent_attention(q, k, v, a)
    for upcast in (False, True):
        half = agent_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), a.bfloat16(), upcast=upcast)
        assert half.dtype == torch.bfloat16
        torch.testing.assert_close(half.float(), full, rtol=0, atol=3e-2)


# ----- AgentSD processor --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "phase",
    [
        AgentPhase(sx=4, sy=4, ratio=0.4, agent_ratio=0.95),  # agents + ToMe (first phase)
        AgentPhase(sx=2, sy=2, ratio=0.4, agent_ratio=0.5),  # ToMe only (second phase)
        AgentPhase(sx=2, sy=2, ratio=0.0, agent_ratio=0.7),  # agents without ToMe
    ],
)
def test_agentsd_processor_matches_reference(phase):
    h, w, c = 8, 12, 32
    attn = _attn(c)
    proc = AgentAttnProcessor(height=h, width=w, schedule=[(1.0, phase)], use_rand=False)
    attn.set_processor(proc)
    x = torch.randn(2, h * w, c)
    with torch.no_grad():
        out = attn(x)
        n = h * w
        n_src = n - (h // phase.sy) * (w // phase.sx)
        r, agent_r = min(int(n * phase.ratio), n_src), min(int(n * phase.agent_ratio), n_src)
        use_agents = 2 * (n - agent_r) < n - r
        assert use_agents == (phase.agent_ratio > 0.6)
        ref = reference_agentsd(attn, x, top_left_dst(h, w, phase.sx, phase.sy), r, agent_r, use_agents, 0.3, 0.075)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert proc.last_phase == phase


def test_agent_count_cap_and_stock_fallbacks():
    # sx = sy = 4, agent_ratio 0.95: capped at N - N/16 merges, so N/16 agents
    h = w = 16
    attn = _attn(32)
    proc = AgentAttnProcessor(height=h, width=w, use_rand=False, max_downsample=1)
    plan, src, dst = proc._draw(attn, (1, h * w, 32), (1, h, w), torch.device("cpu"))
    assert plan.use_agents and h * w - plan.agent_r == h * w // 16 and len(dst) == h * w // 16
    # cross-attention, masks and levels deeper than max_downsample run the stock processor bit-identically
    x = torch.randn(2, h * w, 32)
    ctx_states = torch.randn(2, 5, 32)
    mask = torch.zeros(2, 1, h * w)
    stock = AttnProcessor2_0()
    with torch.no_grad():
        attn.set_processor(stock)
        ref_cross = attn(x, encoder_hidden_states=ctx_states)
        ref_masked = attn(x, attention_mask=mask)
        ref_deep = attn(x[:, :64])
        attn.set_processor(proc)
        assert torch.equal(attn(x, encoder_hidden_states=ctx_states), ref_cross)
        assert torch.equal(attn(x, attention_mask=mask), ref_masked)
        assert torch.equal(attn(x[:, :64]), ref_deep)  # an 8x8 level of a 16x16 grid: downsample 2
        # by hand with the default max_downsample, levels count from the largest layer seen
        relative = AgentAttnProcessor()
        attn.set_processor(relative)
        assert not torch.equal(attn(x), attn.set_processor(stock) or attn(x))
        attn.set_processor(relative)
        assert torch.equal(attn(x[:, :64]), ref_deep)


def test_batch_independent_and_seeded():
    """CFG halves in one batch get what they would get run separately; the seed fixes the partition."""
    attn = _attn(32)
    ctx = AttentionContext(grid=(1, 8, 8), step_index=3, num_steps=10)
    attn.set_processor(AgentAttnProcessor(context=ctx))
    x = torch.randn(2, 64, 32)
    with torch.no_grad():
        both = attn(x)
        torch.testing.assert_close(both, torch.cat([attn(x[:1]), attn(x[1:])]), rtol=0, atol=1e-6)
        assert torch.equal(attn(x), both)
        attn.set_processor(AgentAttnProcessor(context=ctx, seed=1))
        assert not torch.allclose(attn(x), both)


def test_schedule_resolution_and_overrides():
    cfg = AgentConfig()
    assert cfg.schedule == DEFAULT_SCHEDULE
    assert cfg.phase_at(None) == cfg.phase_at(0.0) == cfg.phase_at(0.39) == DEFAULT_SCHEDULE[0][1]
    assert cfg.phase_at(0.4) == cfg.phase_at(0.99) == DEFAULT_SCHEDULE[1][1]
    cfg = AgentConfig(schedule=[(0.5, {"sx": 4, "sy": 4, "agent_ratio": 0.9}), (0.8, AgentPhase())], ratio=0.25)
    assert [p.ratio for _, p in cfg.phases] == [0.25, 0.25]
    assert cfg.phase_at(0.9) == cfg.phases[-1][1]  # the last phase covers any later step


@pytest.mark.parametrize(
    "options,error",
    [
        ({"ratio": 1.0}, ValueError),
        ({"ratio": -0.1}, ValueError),
        ({"agent_ratio": 1.0}, ValueError),
        ({"agent_ratio": float("nan")}, ValueError),
        ({"sx": 0}, ValueError),
        ({"sy": 1.5}, ValueError),
        ({"schedule": [(0.5, {"sx": 0})]}, ValueError),
        ({"schedule": [(0.6, {}), (0.4, {})]}, ValueError),
        ({"schedule": [(1.2, {})]}, ValueError),
        ({"schedule": []}, ValueError),
        ({"schedule": [(1.0, {"stride": 2})]}, TypeError),
        ({"max_downsample": 3}, ValueError),
        ({"num_agents": 0}, ValueError),
        ({"agent_ratios": 0.5}, TypeError),
    ],
)
def test_bad_options(options, error):
    with pytest.raises(error):
        AgentAttnProcessor(**options)


def test_by_hand_infers_square_grid_and_needs_height_width_otherwise():
    attn = _attn(32)
    proc = AgentAttnProcessor()
    attn.set_processor(proc)
    with torch.no_grad():
        attn(torch.randn(2, 64, 32))
        assert proc.last_phase == DEFAULT_SCHEDULE[0][1]  # no step known: the first phase
        with pytest.raises(ValueError, match="height= and width="):
            attn(torch.randn(2, 6 * 10, 32))
        attn.set_processor(AgentAttnProcessor(height=6, width=10))
        assert attn(torch.randn(2, 60, 32)).shape == (2, 60, 32)
    with pytest.raises(ValueError, match="height and width together"):
        AgentAttnProcessor(height=6)


def test_windows_larger_than_the_grid_raise():
    attn = _attn(32)
    attn.set_processor(AgentAttnProcessor(height=3, width=8, sx=4, sy=4))
    with pytest.raises(ValueError, match="does not fit the 3 x 8 token grid"), torch.no_grad():
        attn(torch.randn(1, 24, 32))


def test_compiled_no_recompile_within_a_phase():
    compiles = []

    def backend(gm, inputs):
        compiles.append(gm)
        return gm.forward

    ctx = AttentionContext(grid=(1, 8, 8), num_steps=10)
    attn = _attn(32)
    attn.set_processor(AgentAttnProcessor(context=ctx))

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = attn

        def forward(self, x):
            return self.attn(x) * 2

    torch._dynamo.reset()
    model = torch.compile(Wrap(), backend=backend)
    x = torch.randn(2, 64, 32)
    counts = []
    with torch.no_grad():
        for step in range(10):
            ctx.step_index = step
            model(x)
            counts.append(len(compiles))
        eager_step9 = Wrap()(x)
    assert len(set(counts[:4])) == 1, f"recompiled within the first phase: {counts}"
    assert len(set(counts[4:])) == 1, f"recompiled within the second phase: {counts}"
    assert counts[4] - counts[3] <= 1, f"more than one recompile at the phase change: {counts}"
    torch.testing.assert_close(model(x), eager_step9, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_compiled_unet_pipeline_recompiles_only_at_phase_changes():
    compiles = []

    def backend(gm, inputs):
        compiles.append(gm)
        return gm.forward

    pipe = zoo.load("sd")
    eager = _run(pipe, "sd", num_inference_steps=6)
    torch._dynamo.reset()
    counts = []
    with diffattn.apply(pipe, "agent"):
        reference = _run(pipe, "sd", num_inference_steps=6)
        unet = pipe.unet
        pipe.unet = torch.compile(unet, backend=backend)
        try:
            for _ in range(2):
                counts.append([])
                out = _run(
                    pipe, "sd", num_inference_steps=6,
                    callback_on_step_end=lambda p, i, t, kw: counts[-1].append(len(compiles)) or kw,
                )
        finally:
            pipe.unet = unet
    # steps 0-2 are phase 1 (fraction < 0.4), 3-5 phase 2. Step 1 may still compile frames that the
    # graph breaks (one per applied layer) left to run eagerly on the first call; from then on only the
    # phase change compiles, once.
    first, second = counts
    assert first[1] == first[2] and first[3] - first[2] <= 1 and first[3] == first[4] == first[5], first
    assert second == [first[-1]] * 6, "a second generation compiles nothing"
    np.testing.assert_allclose(out, reference, atol=1e-5, rtol=0)
    assert not np.array_equal(reference, eager)


# ----- pooled agents for transformers -------------------------------------------------------------------


@pytest.mark.parametrize("text_position", [None, "first", "last"])
def test_pooled_agent_core_matches_reference(text_position):
    torch.manual_seed(0)
    grid, n_text, heads, d = (2, 8, 12), (5 if text_position else 0), 2, 8
    nv = grid[0] * grid[1] * grid[2]
    q, k, v = (torch.randn(2, heads, nv + n_text, d) for _ in range(3))
    proc = PooledAgentAttnProcessor(num_frames=2, height=8, width=12, num_agents=6, dit_k_shortcut=0.05)
    layout = TokenLayout("flux", n_text=n_text, text_position=text_position)
    out = proc.attention(q, k, v, layout, None)
    ag = agent_grid(grid, 6)
    assert ag == (2, 2, 3)
    vis = layout.visual_slice(nv + n_text)
    qv = q[:, :, vis]
    # adaptive pooling of an 8 x 12 grid to 2 x 3 is a mean over 4 x 4 blocks
    blocks = qv.reshape(2, heads, 2, 2, 4, 3, 4, d).mean(dim=(4, 6)).reshape(2, heads, -1, d)
    torch.testing.assert_close(pool_agents(qv, grid, ag), blocks, rtol=0, atol=1e-6)
    ref_v = softmax_attention(qv, blocks, softmax_attention(blocks, k, v, d**-0.5), d**-0.5) + 0.05 * v[:, :, vis]
    torch.testing.assert_close(out[:, :, vis], ref_v, rtol=0, atol=1e-5)
    if n_text:
        text = slice(0, n_text) if text_position == "first" else slice(nv, nv + n_text)
        torch.testing.assert_close(out[:, :, text], softmax_attention(q[:, :, text], k, v, d**-0.5), rtol=0, atol=1e-5)
    # too few tokens for the agents: dense
    few = PooledAgentAttnProcessor(num_frames=2, height=8, width=12, num_agents=64, agent_frames=2)
    torch.testing.assert_close(few.attention(q, k, v, layout, None), softmax_attention(q, k, v, d**-0.5), rtol=0, atol=1e-5)


# ----- apply / restore on the zoo -----------------------------------------------------------------------


def _run(pipe, name, **extra):
    kwargs = {**zoo.default_call_kwargs(name), **extra}
    out = pipe(**kwargs)
    return np.asarray(out.frames if hasattr(out, "frames") else out.images)


def _processors(pipe):
    return {
        f"{comp}.{n}": m.processor
        for comp, model in diffattn.api.denoisers(pipe)
        for n, m in model.named_modules()
        if hasattr(m, "processor") and hasattr(m, "to_q")
    }


@pytest.mark.parametrize(
    "name,options,cls",
    [
        ("sd", {}, AgentAttnProcessor),
        ("sdxl", {}, AgentAttnProcessor),
        ("flux", {"num_agents": 4}, PooledAgentAttnProcessor),
        ("sd3", {"num_agents": 4}, PooledAgentAttnProcessor),
        ("pixart", {"num_agents": 4}, PooledAgentAttnProcessor),
        ("wan", {"num_agents": 1, "agent_frames": 1}, PooledAgentAttnProcessor),
    ],
)
def test_apply_changes_output_and_restore_is_exact(name, options, cls):
    pipe = zoo.load(name)
    base = _run(pipe, name)
    before = _processors(pipe)
    patch = diffattn.apply(pipe, "agent", **options)
    procs = [layer.processor for _, _, layer, _, _ in patch.saved]
    assert procs and all(isinstance(p, cls) for p in procs)
    out = _run(pipe, name)
    assert np.isfinite(out).all() and not np.array_equal(out, base), "agent attention must change the output"
    diffattn.restore(pipe)
    after = _processors(pipe)
    assert all(after[k] is before[k] for k in before)
    assert np.array_equal(_run(pipe, name), base)


def test_unet_levels_schedule_and_cfg():
    pipe = zoo.load("sd")
    schedule = [(0.3, {"sx": 4, "sy": 4, "agent_ratio": 0.95}), (0.7, {"agent_ratio": 0.6}), (1.0, {"ratio": 0.2})]
    with diffattn.apply(pipe, "agent", schedule=schedule) as patch:
        procs = {name: layer.processor for _, name, layer, _, _ in patch.saved}
        assert all(n.endswith("attn1") for n in procs), "only self-attention"
        seen = []

        def record(p, i, t, kwargs):
            top = [q.last_phase for n, q in procs.items() if n.startswith(("down_blocks.0", "up_blocks.2"))]
            deep = [q.last_phase for n, q in procs.items() if n.startswith(("down_blocks.1", "mid_block"))]
            assert all(ph is None for ph in deep), "levels below max_downsample=auto (1) stay stock"
            seen.append(top[0])
            return kwargs

        _run(pipe, "sd", num_inference_steps=5, callback_on_step_end=record)  # guidance 7.5: CFG batch of 2
    phases = AgentConfig(schedule=schedule).phases
    assert seen == [phases[0][1], phases[0][1], phases[1][1], phases[1][1], phases[2][1]]


def test_sdxl_auto_level_is_the_first_with_attention():
    pipe = zoo.load("sdxl")
    with diffattn.apply(pipe, "agent") as patch:
        _run(pipe, "sdxl")
        applied = {name for _, name, layer, _, _ in patch.saved if layer.processor.last_phase is not None}
    assert applied and all(n.startswith(("down_blocks.1", "up_blocks.1")) for n in applied), applied


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_set_by_hand_on_a_unet(name):
    pipe = zoo.load(name)
    base = _run(pipe, name)
    proc = AgentAttnProcessor()
    pipe.unet.set_attn_processor(proc)
    out = _run(pipe, name)
    assert np.isfinite(out).all() and not np.array_equal(out, base)
    assert proc.last_phase == DEFAULT_SCHEDULE[0][1]  # no step known: the first phase throughout
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    assert np.array_equal(_run(pipe, name), base)


def test_bad_options_and_unsupported_models_leave_pipeline_unchanged():
    pipe = zoo.load("sd")
    before = _processors(pipe)
    for options in ({"ratio": 1.0}, {"agent_ratio": -0.5}, {"sx": 0}):
        with pytest.raises(ValueError):
            diffattn.apply(pipe, "agent", **options)
    with pytest.raises(TypeError, match="valid options"):
        diffattn.apply(pipe, "agent", ratios=0.5)
    assert diffattn.applied(pipe) == [] and all(_processors(pipe)[k] is v for k, v in before.items())
    for name in ("mochi", "cogvideox", "hunyuan-video"):
        with pytest.raises(ValueError, match="Supported: UNet2DConditionModel, FluxTransformer2DModel"):
            diffattn.apply(zoo.load(name), "agent")


def test_bench_attention_hook():
    fn = diffattn.registry.get("agent").attention(AgentConfig(num_agents=4), (1, 8, 8), 3, "last")
    q, k, v = (torch.randn(1, 2, 67, 8) for _ in range(3))
    assert fn(q, k, v).shape == q.shape


# ----- the trainable module -----------------------------------------------------------------------------


def test_agent_attention_module_from_attention_is_plain_agent_attention(tmp_path):
    attn = _attn(32, heads=4)
    module = AgentAttention.from_attention(attn, num_agents=4)
    x = torch.randn(2, 8 * 8, 32)
    with torch.no_grad():
        out = module(x)
        q = attn.to_q(x).view(2, 64, 4, 8).transpose(1, 2)
        k = attn.to_k(x).view(2, 64, 4, 8).transpose(1, 2)
        v = attn.to_v(x).view(2, 64, 4, 8).transpose(1, 2)
        a = q.reshape(2, 4, 2, 4, 2, 4, 8).mean(dim=(3, 5)).reshape(2, 4, 4, 8)
        ref = softmax_attention(q, a, softmax_attention(a, k, v, 8**-0.5), 8**-0.5)
        ref = attn.to_out[0](ref.transpose(1, 2).reshape(2, 64, 32))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)

    module.save_pretrained(tmp_path)
    loaded = AgentAttention.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(x), out)


def test_agent_attention_module_trains_and_takes_lora():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    module = AgentAttention(32, num_heads=4, num_agents=9, window=8)
    x = torch.randn(2, 6 * 10, 32)
    module(x, height=6, width=10).square().mean().backward()
    for name in ("an_bias", "ah_bias", "aw_bias", "na_bias", "ha_bias", "wa_bias", "dwc.weight", "to_q.weight"):
        grad = module.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    config = peft.LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    lora = peft.inject_adapter_in_model(config, AgentAttention(32, num_heads=4, num_agents=9))
    assert lora(x, height=6, width=10).shape == x.shape
    assert any("lora_A" in n for n, _ in lora.named_parameters())
    with pytest.raises(ValueError, match="perfect square"):
        AgentAttention(32, num_agents=10)
    with pytest.raises(ValueError, match="height= and width="):
        module(torch.randn(1, 60, 32))


def test_unet_attention_replaced_by_module_runs():
    pipe = zoo.load("sd")
    base = _run(pipe, "sd")
    block = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0]
    block.attn1 = AgentAttention.from_attention(block.attn1, num_agents=4)  # a 16 x 16 level: 4 agents
    out = _run(pipe, "sd")
    assert np.isfinite(out).all() and not np.array_equal(out, base)
