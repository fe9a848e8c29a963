"""LPIPS-vgg v0.1 (Zhang et al., CVPR 2018) restricted to its second layer (relu2_2).

AEROBLADE's distance is that one layer's LPIPS map, averaged over space. Only what it
needs is read: VGG16's first four convolutions (``features.{0,2,5,7}``) from torchvision's
ImageNet file (the whole ``vgg16-397923af.pth``, or a file with just those keys) and the
layer's linear weights ``lin1`` — the LPIPS v0.1 file, which torchmetrics ships (the same
tensors as the ``lpips`` package's ``weights/v0.1/vgg.pth``).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
from torch import Tensor, nn

from qdd.detectors.weights import load_tensor_file, state_mismatch, unwrap_state
from qdd.errors import QddError

#: LPIPS's ScalingLayer: inputs in [-1, 1] → roughly ImageNet-normalised.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
#: VGG16 ``features`` indices up to relu2_2 and the convolutions among them.
CONVS = {0: (3, 64), 2: (64, 64), 5: (64, 128), 7: (128, 128)}
LIN_KEY = "lin1.model.1.weight"


def lpips_linear_file() -> Path:
    """The LPIPS v0.1 vgg linear weights as torchmetrics installs them."""
    return Path(str(resources.files("torchmetrics") / "functional/image/lpips_models/vgg.pth"))


class LpipsLayer2(nn.Module):
    """``distance(a, b)``: LPIPS-vgg layer 2, spatial mean, for images in [0, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1))
        layers: list[nn.Module] = []
        for index in range(9):  # conv relu conv relu | pool conv relu conv relu
            if index in CONVS:
                layers.append(nn.Conv2d(*CONVS[index], kernel_size=3, padding=1))
            else:
                layers.append(nn.MaxPool2d(2, 2) if index == 4 else nn.ReLU())
        self.features = nn.Sequential(*layers)
        self.lin = nn.Conv2d(128, 1, kernel_size=1, bias=False)

    def load_vgg(self, path: Path) -> None:
        """VGG16's first four convolutions from ``path``, strictly; one line on a mismatch."""
        try:
            state = unwrap_state(load_tensor_file(path))
        except ValueError as error:  # a file of something else than a state dict
            raise QddError(f"{path} is not torchvision's VGG16 file ({error})") from None
        wanted = {f"features.{k}" for k in self.features.state_dict()}
        found = {k: v for k, v in state.items() if k in wanted}
        problems = state_mismatch(
            {f"features.{k}": v for k, v in self.features.state_dict().items()}, found
        )
        if problems:
            raise QddError(
                f"{path} is not torchvision's VGG16 for aeroblade's LPIPS ({problems}): pass "
                "vgg16-397923af.pth (see checkpoints/README.md) as "
                "--model.detector_args.lpips_weights"
            )
        self.features.load_state_dict({k.removeprefix("features."): v for k, v in found.items()})

    def load_linear(self, path: Path) -> None:
        weight = load_tensor_file(path).get(LIN_KEY)
        if weight is None or weight.shape != self.lin.weight.shape:
            raise QddError(f"{path} holds no LPIPS v0.1 {LIN_KEY} of shape (1, 128, 1, 1)")
        self.lin.weight.data.copy_(weight)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        """(N,) distances between two batches of images in [0, 1] (float32)."""
        fa, fb = (self.features((2 * x - 1 - self.shift) / self.scale) for x in (a, b))
        fa, fb = (f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10) for f in (fa, fb))
        return self.lin((fa - fb) ** 2).mean(dim=(1, 2, 3))
