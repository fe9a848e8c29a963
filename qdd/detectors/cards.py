"""Every qdd detector's card, declared here and registered with its class.

One table, read without importing a model: the report groups detectors by family with a
plain lookup (`qdd.detectors.registry.card_of`), while the detector modules (torchvision,
timm, open_clip, diffusers) load at the first class lookup. The files and sizes a card
names are the constants its module uses.
"""

from __future__ import annotations

from qdd.detectors.card import DetectorCard

#: RIGID's backbone file (torch.hub's DINOv2 ViT-L/14) and the side it sees.
DINOV2_FILE = "dinov2_vitl14_pretrain.pth"
RIGID_SIZE = 224
#: AEROBLADE's LPIPS trunk (torchvision's VGG16 file).
VGG_FILE = "vgg16-397923af.pth"

#: Registered name → card, family by family (`qdd.detectors.card.FAMILIES`).
CARDS: dict[str, DetectorCard] = {
    "npr": DetectorCard(
        family="end-to-end",
        input_size=256,
        resize="256²",
        interpolation="bilinear",
        crop="none",
        normalisation="imagenet",
        files=("NPR.pth (--weights)",),
        licence="no licence stated in the repository",
    ),
    "corvi": DetectorCard(
        family="end-to-end",
        input_size=None,
        resize="none",
        interpolation="-",
        crop="none",
        normalisation="imagenet",
        files=("corvi2023.pth (--weights)",),
        licence="no licence file in grip-unina/ClipBased-SyntheticImageDetection",
    ),
    "commfor": DetectorCard(
        family="end-to-end",
        input_size=384,
        resize="440 (short side; 224: 256)",
        interpolation="bilinear",
        crop="centre 384 (224)",
        normalisation="imagenet",
        files=("commfor_model.safetensors (--weights; or model_v11_ViT_384_base_ckpt.pt)",),
        licence="MIT",
    ),
    "clipd": DetectorCard(
        family="CLIP features",
        input_size=224,
        resize="224 (short side)",
        interpolation="bicubic",
        crop="centre 224",
        normalisation="clip",
        files=(
            "clipd_latent10k_plus.pth (--weights)",
            "CLIP ViT-L/14 CommonPool-XL (detector_args.backbone_weights)",
        ),
        licence="no licence file in grip-unina/ClipBased-SyntheticImageDetection",
    ),
    "univfd": DetectorCard(
        family="CLIP features",
        input_size=224,
        resize="none",
        interpolation="-",
        crop="centre 224",
        normalisation="clip",
        files=(
            "univfd_fc_weights.pth (--weights)",
            "OpenAI CLIP ViT-L/14 (detector_args.backbone_weights)",
        ),
        licence="MIT",
    ),
    "rine": DetectorCard(
        family="CLIP features",
        input_size=224,
        resize="none",
        interpolation="-",
        crop="centre 224 (zero-padded)",
        normalisation="clip",
        files=(
            "rine_model_1class_trainable.pth (--weights; any ckpt/model_*_trainable.pth)",
            "OpenAI CLIP ViT-L/14 (detector_args.backbone_weights)",
        ),
        licence="Apache-2.0",
    ),
    "bfree": DetectorCard(
        family="DINOv2",
        input_size=504,
        resize="none",
        interpolation="-",
        crop="five 504² windows in patch space",
        normalisation="imagenet",
        files=("bfree_model_epoch_best.pth (--weights; BFREE_dino2reg4.zip)",),
        licence="GRIP-UNINA non-profit research only",
    ),
    "spai": DetectorCard(
        family="spectral",
        input_size=None,
        resize="none",
        interpolation="-",
        crop="224² tiles at stride 224 (five-crop under 4 tiles; under 224 padded reflect-101)",
        normalisation="imagenet",
        files=("spai.pth (--weights; the released training checkpoint)",),
        licence="Apache-2.0",
        runtime_args=("tile_batch",),
    ),
    "aeroblade": DetectorCard(
        family="reconstruction",
        input_size=None,
        resize="none",
        interpolation="-",
        crop="bottom/right to multiples of 8",
        normalisation="none",
        files=(
            "the generators' autoencoder folders (detector_args.vae)",
            f"{VGG_FILE} (detector_args.lpips_weights)",
        ),
        licence="autoencoders' own (CreativeML OpenRAIL-M, Apache-2.0, ...); VGG16 BSD-3",
        trainable=False,
    ),
    "rigid": DetectorCard(
        family="representation",
        input_size=RIGID_SIZE,
        resize="224 (short side)",
        interpolation="bicubic",
        crop="centre 224",
        normalisation="imagenet",
        files=(f"{DINOV2_FILE} (detector_args.backbone_weights)",),
        licence="Apache-2.0 (DINOv2 weights)",
        trainable=False,
    ),
}
