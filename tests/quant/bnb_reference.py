"""Test helper: bitsandbytes' packed 4-bit codes decoded by hand (what its storage means)."""

from __future__ import annotations

import torch
from torch import Tensor

from qdd.quant.bnb4bit import BNB_BLOCK, bnb_code


def bnb_decode(packed: Tensor, absmax: Tensor, precision: str, numel: int) -> Tensor:
    """Decode bitsandbytes' packed 4-bit codes by hand: ``code[q] × absmax`` (fp32, flat).

    Two codes per byte, the first in the high nibble; one absmax per block of 64.
    """
    packed = packed.reshape(-1).to(torch.uint8)
    codes = torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(-1)[:numel].long()
    scale = absmax.float().repeat_interleave(BNB_BLOCK)[:numel]
    return bnb_code(precision, packed.device)[codes] * scale
