"""The mask-position encoder: a frozen backbone with named upstream-``peft`` LoRA adapters.

One adapter per role (a shared PET module, or one expert per task plus a selector) lives on one copy of the
backbone. Switching is ``set_adapter``, never a merge into the base weights, so frozen adapters stay bit-identical.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import peft
import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from conpet_lightning.models.backbone import LoadedBackbone


def _split_lora_name(name: str) -> tuple[str, str] | None:
    """(adapter, name without the adapter segment) for a LoRA parameter name, else None.

    peft names LoRA tensors ``...query.lora_A.<adapter>.weight``; the adapter segment is matched exactly, so
    ``expert1`` never captures ``expert10``.
    """
    parts = name.split(".")
    for i in range(len(parts) - 1):
        if parts[i].startswith("lora_"):
            return parts[i + 1], ".".join(parts[: i + 1] + parts[i + 2 :])
    return None


class MaskEncoder(torch.nn.Module):
    """Frozen backbone + named upstream-peft LoRA adapters; returns the last hidden state at the mask position."""

    def __init__(self, backbone: LoadedBackbone, lora: peft.LoraConfig, first_adapter: str = "shared") -> None:
        """Wrap ``backbone.model`` in place with a first adapter, which becomes active and trainable.

        Raises:
            ValueError: the model already carries peft layers (wrap a ``backbone.copy()`` instead).
        """
        super().__init__()
        if any(isinstance(m, BaseTunerLayer) for m in backbone.model.modules()):
            raise ValueError(
                f"backbone {backbone.name!r} is already wrapped by a MaskEncoder; load it again or use backbone.copy()"
            )
        for param in backbone.model.parameters():
            param.requires_grad_(False)
        self.lora_config = copy.deepcopy(lora)
        self.is_decoder = backbone.is_decoder
        self.model = peft.get_peft_model(backbone.model, copy.deepcopy(lora), adapter_name=first_adapter)
        self._frozen: set[str] = set()
        self._active = first_adapter
        self._trainable = True
        self.activate(first_adapter)

    # ------------------------------------------------------------------------------------------------ adapters
    @property
    def adapters(self) -> list[str]:
        """Adapter names in creation order."""
        return list(self.model.peft_config)

    @property
    def active_adapter(self) -> str:
        """The adapter used when ``forward`` gets no ``adapter_names``."""
        return self._active

    @property
    def frozen_adapters(self) -> set[str]:
        """Adapters frozen for good (``freeze_adapter``)."""
        return set(self._frozen)

    def _lora_params(self, adapter: str | None = None) -> Iterator[tuple[str, str, torch.nn.Parameter]]:
        """(adapter, adapter-free name, parameter) of every LoRA tensor, or of one adapter's."""
        for name, param in self.model.named_parameters():
            split = _split_lora_name(name)
            if split is not None and (adapter is None or split[0] == adapter):
                yield split[0], split[1], param

    def _check(self, name: str) -> None:
        if name not in self.model.peft_config:
            raise ValueError(f"unknown adapter {name!r}; have {self.adapters}")

    def add_adapter(self, name: str, init_from: str | None = None) -> None:
        """Add a fresh LoRA adapter (peft's init: B = 0), or a copy of ``init_from``'s current weights.

        The active adapter and the trainable set do not change; call ``activate(name)`` to train it.
        """
        if name in self.model.peft_config:
            raise ValueError(f"adapter {name!r} already exists")
        if init_from is not None:
            self._check(init_from)
        self.model.add_adapter(name, copy.deepcopy(self.lora_config))
        if init_from is not None:
            self.load_adapter_state(name, self.adapter_state(init_from))
        self.activate(self._active, trainable=self._trainable)  # peft's add_adapter may re-enable grads

    def activate(self, name: str, trainable: bool = True) -> None:
        """Make ``name`` the active adapter; only its LoRA tensors require grad (none if ``trainable=False``).

        Raises:
            ValueError: unknown adapter, or ``trainable=True`` for an adapter frozen by ``freeze_adapter``.
        """
        self._check(name)
        if trainable and name in self._frozen:
            raise ValueError(f"adapter {name!r} is frozen; activate it with trainable=False")
        self.model.set_adapter(name)
        for param in self.model.parameters():  # the backbone stays frozen whatever peft's set_adapter did
            param.requires_grad_(False)
        if trainable:
            for _, _, param in self._lora_params(name):
                param.requires_grad_(True)
        self._active, self._trainable = name, trainable

    def freeze_adapter(self, name: str) -> None:
        """Freeze ``name`` for good: its tensors never require grad again, so they stay bit-identical."""
        self._check(name)
        self._frozen.add(name)
        for _, _, param in self._lora_params(name):
            param.requires_grad_(False)
        if name == self._active:
            self._trainable = False

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        """Cloned LoRA tensors of one adapter, keyed without the adapter name (so they load into any adapter)."""
        self._check(name)
        return {key: param.detach().clone() for _, key, param in self._lora_params(name)}

    def load_adapter_state(self, name: str, state: dict[str, torch.Tensor]) -> None:
        """Copy tensors from ``adapter_state`` output into adapter ``name``.

        Raises:
            ValueError: the keys do not match the adapter's tensors exactly.
        """
        self._check(name)
        params = {key: param for _, key, param in self._lora_params(name)}
        if set(params) != set(state):
            missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
            raise ValueError(f"adapter {name!r} state mismatch: missing {missing[:3]}, unexpected {extra[:3]}")
        with torch.no_grad():
            for key, param in params.items():
                param.copy_(state[key])

    # ------------------------------------------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        mask_pos: torch.Tensor,
        adapter_names: list[str] | None = None,
    ) -> torch.Tensor:
        """Hidden state ``[B, H]`` at ``mask_pos`` (the final layer, after the final norm for LLaMA).

        Args:
            input_ids: ``[B, T]`` token ids.
            attention_mask: ``[B, T]``, 1 on real tokens.
            mask_pos: ``[B]`` index of the mask token per row.
            adapter_names: one adapter name per row for mixed-batch inference (peft's ``adapter_names``); None
                uses the active adapter. peft 0.21 refuses it in training mode ("Cannot pass `adapter_names`
                when the model is in training mode"), so call it under ``eval()``, normally with ``no_grad``.

        Raises:
            ValueError: ``adapter_names`` in training mode or of the wrong length.
        """
        if adapter_names is not None:
            if self.training or self.model.training:
                raise ValueError("per-sample adapter_names works only in eval mode (peft); call encoder.eval()")
            if len(adapter_names) != input_ids.shape[0]:
                raise ValueError(f"adapter_names has {len(adapter_names)} entries for a batch of {input_ids.shape[0]}")
            for name in set(adapter_names):
                self._check(name)
        return _at_mask(self._last_hidden(input_ids, attention_mask, adapter_names), mask_pos)

    def _last_hidden(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, adapter_names: list[str] | None = None
    ) -> torch.Tensor:
        """The model's last hidden state ``[B, T, H]`` (per-row adapters when named)."""
        kwargs: dict[str, object] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.is_decoder:
            kwargs["use_cache"] = False  # a KV cache is useless for one forward pass
        if adapter_names is not None:
            kwargs["adapter_names"] = list(adapter_names)
        return self.model(**kwargs).last_hidden_state

    # ------------------------------------------------------------------------------------------ frozen backbone
    def num_layers(self) -> int:
        """Transformer layers of the backbone."""
        return len(self._layer_list())

    def _layer_list(self) -> torch.nn.ModuleList:
        """The backbone's stack of transformer layers (BERT ``encoder.layer``, LLaMA ``layers``).

        It is the one ModuleList as long as ``config.num_hidden_layers``.
        """
        base = self.model.get_base_model()
        n = int(base.config.num_hidden_layers)
        for module in base.modules():
            if isinstance(module, torch.nn.ModuleList) and len(module) == n:
                return module
        raise ValueError(f"no stack of {n} layers found in {type(base).__name__}")

    @contextlib.contextmanager
    def _first_layers(self, layers: int | None) -> Iterator[None]:
        """Run only the first ``layers`` transformer layers inside the block (all of them with None)."""
        if layers is None:
            yield
            return
        stack = self._layer_list()
        if not 1 <= layers <= len(stack):
            raise ValueError(f"layers must be in 1..{len(stack)}, got {layers}")
        kept = list(stack)
        del stack[layers:]
        try:
            yield
        finally:
            stack.extend(kept[layers:])

    def backbone_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        mask_pos: torch.Tensor,
        layers: int | None = None,
        pooling: str = "mask",
    ) -> torch.Tensor:
        """Features ``[B, H]`` of the frozen backbone without any adapter, from its first ``layers`` layers only.

        The later layers are not computed. The features are the hidden state at ``mask_pos`` or the mean over real
        tokens; a LLaMA-style model applies its final norm to layer ``layers``'s output, as it does to the last.
        Why: a router's features need not come from the last layer; fewer layers make routing cheaper.
        """
        with self.model.disable_adapter(), self._first_layers(layers):
            hidden = self._last_hidden(input_ids, attention_mask)
        if pooling == "mean":
            weights = attention_mask.to(hidden.device, torch.float32).unsqueeze(-1)
            return (hidden.float() * weights).sum(1) / weights.sum(1).clamp_min(1)
        return _at_mask(hidden, mask_pos)


def _at_mask(hidden: torch.Tensor, mask_pos: torch.Tensor) -> torch.Tensor:
    """Each row's hidden state ``[B, H]`` at its mask position."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, mask_pos.to(hidden.device)]
