"""LoRA configuration on upstream ``peft`` with ConPET's defaults, and parameter counting.

ConPET applies loralib LoRA with r=4, alpha=1 (scaling 0.25), dropout 0 to the query and key projections of every
attention layer. The same shapes here give 2,097,152 trainable parameters on LLaMA-7B and 36,864 on MiniLM-L6.
"""

from __future__ import annotations

import peft
import torch

#: Query/key projection names per architecture family, tried in order; the first pair present is used.
_QK_NAMES: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj"),  # LLaMA, Mistral, Qwen2, OPT, Gemma, ...
    ("query", "key"),  # BERT, RoBERTa, ELECTRA
    ("q_lin", "k_lin"),  # DistilBERT
    ("c_attn",),  # GPT-2: one fused q/k/v projection, so LoRA there also adapts v
)


def default_target_modules(model: torch.nn.Module) -> list[str]:
    """The query and key projection names of ``model`` (ConPET adapts only q and k).

    Raises:
        ValueError: no known query/key projection names; pass ``target_modules`` explicitly.
    """
    leaves = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if not list(module.children())}
    for names in _QK_NAMES:
        if all(n in leaves for n in names):
            return list(names)
    raise ValueError(
        f"cannot tell the query/key projections of {type(model).__name__}; set model.lora.target_modules "
        f"(known names: {[list(n) for n in _QK_NAMES]})"
    )


def make_lora_config(
    r: int = 4,
    alpha: float = 1.0,
    dropout: float = 0.0,
    target_modules: list[str] | None = None,
    model: torch.nn.Module | None = None,
) -> peft.LoraConfig:
    """A ``peft.LoraConfig`` for named adapters on a frozen base model (no bias, no task head).

    Args:
        r: LoRA rank (ConPET: 4).
        alpha: LoRA alpha; the update is scaled by ``alpha / r`` (ConPET: 1, i.e. 0.25).
        dropout: dropout on the LoRA input (ConPET: 0).
        target_modules: module names to adapt; None = ``default_target_modules(model)``.
        model: the base model, needed only when ``target_modules`` is None.

    Raises:
        ValueError: neither ``target_modules`` nor ``model`` given, or a bad rank.
    """
    if r < 1:
        raise ValueError(f"LoRA rank r must be >= 1, got {r}")
    if target_modules is None:
        if model is None:
            raise ValueError("make_lora_config needs target_modules or the model to derive them from")
        target_modules = default_target_modules(model)
    return peft.LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules), bias="none"
    )


def count_parameters(module: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared (tied) tensors are counted once. Works on the meta device."""
    trainable = total = 0
    for param in module.parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return trainable, total
