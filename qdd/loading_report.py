"""What ``from_pretrained(..., output_loading_info=True)`` says went wrong with a weight file.

diffusers fills a missing or renamed key with random weights and only warns; qdd refuses
such files in one line. AEROBLADE's autoencoders and ``qdd-cli decode``'s VAE both read it.
"""

from __future__ import annotations

from typing import Any


def loading_problems(info: dict[str, Any]) -> str:
    """``missing keys a, b; unexpected keys c`` (first three of each), or "" when the file fit."""
    problems = [f"{name.replace('_', ' ')} {', '.join(map(str, keys[:3]))}"
                for name, keys in info.items() if name != "error_msgs" and keys]  # fmt: skip
    return "; ".join(problems)
