"""``qdd-cli quality``: what a precision costs in image quality, against its reference twin.

Every generated image is compared with its twin at the reference precision (default
fp32): the image the same generator and model made from the same prompt, seed, steps,
guidance and size (`qdd.identity.twin_key`; `pairing`). Groups are
`qdd.identity.group_label`: two backends of one precision are two groups. Per image
(`metrics`): PSNR and SSIM on 8-bit values, LPIPS with a local torchvision trunk, the CLIP
score. Per group: FID/KID on Inception-V3 pool3 features (torch-fidelity's network, a local
``--fid-weights`` file) against the twins and, with ``--real``, against real photos;
fd_clip/kd_clip on CLIP features. LPIPS's and FID's files are checked against the
published ones (`networks`). The loop is Lightning's (`module`); `command` writes the run.

Nothing is downloaded: every network loads only from the files named.
"""

from qdd.quality.command import KIND, PARQUET, QualityResult, build_parser, run_quality
from qdd.quality.metrics import group_summary

__all__ = ["KIND", "PARQUET", "QualityResult", "build_parser", "group_summary", "run_quality"]
