"""Shared test fixtures: offline, quiet, 2 threads, and tiny random backbones with the real tokenizers."""

from __future__ import annotations

import os

# Set before transformers/wandb are imported anywhere: a wrong hub id must fail at once, nothing may phone home.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "disabled"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import pytest  # noqa: E402
import torch  # noqa: E402

from conpet_lightning.models.backbone import LoadedBackbone, load_backbone  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_bert() -> LoadedBackbone:
    """Random 2-layer BERT (hidden 64) with the real MiniLM tokenizer and markers.

    Shared by the whole session: ``MaskEncoder`` wraps the model in place, so wrap ``tiny_bert.copy()``.
    """
    return load_backbone("tiny-bert")


@pytest.fixture(scope="session")
def tiny_llama() -> LoadedBackbone:
    """Random 2-layer LLaMA (hidden 64, 2 KV heads) with the real SmolLM2 tokenizer (cached) and markers.

    Shared by the whole session: ``MaskEncoder`` wraps the model in place, so wrap ``tiny_llama.copy()``.
    """
    return load_backbone("tiny-llama")
