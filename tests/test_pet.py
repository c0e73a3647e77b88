from __future__ import annotations

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, LlamaConfig

from conpet_lightning.data.encoding import encode
from conpet_lightning.models.backbone import LoadedBackbone, load_backbone
from conpet_lightning.models.encoder import MaskEncoder
from conpet_lightning.models.pet import count_parameters, default_target_modules, make_lora_config

TEXTS = [
    "[unused0] Marie Curie [unused1] married [unused2] Pierre Curie [unused3] . In this sentence, "
    "Pierre Curie is the [MASK] of Marie Curie.",
    "[unused0] Paris [unused1] is the capital of France . In this sentence, Paris is a [MASK].",
    "Rain fell on [unused0] Oslo [unused1] all week . In this sentence, Oslo is a [MASK].",
    "[unused2] IBM [unused3] hired [unused0] Ann [unused1] . In this sentence, IBM is the [MASK] of Ann.",
]


def batch(b: LoadedBackbone, texts: list[str] = TEXTS) -> dict[str, torch.Tensor]:
    """Right-padded batch of encoded texts."""
    encs = [encode(t, b.tokenizer, b.markers, 64) for t in texts]
    width = max(len(e.input_ids) for e in encs)
    ids = torch.full((len(encs), width), b.tokenizer.pad_token_id)
    attn = torch.zeros_like(ids)
    for i, e in enumerate(encs):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        attn[i, : len(e.input_ids)] = 1
    return {"input_ids": ids, "attention_mask": attn, "mask_pos": torch.tensor([e.mask_pos for e in encs])}


def encoder(b: LoadedBackbone, first: str = "A") -> MaskEncoder:
    return MaskEncoder(b.copy(), make_lora_config(r=4, alpha=8, model=b.model), first_adapter=first)


def randomize(enc: MaskEncoder, name: str, seed: int) -> None:
    """Give an adapter non-zero weights (fresh LoRA has B = 0, i.e. no effect)."""
    gen = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=gen) * 0.5 for k, v in enc.adapter_state(name).items()}
    enc.load_adapter_state(name, state)


def lora_names(enc: MaskEncoder, adapter: str) -> set[str]:
    return {n for n, _ in enc.model.named_parameters() if f".{adapter}." in n and "lora_" in n}


def test_target_modules_and_config(tiny_bert: LoadedBackbone, tiny_llama: LoadedBackbone) -> None:
    assert default_target_modules(tiny_bert.model) == ["query", "key"]
    assert default_target_modules(tiny_llama.model) == ["q_proj", "k_proj"]
    with pytest.raises(ValueError, match="target_modules"):
        default_target_modules(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="target_modules"):
        make_lora_config()
    cfg = make_lora_config(target_modules=["q_proj"])
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, set(cfg.target_modules)) == (4, 1.0, 0.0, {"q_proj"})


def test_minilm_lora_count() -> None:
    minilm = load_backbone("minilm")
    total_before = count_parameters(minilm.model)[1]
    enc = MaskEncoder(minilm, make_lora_config(r=4, model=minilm.model))
    trainable, total = count_parameters(enc)
    assert trainable == 36_864  # 6 layers x (query, key) x (4*384 + 384*4)
    assert total == total_before + trainable


def test_llama7b_shape_on_meta_device() -> None:
    cfg = LlamaConfig(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, intermediate_size=11008, vocab_size=32000
    )
    with torch.device("meta"):
        causal = AutoModelForCausalLM.from_config(cfg)  # the published checkpoint, as the paper counts it
        base = AutoModel.from_config(cfg)  # what MaskEncoder wraps: no LM head
    assert count_parameters(causal)[1] == 6_738_415_616
    backbone = LoadedBackbone(model=base, tokenizer=None, markers=None, is_decoder=True, name="llama-7b")  # type: ignore[arg-type]
    enc = MaskEncoder(backbone, make_lora_config(r=4, model=base))
    trainable, total = count_parameters(enc)
    assert trainable == 2_097_152  # 32 layers x (q, k) x (4*4096 + 4096*4)
    assert total == 6_607_343_616 + trainable
    ratio = 6_738_415_616 / trainable
    assert ratio == pytest.approx(3213, rel=0.01)  # ConPET's ">3,000x"


@pytest.mark.parametrize("fixture", ["tiny_bert", "tiny_llama"])
def test_forward_reads_the_mask_position(fixture: str, request: pytest.FixtureRequest) -> None:
    b: LoadedBackbone = request.getfixturevalue(fixture)
    enc = encoder(b)
    x = batch(b)
    out = enc(x["input_ids"], x["attention_mask"], x["mask_pos"])
    assert out.shape == (4, 64)
    with torch.no_grad():  # fresh LoRA (B = 0) leaves the backbone's output unchanged
        hidden = b.model(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).last_hidden_state
    torch.testing.assert_close(out.detach(), hidden[torch.arange(4), x["mask_pos"]])
    with pytest.raises(ValueError, match="already wrapped"):
        MaskEncoder(LoadedBackbone(enc.model.base_model.model, b.tokenizer, b.markers, b.is_decoder, b.name),
                    make_lora_config(model=b.model))  # fmt: skip


def test_activate_and_freeze_keep_old_adapters_bit_identical(tiny_llama: LoadedBackbone) -> None:
    enc = encoder(tiny_llama)
    x = batch(tiny_llama)
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable == {f"model.{n}" for n in lora_names(enc, "A")} and len(trainable) == 8
    randomize(enc, "A", 0)
    enc.freeze_adapter("A")
    enc.add_adapter("B")
    enc.activate("B")
    assert enc.adapters == ["A", "B"] and enc.active_adapter == "B"
    # Only B: 2 layers x (q_proj 64->64, k_proj 64->32 for 2 KV heads of 16), r=4.
    assert count_parameters(enc)[0] == 2 * ((64 * 4 + 4 * 64) + (64 * 4 + 4 * 32))
    with pytest.raises(ValueError, match="frozen"):
        enc.activate("A")
    before_a, before_b = enc.adapter_state("A"), enc.adapter_state("B")
    opt = torch.optim.AdamW([p for p in enc.parameters() if p.requires_grad], lr=0.1, weight_decay=0.01)
    enc.train()
    loss = enc(x["input_ids"], x["attention_mask"], x["mask_pos"]).pow(2).mean()
    loss.backward()
    opt.step()
    after_a, after_b = enc.adapter_state("A"), enc.adapter_state("B")
    assert all(torch.equal(before_a[k], after_a[k]) for k in before_a)
    assert any(not torch.equal(before_b[k], after_b[k]) for k in before_b)
    enc.activate("A", trainable=False)  # inference with a frozen adapter is fine
    assert count_parameters(enc)[0] == 0


def test_add_adapter_init_from_copies(tiny_bert: LoadedBackbone) -> None:
    enc = encoder(tiny_bert)
    randomize(enc, "A", 1)
    enc.add_adapter("C", init_from="A")
    state_a, state_c = enc.adapter_state("A"), enc.adapter_state("C")
    assert state_a.keys() == state_c.keys() and all(torch.equal(state_a[k], state_c[k]) for k in state_a)
    assert enc.active_adapter == "A"  # adding does not switch
    randomize(enc, "C", 2)  # independent tensors, not aliases
    assert all(torch.equal(state_a[k], v) for k, v in enc.adapter_state("A").items())
    with pytest.raises(ValueError, match="unknown adapter"):
        enc.add_adapter("D", init_from="nope")
    with pytest.raises(ValueError, match="already exists"):
        enc.add_adapter("A")


@pytest.mark.parametrize("fixture", ["tiny_bert", "tiny_llama"])
def test_mixed_batch_equals_per_adapter_forwards(fixture: str, request: pytest.FixtureRequest) -> None:
    b: LoadedBackbone = request.getfixturevalue(fixture)
    enc = encoder(b, first="expert0")
    for i in (1, 10):  # "expert1" vs "expert10": names are matched exactly, never by prefix
        enc.add_adapter(f"expert{i}")
    for i, name in enumerate(enc.adapters):
        randomize(enc, name, 10 + i)
    x = batch(b)
    names = ["expert0", "expert10", "expert1", "expert10"]
    enc.eval()
    with torch.no_grad():
        mixed = enc(x["input_ids"], x["attention_mask"], x["mask_pos"], adapter_names=names)
        expected = torch.empty_like(mixed)
        for name in set(names):
            enc.activate(name, trainable=False)
            rows = enc(x["input_ids"], x["attention_mask"], x["mask_pos"])
            for i, n in enumerate(names):
                if n == name:
                    expected[i] = rows[i]
    torch.testing.assert_close(mixed, expected)
    assert not torch.allclose(expected[1], expected[2])  # the adapters really differ
    enc.train()
    with pytest.raises(ValueError, match="eval mode"):
        enc(x["input_ids"], x["attention_mask"], x["mask_pos"], adapter_names=names)
