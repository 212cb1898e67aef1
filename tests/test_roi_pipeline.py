"""RegionalControlPipeline on the zoo's SD, SDXL and SD ControlNet pipelines, and the CLI path."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffattn.pipelines import RegionalControlPipeline, draw_instances
from PIL import Image

import diffattn
from diffattn import zoo
from diffattn.cli import main as cli_main
from diffattn.models import ROICtrlAdapter
from diffattn.models.roictrl import ROIBlockAdapter

INSTANCES = [
    {"box": (0.05, 0.1, 0.5, 0.6), "caption": "a red cat"},
    {"box": (0.45, 0.4, 0.95, 0.95), "caption": "a blue dog"},
]


def _perturb(adapter, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))


def _run(pipe, name, **extra):
    kw = zoo.default_call_kwargs(name)
    kw.update(extra)
    return pipe(**kw).images


@pytest.mark.parametrize("name", ["sd", "sdxl", "sd-controlnet"])
def test_regional_pipeline(name):
    pipe = zoo.load(name)
    base = _run(pipe, name)
    adapter = ROICtrlAdapter.from_unet(pipe.unet, roi_sizes=(5, 4, 3))
    rc = RegionalControlPipeline(pipe, adapter=adapter)
    # zero instances: the wrapped pipeline, bit-identical
    assert np.array_equal(_run(rc, name), base)
    assert np.array_equal(_run(rc, name, instances=[]), base)
    # untrained adapter: the base model's output
    same = _run(rc, name, instances=INSTANCES)
    assert np.abs(same - base).max() <= 1e-6
    assert diffattn.applied(pipe) == []  # applied for the call only
    _perturb(adapter)
    changed = _run(rc, name, instances=INSTANCES)
    assert np.abs(changed - base).max() > 1e-4 and np.isfinite(changed).all()
    masked = _run(RegionalControlPipeline(pipe), name, instances=INSTANCES)  # the mask baseline
    assert np.abs(masked - base).max() > 1e-4
    assert np.array_equal(_run(pipe, name), base)


def test_instances_batch_layout():
    pipe = zoo.load("sd")
    rc = RegionalControlPipeline(pipe)
    inst = rc.region_instances(["a", "b"], INSTANCES, num_images_per_prompt=2, negative_prompt=["x", "y"])
    assert inst.boxes.shape == (8, 2, 4) and inst.embeds.shape[:2] == (8, 2)
    neg, _ = pipe.encode_prompt(["x", "y"], "cpu", 2, False)
    cond, _ = pipe.encode_prompt(["a red cat", "a blue dog"], "cpu", 1, False)
    assert torch.allclose(inst.embeds[:4, 0], neg) and torch.allclose(inst.embeds[4:, 1], cond[1].expand(4, -1, -1))
    nocfg = rc.region_instances("a", INSTANCES, guidance_scale=1.0)
    assert nocfg.boxes.shape == (1, 2, 4)


def test_bad_instances():
    rc = RegionalControlPipeline(zoo.load("sd"))
    bad = [
        ([{"box": (0.1, 0.1, 0.5, 0.5), "caption": "a"}, {"box": (0.2, 0.1, 1.2, 0.5), "caption": "b"}], "instance 1"),
        ([{"box": (0.5, 0.1, 0.5, 0.6), "caption": "a"}], "instance 0"),
        ([{"box": (0.1, 0.6, 0.5, 0.5), "caption": "a"}], "instance 0"),
        ([{"box": (0.1, 0.1, 0.5, 0.5)}], "instance 0"),
        ([{"box": (0.1, 0.1, 0.5), "caption": "a"}], "instance 0"),
        ({"boxes": [(0.1, 0.1, 0.5, 0.5)], "captions": ["a", "b"]}, "captions"),
        ([{"box": (0.1, 0.1, 0.5, 0.5), "caption": "a"}] * 31, "max_instances"),
    ]
    for instances, match in bad:
        with pytest.raises(ValueError, match=match):
            rc(prompt="x", instances=instances, num_inference_steps=1)
    with pytest.raises(ValueError, match="adapter"):
        RegionalControlPipeline(zoo.load("sd"), method="roi")


def test_draw_instances():
    img = Image.new("RGB", (32, 32), (0, 0, 0))
    out = np.asarray(draw_instances(img, INSTANCES, labels=False))
    assert tuple(out[3, 1]) != (0, 0, 0) or tuple(out[3, 2]) != (0, 0, 0)  # left edge of box 0
    assert tuple(out[16, 16]) == (0, 0, 0)  # inside, not on an edge


def test_cli_instances(tmp_path, capsys):
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps(INSTANCES))
    out = tmp_path / "gen.png"
    assert cli_main(["generate", "--model", "zoo:sd", "--instances", str(boxes), "--out", str(out)]) == 0
    assert out.exists() and (tmp_path / "gen-boxes.png").exists()
    adapter = ROICtrlAdapter.from_unet(zoo.load("sd").unet, roi_sizes=(5, 4, 3))
    adapter.save_pretrained(tmp_path / "adapter")
    out2 = tmp_path / "roi.png"
    args = ["generate", "--model", "zoo:sd", "--instances", str(boxes), "--attention", "roi",
            "--option", f"adapter={tmp_path / 'adapter'}", "--out", str(out2)]
    assert cli_main(args) == 0
    base = tmp_path / "base.png"
    assert cli_main(["generate", "--model", "zoo:sd", "--attention", "none", "--out", str(base)]) == 0
    assert np.array_equal(np.asarray(Image.open(out2)), np.asarray(Image.open(base)))  # untrained adapter
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"box": [0.5, 0.1, 0.2, 0.6], "caption": "x"}]))
    assert cli_main(["generate", "--model", "zoo:sd", "--instances", str(bad), "--out", str(out)]) == 2
    assert cli_main(["generate", "--model", "zoo:sd", "--instances", str(boxes), "--attention", "dense", "--out", str(out)]) == 2
    assert "roi or regional_mask" in capsys.readouterr().err  # a user error: one line, status 2


# ----------------------------------------------------------------------------------------- training


def _scenes(folder):
    from diffattn.testbed.data import DigitScenesDataset, write_image_folder

    scenes = DigitScenesDataset(num_scenes=4, canvas=32, min_size=8, max_size=14, channels=3, max_digits=3)
    return write_image_folder(scenes, folder, progress=False) / "boxes.jsonl"


def test_roictrl_recipe_trains_resumes_and_loads(tmp_path):
    from diffattn.lora import TrainConfig
    from diffattn.lora.recipe_roictrl import load_adapter
    from diffattn.lora.trainer import Trainer

    data = _scenes(tmp_path / "scenes")

    def cfg(out, steps, **kw):
        return TrainConfig(recipe="roictrl", model="zoo:sd", data=str(data), output=str(out), resolution=32,
                           cpu=True, max_steps=steps, batch_size=2, checkpoint_every=2, eval_samples=0,
                           learning_rate=1e-2, caption_dropout=0.3, attention_options={"roi_sizes": (5, 4, 3)},
                           **kw)

    Trainer(cfg(tmp_path / "full", 4)).train()
    Trainer(cfg(tmp_path / "split", 2)).train()
    Trainer(cfg(tmp_path / "split", 4, resume="latest")).train()
    a, b = load_adapter(tmp_path / "full"), load_adapter(tmp_path / "split")
    for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(v, w), k
    assert float(a.blocks[next(iter(a.blocks))].fuse_gate.detach()) != 0.0  # trained away from the zero init
    # the base is untouched: with the trained adapter and no instances the pipeline is the stock one
    pipe = zoo.load("sd")
    base = _run(pipe, "sd")
    rc = RegionalControlPipeline(pipe, adapter=a)
    assert np.array_equal(_run(rc, "sd"), base)
    assert np.abs(_run(rc, "sd", instances=INSTANCES) - base).max() > 0
    mid = load_adapter(tmp_path / "split" / "checkpoints" / "step-000002")
    assert mid.config.layers == a.config.layers


def test_roictrl_output_folder_loads_as_written(tmp_path):
    """Issue 30: the ``roictrl`` recipe's output folder (and its ``roictrl_adapter/`` subfolder) is what
    ``ROICtrlAdapter.from_pretrained``, ``generate --attention roi --option adapter=...`` and
    ``diffattn.lora.load`` take; each gives the weights the trainer ended with."""
    import diffattn.lora
    from diffattn.lora import TrainConfig
    from diffattn.lora.trainer import Trainer

    data = _scenes(tmp_path / "scenes")
    out = tmp_path / "run"
    trainer = Trainer(TrainConfig(recipe="roictrl", model="zoo:sd", data=str(data), output=str(out), resolution=32,
                                  cpu=True, max_steps=2, batch_size=2, eval_samples=0, learning_rate=1e-2,
                                  attention_options={"roi_sizes": (5, 4, 3)}))
    trainer.train()
    ref = {k: v.detach().clone() for k, v in trainer.family.denoiser.roictrl_adapter.state_dict().items()}
    init = ROICtrlAdapter.from_unet(zoo.load("sd").unet, roi_sizes=(5, 4, 3)).state_dict()
    assert any(not torch.equal(ref[k], init[k]) for k in ref)  # trained away from the init

    def same(adapter):
        got = adapter.state_dict()
        return sorted(got) == sorted(ref) and all(torch.equal(got[k], ref[k]) for k in ref)

    for folder in (out, out / "roictrl_adapter"):
        assert same(ROICtrlAdapter.from_pretrained(folder)), folder
        assert same(ROICtrlAdapter.from_pretrained(str(folder))), folder
    pipe = zoo.load("sd")
    diffattn.lora.load(pipe, out)
    assert same(pipe.unet.roictrl_adapter)

    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps(INSTANCES))
    images = []
    for i, folder in enumerate((out, out / "roictrl_adapter")):
        png = tmp_path / f"roi{i}.png"
        args = ["generate", "--model", "zoo:sd", "--instances", str(boxes), "--attention", "roi",
                "--option", f"adapter={folder}", "--out", str(png)]
        assert cli_main(args) == 0
        images.append(np.asarray(Image.open(png)))
    assert np.array_equal(images[0], images[1])
    with pytest.raises(ValueError, match="extra_modules.safetensors"):  # a run that has not finished
        (out / "extra_modules.safetensors").unlink()
        ROICtrlAdapter.from_pretrained(out)


def test_roictrl_gates_train_at_their_own_learning_rate(tmp_path):
    """The scalar gates are one AdamW group at ``gate_lr_scale x lr``, the rest another at ``lr``. Adam's first
    step moves a parameter by exactly its learning rate (``g / |g|``; weight decay of a zero is zero), so after
    one step every gate with a gradient sits at +-4e-3 (to 1%: Adam's eps against a small gradient takes off
    up to ~1e-3 of it) and no other parameter moved by more than 1e-3."""
    from diffattn.lora import TrainConfig
    from diffattn.lora.recipe_roictrl import load_adapter
    from diffattn.lora.trainer import Trainer

    data = _scenes(tmp_path / "scenes")

    def cfg(out, scale, **kw):
        return TrainConfig(recipe="roictrl", model="zoo:sd", data=str(data), output=str(out), resolution=32,
                           cpu=True, max_steps=1, batch_size=2, eval_samples=0, learning_rate=1e-3,
                           checkpoint_every=1, attention_options={"roi_sizes": (5, 4, 3), "gate_lr_scale": scale},
                           **kw)

    trainer = Trainer(cfg(tmp_path / "run", 4))
    groups = trainer.optimizer.param_groups
    assert [g["lr"] for g in groups] == pytest.approx([1e-3, 4e-3])
    gate_ids = {id(p) for p in groups[1]["params"]}
    names = [n for n, p in zip(trainer.param_names, trainer.params) if id(p) in gate_ids]
    assert names and all(n.rsplit(".", 1)[-1] in ROIBlockAdapter.GATES for n in names)
    assert len(names) == sum(n.rsplit(".", 1)[-1] in ROIBlockAdapter.GATES for n in trainer.param_names)
    before = {k: v.clone() for k, v in trainer.model.roictrl_adapter.state_dict().items()}
    trainer.train()
    after = load_adapter(tmp_path / "run").state_dict()
    moved_gates = 0
    for k, v in after.items():
        step = (v - before[k]).abs().max().item()
        if k.rsplit(".", 1)[-1] in ROIBlockAdapter.GATES:
            assert step == pytest.approx(4e-3, rel=1e-2) or step == 0.0, k  # zero: no gradient yet (behind a 0 gate)
            moved_gates += step > 0
        else:
            assert step <= 1e-3 * (1 + 1e-4), k
    assert moved_gates >= 3  # fuse_gate, gsa_gate, ff_gate of the first block at least
    for bad in (0, -1, "x"):
        with pytest.raises(ValueError, match="gate_lr_scale"):
            Trainer(cfg(tmp_path / "bad", bad))
    # a checkpoint's optimizer groups must match the run resuming it (1: one group, as before the factors)
    with pytest.raises(ValueError, match="2 optimizer parameter group.* this run 1"):
        Trainer(cfg(tmp_path / "run", 1, resume="latest")).train()


def test_roictrl_condition_pads_and_follows_caption_dropout():
    from types import SimpleNamespace

    from diffattn.lora.recipe_roictrl import _condition

    pipe = zoo.load("sd")
    pipe.unet.add_module("roictrl_adapter", ROICtrlAdapter.from_unet(pipe.unet, roi_sizes=(3,)))

    def encode(captions, device):
        return {"encoder_hidden_states": pipe.encode_prompt(captions, device, 1, False)[0]}

    trainer = SimpleNamespace(family=SimpleNamespace(denoiser=pipe.unet, encode_text=encode),
                              cfg=SimpleNamespace(caption_dropout=0.1))
    batch = {"boxes": [torch.tensor([[0.1, 0.1, 0.5, 0.5], [0.3, 0.3, 0.3, 0.6]]), torch.tensor([[0.0, 0.0, 1.0, 1.0]])],
             "box_captions": [["a 1", "a 2"], ["a 3"]]}
    cond = encode(["a 1 and a 2", ""], "cpu")  # the second caption was dropped
    inst = _condition(trainer, batch, cond)["model_kwargs"]["roi_instances"]
    assert inst.boxes.shape == (2, 2, 4)
    assert inst.mask.tolist() == [[True, False], [True, False]]  # the zero-width box and the padding
    empty = encode([""], "cpu")["encoder_hidden_states"][0]
    assert torch.equal(inst.embeds[1, 0], empty) and torch.equal(inst.embeds[0, 0], encode(["a 1"], "cpu")["encoder_hidden_states"][0])


def test_eval_roictrl_testbed_tiny_end_to_end(tmp_path):
    """``scripts/eval_roictrl_testbed.py --tiny``: scenes, base training, adapter training and the three-way
    evaluation run through and write the report and grid; each success rate is a fraction of the boxes."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "eval_roictrl_testbed.py"
    spec = importlib.util.spec_from_file_location("eval_roictrl_testbed", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    threads = torch.get_num_threads()
    try:
        report = mod.main(["--run", str(tmp_path / "run"), "--tiny"])
    finally:
        torch.set_num_threads(threads)  # the script sets its own (--threads, default 1)
    rates = report["instance_success_rate"]
    assert set(rates) == {"global", "regional_mask", "roi"} and report["boxes"] > 0
    for rate in rates.values():
        assert 0.0 <= rate <= 1.0 and (rate * report["boxes"]) == pytest.approx(round(rate * report["boxes"]))
    assert (tmp_path / "run" / "report.json").is_file() and (tmp_path / "run" / "grid.png").is_file()
