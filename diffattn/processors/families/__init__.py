"""The stock diffusers attention processors, one family per module, each re-expressed with a pluggable
attention core (see :mod:`.base` for the contract and :mod:`.lookup` for how a module's family is found).

Each module tracks one diffusers file: ``sd`` (``attention_processor.AttnProcessor2_0``), ``sd3``
(``JointAttnProcessor2_0``), ``flux`` (``transformer_flux``), ``wan`` (``transformer_wan``), ``hunyuan_video``
(``transformer_hunyuan_video``), ``mochi`` (``MochiAttnProcessor2_0``), ``cogvideox``
(``CogVideoXAttnProcessor2_0``).
"""

from .base import FAMILY_ATTR, NAME_ATTR, TEXT_ONLY_ATTR, WAN_TEXT_CONTEXT, AttnCall, Family
from .lookup import FAMILIES, family_of_processor, get_family, infer_family, stock_processor_for

__all__ = [
    "FAMILIES",
    "FAMILY_ATTR",
    "NAME_ATTR",
    "TEXT_ONLY_ATTR",
    "WAN_TEXT_CONTEXT",
    "AttnCall",
    "Family",
    "family_of_processor",
    "get_family",
    "infer_family",
    "stock_processor_for",
]
