"""``python -m diffattn.lora RECIPE ...`` (and ``accelerate launch -m diffattn.lora ...``)."""

from .cli import main

raise SystemExit(main(prog="python -m diffattn.lora"))
