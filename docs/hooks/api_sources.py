"""mkdocs hook: lay the package's sources out as installed, for the API reference.

``pyproject.toml`` maps ``diffattn.pipelines`` and ``diffattn.lora`` to the top-level ``pipelines/`` and
``lora/`` folders (``[tool.setuptools] package-dir``). mkdocstrings reads sources statically with griffe,
which finds the ``diffattn/`` folder of an editable install but not packages mapped from elsewhere. So
before each build this hook copies the Python files of every mapped package into ``build/api-src/`` in
the installed layout, and ``mkdocs.yml`` points mkdocstrings there (``paths: [build/api-src]``).
Nothing is imported.
"""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

from mkdocs.plugins import event_priority

SOURCES = Path("build/api-src")


def _package_dirs(root: Path) -> dict[str, Path]:
    setuptools = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {name: root / folder for name, folder in setuptools["package-dir"].items()}


@event_priority(100)  # before mkdocstrings' on_config, which builds the handler and reads `paths`
def on_config(config, **kwargs):
    root = Path(config.config_file_path).resolve().parent
    out = root / SOURCES
    if out.exists():
        shutil.rmtree(out)
    # shortest names first: diffattn/ before diffattn/lora/ is laid over it
    for name, folder in sorted(_package_dirs(root).items(), key=lambda item: item[0].count(".")):
        target = out.joinpath(*name.split("."))
        for src in folder.rglob("*.py"):
            if "__pycache__" in src.parts:
                continue
            dst = target / src.relative_to(folder)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
    return config
