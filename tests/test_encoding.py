from __future__ import annotations

import random

import pytest

from conpet_lightning.data.encoding import encode, split_template, template_too_long, window_sentence
from conpet_lightning.models.backbone import LoadedBackbone

RE_TEXT = (
    "[unused0] Marie Curie [unused1] married [unused2] Pierre Curie [unused3] in 1895 . "
    "In this sentence, Pierre Curie is the [MASK] of Marie Curie."
)
ET_TEXT = "[unused0] Paris [unused1] is the capital of France . In this sentence, Paris is a [MASK]."
FILLER = [f"word{i}" for i in range(400)]


def filler(a: int, b: int) -> str:
    return " ".join(FILLER[a:b])


def long_re(gap: int, before: int = 60, after: int = 60) -> str:
    """A relation record with `before` words, head, `gap` words, tail, `after` words."""
    return (
        f"{filler(0, before)} [unused0] Marie Curie [unused1] {filler(100, 100 + gap)} [unused2] Pierre Curie "
        f"[unused3] {filler(300, 300 + after)} . In this sentence, Pierre Curie is the [MASK] of Marie Curie."
    )


@pytest.fixture(params=["tiny_bert", "tiny_llama"])
def backbone(request: pytest.FixtureRequest) -> LoadedBackbone:
    return request.getfixturevalue(request.param)


def check(enc_ids: list[int], mask_pos: int, b: LoadedBackbone, max_len: int, markers: int = 4) -> None:
    """Length bound, one mask at mask_pos, every marker once and in order."""
    assert len(enc_ids) <= max_len
    assert enc_ids[mask_pos] == b.markers.mask_token_id
    assert enc_ids.count(b.markers.mask_token_id) == 1
    found = [i for i in enc_ids if i in b.markers.marker_ids]
    assert found == list(b.markers.marker_ids[:markers])


def test_short_text_equals_plain_tokenization(backbone: LoadedBackbone) -> None:
    b = backbone
    for text, n in ((RE_TEXT, 4), (ET_TEXT, 2)):
        enc = encode(text, b.tokenizer, b.markers, 128)
        assert enc.input_ids == b.tokenizer(b.markers.apply(text))["input_ids"]
        check(enc.input_ids, enc.mask_pos, b, 128, markers=n)


def test_specials_and_mask_position(tiny_bert: LoadedBackbone, tiny_llama: LoadedBackbone) -> None:
    enc = encode(ET_TEXT, tiny_bert.tokenizer, tiny_bert.markers, 64)
    assert enc.input_ids[0] == 101 and enc.input_ids[-1] == 102  # [CLS] ... [SEP]
    assert tiny_bert.tokenizer.convert_ids_to_tokens(enc.input_ids[enc.mask_pos - 1 : enc.mask_pos + 2]) == [
        "a",
        "[MASK]",
        ".",
    ]
    enc = encode(ET_TEXT, tiny_llama.tokenizer, tiny_llama.markers, 64)
    assert enc.input_ids[0] == tiny_llama.markers.marker_ids[0]  # SmolLM2 adds no BOS
    assert enc.input_ids[-1] != tiny_llama.tokenizer.eos_token_id
    assert enc.input_ids[enc.mask_pos] == 7


@pytest.mark.parametrize("max_len", [16, 20, 24, 32, 48, 64, 96, 128])
@pytest.mark.parametrize("gap", [3, 150])
def test_long_inputs_keep_markers_mask_and_template(backbone: LoadedBackbone, max_len: int, gap: int) -> None:
    b = backbone
    text = long_re(gap)
    enc = encode(text, b.tokenizer, b.markers, max_len)
    check(enc.input_ids, enc.mask_pos, b, max_len)
    assert len(enc.input_ids) == max_len  # the budget is used, not wasted
    _, template = split_template(text)
    tmpl_ids = b.tokenizer(b.markers.apply(template), add_special_tokens=False)["input_ids"]
    body = enc.input_ids[: len(enc.input_ids) - (1 if not b.is_decoder else 0)]
    if len(tmpl_ids) <= (max_len - 2) // 2:  # templates within half the budget are kept whole
        assert body[-len(tmpl_ids) :] == tmpl_ids


def test_one_window_when_all_markers_fit(backbone: LoadedBackbone) -> None:
    b = backbone
    text = long_re(gap=3)
    sentence, _ = split_template(text)
    sent_ids = b.tokenizer(b.markers.apply(sentence), add_special_tokens=False)["input_ids"]
    enc = encode(text, b.tokenizer, b.markers, 64)
    start = enc.input_ids.index(b.markers.marker_ids[0])
    first = sent_ids.index(b.markers.marker_ids[0])
    window = enc.input_ids[start - 5 : start + 15]
    assert window == sent_ids[first - 5 : first + 15]  # one contiguous slice around both spans
    assert enc.input_ids[start : start + 6] == sent_ids[first : first + 6]


def test_two_windows_when_entities_are_far_apart(backbone: LoadedBackbone) -> None:
    b = backbone
    text = long_re(gap=150)
    enc = encode(text, b.tokenizer, b.markers, 48)
    check(enc.input_ids, enc.mask_pos, b, 48)
    m0, m1, m2, m3 = (enc.input_ids.index(m) for m in b.markers.marker_ids)
    decoded = b.tokenizer.decode(enc.input_ids[m0 + 1 : m1]) + "|" + b.tokenizer.decode(enc.input_ids[m2 + 1 : m3])
    assert decoded.lower().replace(" ", "") == "mariecurie|pierrecurie"  # both entity texts survive whole
    # The gap words between the windows are mostly gone: 150 gap words cannot fit in 48 ids.
    assert m2 - m1 < 25


def test_entity_typing_and_text_classification(backbone: LoadedBackbone) -> None:
    b = backbone
    et = f"{filler(0, 200)} [unused0] Paris [unused1] {filler(200, 400)} . In this sentence, Paris is a [MASK]."
    enc = encode(et, b.tokenizer, b.markers, 32)
    check(enc.input_ids, enc.mask_pos, b, 32, markers=2)
    plain = f"{filler(0, 300)} . In this sentence, the topic is [MASK]."
    enc = encode(plain, b.tokenizer, b.markers, 32)
    assert len(enc.input_ids) == 32 and enc.input_ids[enc.mask_pos] == b.markers.mask_token_id


def test_long_template_is_shortened_keeping_the_mask(backbone: LoadedBackbone) -> None:
    b = backbone
    entity = filler(0, 60)
    text = f"[unused0] {entity} [unused1] is here . In this sentence, {entity} is a [MASK]."
    assert template_too_long(text)
    for max_len in (16, 24, 32, 64):
        enc = encode(text, b.tokenizer, b.markers, max_len)
        check(enc.input_ids, enc.mask_pos, b, max_len, markers=2)
        decoded = b.tokenizer.decode(enc.input_ids)
        assert decoded.count("word0") >= 2  # the entity's first word, in the sentence and in the template
        if max_len >= 24:  # the template's fixed words survive; at 16 only the words around the mask do
            assert decoded.lower().count("in this sentence") == 1


def test_template_filter_counts_whitespace_tokens() -> None:
    head = "[unused0] A [unused1] x ."
    fifty = " In this sentence, " + " ".join(["w"] * 44) + " is a [MASK]."  # 3 + 44 + 3 = 50 tokens
    assert len(fifty.split()) == 50
    assert not template_too_long(head + fifty)
    assert template_too_long(head + fifty.replace("w ", "w w ", 1))
    assert template_too_long(head + fifty, limit=49)
    assert not template_too_long(RE_TEXT)


def test_bad_inputs_raise(tiny_bert: LoadedBackbone) -> None:
    with pytest.raises(ValueError, match="max_len"):
        encode(RE_TEXT, tiny_bert.tokenizer, tiny_bert.markers, 15)
    with pytest.raises(ValueError, match="template"):
        encode("[unused0] A [unused1] no template [MASK]", tiny_bert.tokenizer, tiny_bert.markers, 64)
    with pytest.raises(ValueError, match="MASK"):
        split_template("A . In this sentence, it is a thing.")


def test_split_ignores_the_phrase_inside_the_sentence() -> None:
    text = "He said In this sentence, [unused0] x [unused1] . In this sentence, x is a [MASK]."
    sentence, template = split_template(text)
    assert template == " In this sentence, x is a [MASK]."
    assert sentence.endswith(" .")


def test_window_sentence_keeps_markers_on_random_layouts() -> None:
    rng = random.Random(0)
    markers = (1, 2, 3, 4)
    for _ in range(300):
        n = rng.randint(10, 120)
        body = [rng.randint(10, 99) for _ in range(n)]
        slots = sorted(rng.sample(range(n + 4), 4))
        order = [1, 2, 3, 4] if rng.random() < 0.7 else [1, 3, 2, 4]  # also overlapping/nested spans
        ids = body[:]
        for pos, m in zip(slots, order, strict=True):
            ids.insert(pos, m)
        size = rng.randint(6, 60)
        out = window_sentence(ids, markers, size)
        assert len(out) == min(size, len(ids))
        assert [i for i in out if i in markers] == order
        # the output is a subsequence of the input
        it = iter(ids)
        assert all(any(x == y for y in it) for x in out)
