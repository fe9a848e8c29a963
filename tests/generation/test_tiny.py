from __future__ import annotations

from pathlib import Path

import pytest

from qdd.generation.registry import GENERATORS


def _linears(pipeline):  # noqa: ANN001, ANN202
    import torch

    for name, component in pipeline.components.items():
        if isinstance(component, torch.nn.Module):
            for sub_name, sub in component.named_modules():
                if isinstance(sub, torch.nn.Linear):
                    yield f"{name}.{sub_name}", sub


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_tiny_pipeline_round_trips(name: str, tmp_path: Path) -> None:
    import diffusers

    from qdd.generation.tiny import build_tiny_pipeline

    folder = build_tiny_pipeline(name, tmp_path / name)
    assert (folder / "model_index.json").is_file()
    pipeline = getattr(diffusers, GENERATORS[name].pipeline_class).from_pretrained(folder)
    # Every Linear divides the 4-bit block sizes (16 NVFP4, 32 MX, 64 bitsandbytes).
    for layer_name, layer in _linears(pipeline):
        assert layer.in_features % 32 == 0, layer_name
        assert layer.weight.numel() % 64 == 0, layer_name
    n_params = sum(
        p.numel()
        for c in pipeline.components.values()
        if hasattr(c, "parameters")
        for p in c.parameters()
    )
    assert n_params < 3_000_000


def test_tiny_pipeline_is_deterministic(tmp_path: Path) -> None:
    from qdd.generation.tiny import build_tiny_pipeline

    def weights(folder: Path) -> dict[str, bytes]:
        return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*.safetensors")}

    first = weights(build_tiny_pipeline("sd3", tmp_path / "a"))
    assert first == weights(build_tiny_pipeline("sd3", tmp_path / "b"))
    assert first != weights(build_tiny_pipeline("sd3", tmp_path / "c", seed=1))


def test_offline_tokenizers_cover_any_text() -> None:
    from qdd.generation.tiny import clip_tokenizer, t5_tokenizer

    clip = clip_tokenizer()
    ids = clip("Café at 5pm, ☕!")["input_ids"]
    assert ids[0] == clip.bos_token_id and ids[-1] == clip.eos_token_id
    assert clip.unk_token_id not in ids[1:-1]  # byte-level: nothing is unknown
    t5 = t5_tokenizer()
    ids = t5("A photo of the Sea, 35mm")["input_ids"]
    assert ids[-1] == t5.eos_token_id and t5.unk_token_id not in ids
