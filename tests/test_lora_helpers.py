"""Tiny training data written into tmp folders (shared by the ``test_lora*`` files)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

CAPTIONS = ["a red cat", "a blue dog", "a green tree", "a white horse"]


def write_images(folder: Path, n: int = 4, size: int = 24, captions: str = "sidecar") -> Path:
    """``n`` distinct RGB images (a bright square at a different place in each) with captions.

    ``captions``: "sidecar" (x.txt), "jsonl" (metadata.jsonl) or "none".
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        arr = (rng.random((size, size, 3)) * 80).astype(np.uint8)
        q = size // 4
        y, x = (i // 2) * 2 * q, (i % 2) * 2 * q
        arr[y : y + 2 * q, x : x + 2 * q, i % 3] = 255
        Image.fromarray(arr).save(folder / f"img{i}.png")
        cap = CAPTIONS[i % len(CAPTIONS)]
        if captions == "sidecar":
            (folder / f"img{i}.txt").write_text(cap)
        rows.append({"file_name": f"img{i}.png", "text": cap})
    if captions == "jsonl":
        (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder


def write_gifs(folder: Path, n: int = 2, frames: int = 9, size: int = 16) -> Path:
    """``n`` GIF clips of a square moving right, with sidecar captions."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        pics = []
        for f in range(frames):
            arr = np.zeros((size, size, 3), np.uint8)
            x = f % (size - 4)
            arr[4:8, x : x + 4, i % 3] = 255
            pics.append(Image.fromarray(arr))
        pics[0].save(folder / f"clip{i}.gif", save_all=True, append_images=pics[1:], duration=125, loop=0)
        (folder / f"clip{i}.txt").write_text(f"a cat dancing {i}")
    return folder


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on 2 shared cores, OpenMP threads spinning against other processes made the
    overfit test 25x slower (180 s instead of 7 s); subprocesses get OMP_NUM_THREADS=1 likewise."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
