from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from conpet_lightning.data.markers import CANONICAL, markers_for
from conpet_lightning.data.records import MASK
from conpet_lightning.models import backbone as bb
from conpet_lightning.models.backbone import BACKBONES, LoadedBackbone, is_decoder_config, load_backbone

TEXT = "[unused0] Marie Curie [unused1] married [unused2] Pierre Curie [unused3] . In this sentence, x is the [MASK] ."


def test_unknown_name_and_dtype_raise() -> None:
    with pytest.raises(ValueError, match=re.escape(str(BACKBONES))):
        load_backbone("bert-large")
    with pytest.raises(ValueError, match="bfloat16"):
        load_backbone("tiny-bert", dtype="fp8")


@pytest.mark.parametrize("fixture", ["tiny_bert", "tiny_llama"])
def test_markers_are_single_tokens(fixture: str, request: pytest.FixtureRequest) -> None:
    backbone: LoadedBackbone = request.getfixturevalue(fixture)
    tok, markers = backbone.tokenizer, backbone.markers
    assert not markers.added_tokens  # both reuse existing ids: no embedding resize
    for canonical in CANONICAL:
        token = markers.tokens[canonical]
        assert tok(token, add_special_tokens=False)["input_ids"] == [markers.token_ids[canonical]]
    ids = tok(markers.apply(TEXT), add_special_tokens=False)["input_ids"]
    for canonical in CANONICAL:
        assert ids.count(markers.token_ids[canonical]) == 1
    assert markers.mask_token_id == markers.token_ids[MASK]
    assert len(set(markers.token_ids.values())) == 5


def test_marker_choice_per_tokenizer(tiny_bert: LoadedBackbone, tiny_llama: LoadedBackbone) -> None:
    # BERT: its own [MASK] (103) and [unused0..3] (ids 1-4) registered as specials.
    assert tiny_bert.markers.mask_token_id == 103
    assert tiny_bert.markers.marker_ids == (1, 2, 3, 4)
    assert tiny_bert.markers.apply(TEXT) == TEXT
    # SmolLM2: no mask token; spare special tokens 3-7, never bos/eos/pad/unk (0-2).
    assert tiny_llama.markers.marker_ids == (3, 4, 5, 6)
    assert tiny_llama.markers.mask_token_id == 7
    applied = tiny_llama.markers.apply(TEXT)
    assert "[unused" not in applied and "[MASK]" not in applied and "<gh_stars>" in applied


def test_decoder_without_spare_specials_adds_tokens() -> None:
    # A decoder-style mapping on a tokenizer with too few spare specials must add tokens and say so.
    tok = bb.AutoTokenizer.from_pretrained(bb.minilm_dir())
    tok.mask_token = None  # BERT then has one spare special ("[MASK]" itself) and needs 4 new tokens
    size = len(tok)
    markers = markers_for(tok, is_decoder=True)
    assert markers.added_tokens and len(tok) == size + 4
    for canonical in CANONICAL:
        assert tok(markers.tokens[canonical], add_special_tokens=False)["input_ids"] == [markers.token_ids[canonical]]


def test_tiny_models(tiny_bert: LoadedBackbone, tiny_llama: LoadedBackbone) -> None:
    assert type(tiny_bert.model).__name__ == "BertModel" and not tiny_bert.is_decoder
    assert type(tiny_llama.model).__name__ == "LlamaModel" and tiny_llama.is_decoder
    for b, vocab in ((tiny_bert, 30522), (tiny_llama, 49152)):
        cfg = b.model.config
        shape = (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size)
        assert shape == (64, 2, 4, 128)
        assert cfg.vocab_size == vocab == len(b.tokenizer)
        assert not any(p.requires_grad for p in b.model.parameters())
        assert not b.model.training
    assert tiny_llama.model.config.num_key_value_heads == 2
    assert tiny_llama.tokenizer.pad_token_id == 2  # <|im_end|>, SmolLM2's own pad


def test_tiny_init_is_deterministic_and_leaves_rng_alone(tiny_bert: LoadedBackbone) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    again = load_backbone("tiny-bert")
    assert torch.equal(torch.rand(3), expected)  # the global RNG stream was not consumed
    for p, q in zip(again.model.parameters(), tiny_bert.model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_forward_shapes(tiny_bert: LoadedBackbone, tiny_llama: LoadedBackbone) -> None:
    ids = torch.randint(5, 1000, (2, 12))
    for b in (tiny_bert, tiny_llama):
        with torch.no_grad():
            out = b.model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        assert out.shape == (2, 12, 64)


def test_real_minilm_loads_offline() -> None:
    b = load_backbone("minilm")
    cfg = b.model.config
    assert type(b.model).__name__ == "BertModel" and not b.is_decoder
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (384, 6, 30522)
    assert b.markers.mask_token_id == 103 and b.markers.marker_ids == (1, 2, 3, 4)


def test_local_path_and_dtype(tiny_bert: LoadedBackbone, tiny_llama: LoadedBackbone, tmp_path: Path) -> None:
    for b, decoder in ((tiny_bert, False), (tiny_llama, True)):
        folder = tmp_path / b.name
        b.model.save_pretrained(folder)
        b.tokenizer.save_pretrained(folder)
        loaded = load_backbone("custom", path=str(folder), dtype="bfloat16")
        assert loaded.is_decoder is decoder and loaded.name == "custom"
        assert next(loaded.model.parameters()).dtype == torch.bfloat16
        assert loaded.markers.token_ids == b.markers.token_ids


def test_is_decoder_config() -> None:
    assert is_decoder_config(bb.LlamaConfig())
    assert not is_decoder_config(bb.BertConfig())
    assert is_decoder_config(bb.BertConfig(is_decoder=True))


def test_cache_dir_default_and_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CONPET_CACHE", str(tmp_path))
    assert bb.default_cache_dir() == tmp_path / "smollm2"
    monkeypatch.delenv("CONPET_CACHE")
    root = Path(__file__).resolve().parents[1]
    assert bb.default_cache_dir() == root / ".cache" / "conpet_lightning" / "smollm2"


def test_atomic_write_leaves_nothing_on_failure(tmp_path: Path) -> None:
    def broken(folder: Path) -> None:
        (folder / "half.bin").write_bytes(b"x")
        raise KeyboardInterrupt  # a killed first load

    with pytest.raises(KeyboardInterrupt):
        bb._write_atomically(tmp_path / "model", broken)
    assert list(tmp_path.iterdir()) == []
    bb._write_atomically(tmp_path / "model", lambda f: (f / "ok.txt").write_text("ok"))
    bb._write_atomically(tmp_path / "model", lambda f: (f / "other.txt").write_text("lost race"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert [p.name for p in (tmp_path / "model").iterdir()] == ["ok.txt"]


def _gguf_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every load that reads the GGUF file (a conversion); a cached load reads none."""
    calls: list[str] = []
    for cls in (bb.AutoTokenizer, bb.AutoModel):
        real = cls.from_pretrained

        def spy(*args: object, _real: object = real, _name: str = cls.__name__, **kwargs: object) -> object:
            if kwargs.get("gguf_file"):
                calls.append(_name)
            return _real(*args, **kwargs)  # type: ignore[operator]

        monkeypatch.setattr(cls, "from_pretrained", spy)
    return calls


def test_tokenizer_cache_second_load_reads_no_gguf(
    tmp_path: Path, tiny_llama: LoadedBackbone, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads = _gguf_reads(monkeypatch)
    load_backbone("tiny-llama", cache_dir=tmp_path)  # converts the GGUF tokenizer (about 3 s)
    assert reads == ["AutoTokenizer"]
    assert (tmp_path / "tokenizer" / "tokenizer.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer"]  # no temporary folder left behind
    again = load_backbone("tiny-llama", cache_dir=tmp_path)
    assert reads == ["AutoTokenizer"]  # the second load came from the cache
    sample = "[unused0] Paris [unused1] is big . In this sentence, Paris is a [MASK] ."
    for b in (again, tiny_llama):
        assert (
            b.tokenizer(b.markers.apply(sample))["input_ids"]
            == tiny_llama.tokenizer(tiny_llama.markers.apply(sample))["input_ids"]
        )


@pytest.mark.slow
def test_real_smollm2_converts_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reads = _gguf_reads(monkeypatch)
    first = load_backbone("smollm2", cache_dir=tmp_path)  # GGUF de-quantisation, about 15 s
    converted = list(reads)
    assert "AutoModel" in converted
    second = load_backbone("smollm2", cache_dir=tmp_path)
    assert reads == converted  # the second load read no GGUF
    cfg = second.model.config
    assert type(second.model).__name__ == "LlamaModel" and second.is_decoder
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.vocab_size) == (576, 30, 3, 49152)
    assert second.markers.marker_ids == (3, 4, 5, 6) and second.markers.mask_token_id == 7
    gguf = bb.smollm2_gguf()
    direct = bb.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)  # the cache tokenizes the same
    sample = second.markers.apply(TEXT) + " 1895 naïve <|im_end|>"
    assert second.tokenizer(sample)["input_ids"] == direct(sample)["input_ids"]
    ids = torch.tensor([second.tokenizer("The capital of France is")["input_ids"]])
    with torch.no_grad():
        a = first.model(input_ids=ids).last_hidden_state
        b = second.model(input_ids=ids).last_hidden_state
    assert torch.equal(a, b)
