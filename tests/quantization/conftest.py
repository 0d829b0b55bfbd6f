import shutil
from pathlib import Path

import pytest
import torch

from tiny_models import make_tiny_model

# Two architectures between them cover biases (Qwen2's q/k/v), GQA, tied embeddings and an untied lm_head.
ARCHS = ["qwen2-bias", "llama-gqa-llama3rope-tied"]


@pytest.fixture(scope="session", params=ARCHS)
def tiny_model(request, tmp_path_factory):
    return make_tiny_model(tmp_path_factory, request.param)


@pytest.fixture(scope="session")
def qwen2_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory, "qwen2-bias")


@pytest.fixture(scope="session")
def outlier_model(tmp_path_factory):
    """A tiny model whose norms make four hidden channels 8x larger than the rest, the activation shape of real
    LLMs that activation-aware scaling is for (random tiny models have no such channels)."""
    path, hf = make_tiny_model(tmp_path_factory, "qwen2-bias")
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "layernorm" in name:
                p[:4] *= 8
    out = tmp_path_factory.mktemp("qwen2-bias-outliers")
    hf.save_pretrained(out, safe_serialization=True)
    for f in Path(path).iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            shutil.copy(f, out / f.name)
    return str(out)
