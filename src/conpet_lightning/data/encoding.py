"""Encode one canonical record text into token ids with the mask position, truncating without losing a marker.

The text is split at ``TEMPLATE_START`` into the marked sentence and the cloze template. When the pair is longer
than ``max_len``, the template is kept whole and the sentence is re-windowed around the marked span(s): one
window holding every marker if it fits, else one window per entity (ConPET's entity-aware truncation). Only a
template that would take more than half of the budget is itself shortened, by cutting the entity names in it.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from conpet_lightning.data.records import HEAD_END, HEAD_START, MASK, TAIL_END, TAIL_START, TEMPLATE_START

if TYPE_CHECKING:
    from conpet_lightning.data.markers import MarkerMap

#: Below this ``max_len`` no template plus marked span can be kept intact.
MIN_MAX_LEN = 16
_SPECIALS: weakref.WeakKeyDictionary[Any, tuple[list[int], list[int]]] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Encoded:
    """Token ids of one example (with the model's special tokens) and the index of the mask token in them."""

    input_ids: list[int]
    mask_pos: int


def split_template(text: str) -> tuple[str, str]:
    """Split a canonical text into (sentence, template); the template starts with ``TEMPLATE_START``.

    The split is taken after the last entity marker, so a sentence that itself contains the phrase is not cut.

    Raises:
        ValueError: no template, or a template without exactly one ``[MASK]``.
    """
    after = max(text.rfind(m) for m in (HEAD_START, HEAD_END, TAIL_START, TAIL_END))
    cut = text.find(TEMPLATE_START, max(after, 0))
    if cut < 0:
        raise ValueError(f"no template ({TEMPLATE_START.strip()!r}) after the markers in record text: {text[:120]!r}")
    sentence, template = text[:cut], text[cut:]
    if template.count(MASK) != 1 or MASK in sentence:
        raise ValueError(f"the template must hold the only {MASK} of the record text: {text[:120]!r}")
    return sentence, template


def template_too_long(text: str, limit: int = 50) -> bool:
    """ConPET's training filter: the template part has more than ``limit`` whitespace tokens (long entity names)."""
    return len(split_template(text)[1].split()) > limit


def encode(text: str, tokenizer: Any, markers: MarkerMap, max_len: int) -> Encoded:
    """Tokenize a canonical record text for ``tokenizer``, at most ``max_len`` ids, keeping markers and mask.

    The model's own special tokens are added (BERT: ``[CLS] ... [SEP]``; SmolLM2: none). ``mask_pos`` counts
    from the first id, so specials appended at the end never move it.

    Raises:
        ValueError: ``max_len`` below ``MIN_MAX_LEN``, or a text without a proper template.
    """
    if max_len < MIN_MAX_LEN:
        raise ValueError(f"max_len={max_len} is too small to keep a template and the marked spans (min {MIN_MAX_LEN})")
    sentence, template = split_template(text)
    prefix, suffix = _special_tokens(tokenizer)
    budget = max_len - len(prefix) - len(suffix)
    sent_ids = _tokenize(tokenizer, markers.apply(sentence))
    tmpl_ids = _tokenize(tokenizer, markers.apply(template))
    if len(sent_ids) + len(tmpl_ids) > budget:
        # The template is kept whole unless the sentence could then not keep half of the budget.
        tmpl_cap = budget - min(len(sent_ids), budget // 2)
        if len(tmpl_ids) > tmpl_cap:
            tmpl_ids = _shorten_template(sentence, template, tokenizer, markers, tmpl_cap)
        sent_ids = window_sentence(sent_ids, markers.marker_ids, budget - len(tmpl_ids))
    ids = [*prefix, *sent_ids, *tmpl_ids, *suffix]
    positions = [i for i, t in enumerate(ids) if t == markers.mask_token_id]
    if len(positions) != 1:
        raise ValueError(f"expected one mask id {markers.mask_token_id} after encoding, found {len(positions)}")
    return Encoded(input_ids=ids, mask_pos=positions[0])


def _tokenize(tokenizer: Any, text: str) -> list[int]:
    """Ids of ``text`` without special tokens (no length warning: truncation is ours)."""
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _special_tokens(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a text by default, found by probing once per tokenizer."""
    if tokenizer in _SPECIALS:
        return _SPECIALS[tokenizer]
    bare = _tokenize(tokenizer, "a")
    full = list(tokenizer("a", verbose=False)["input_ids"])
    start = next((i for i in range(len(full) - len(bare) + 1) if full[i : i + len(bare)] == bare), None)
    if start is None:
        raise ValueError(f"cannot locate the text among the special tokens of {type(tokenizer).__name__}: {full}")
    result = (full[:start], full[start + len(bare) :])
    _SPECIALS[tokenizer] = result
    return result


def _spans(ids: list[int], marker_ids: tuple[int, ...]) -> list[tuple[int, int]]:
    """Inclusive (start, end) token spans of the head and tail markers present in ``ids``, in text order."""
    first = {m: ids.index(m) for m in marker_ids if m in ids}
    spans = []
    for start_id, end_id in (marker_ids[:2], marker_ids[2:]):
        if start_id in first and end_id in first:
            spans.append((min(first[start_id], first[end_id]), max(first[start_id], first[end_id])))
        elif start_id in first or end_id in first:  # a lone marker: keep it as a span of one token
            pos = first.get(start_id, first.get(end_id, 0))
            spans.append((pos, pos))
    return sorted(spans)


def _window(lo: int, hi: int, size: int, left: int, right: int) -> tuple[int, int]:
    """A window [a, b) of ``size`` tokens around [lo, hi], centred and clamped to [left, right)."""
    size = min(size, right - left)
    start = max(left, lo - (size - (hi - lo + 1)) // 2)
    start = min(start, right - size)
    return start, start + size


def _compress(ids: list[int], lo: int, hi: int, keep: set[int], size: int) -> list[int]:
    """Span [lo, hi] squeezed to ``size`` ids: every id in ``keep`` stays, then the ids nearest to one of them."""
    must = [i for i in range(lo, hi + 1) if ids[i] in keep]
    rest = [i for i in range(lo, hi + 1) if ids[i] not in keep]
    rest.sort(key=lambda i: (min(abs(i - m) for m in must), i))
    chosen = sorted(must + rest[: max(0, size - len(must))])
    return [ids[i] for i in chosen]


def window_sentence(ids: list[int], marker_ids: tuple[int, ...], size: int) -> list[int]:
    """Cut a marked sentence to ``size`` ids without dropping a marker.

    One window around all markers if they fit; else (two disjoint spans) one window per span, each span's text
    cut in the middle if even the span is too long; overlapping spans are squeezed as one.
    """
    if len(ids) <= size:
        return ids
    keep = set(marker_ids)
    spans = _spans(ids, marker_ids)
    if not spans:
        return ids[:size]
    lo, hi = spans[0][0], spans[-1][1]
    if hi - lo + 1 <= size:
        a, b = _window(lo, hi, size, 0, len(ids))
        return ids[a:b]
    if len(spans) == 1 or spans[0][1] >= spans[1][0]:
        return _compress(ids, lo, hi, keep, size)
    (lo1, hi1), (lo2, hi2) = spans
    len1, len2 = hi1 - lo1 + 1, hi2 - lo2 + 1
    middle = (hi1 + lo2 + 1) // 2  # the windows never cross the middle of the gap, so they never overlap
    if len1 + len2 <= size:  # both spans fit: share the spare context evenly, within each window's side
        size1 = len1 + (size - len1 - len2) // 2
        size1 = max(min(size1, middle), size - (len(ids) - middle))
    else:  # the spans themselves are too long: split the budget in proportion, each keeps its 2 markers
        size1 = min(max(2, size * len1 // (len1 + len2)), size - 2)
    parts = []
    for (s_lo, s_hi), budget, left, right in ((spans[0], size1, 0, middle), (spans[1], size - size1, middle, len(ids))):
        if s_hi - s_lo + 1 > budget:
            parts.append(_compress(ids, s_lo, s_hi, keep, budget))
        else:
            a, b = _window(s_lo, s_hi, budget, left, right)
            parts.append(ids[a:b])
    return parts[0] + parts[1]


def _entity_texts(sentence: str) -> list[str]:
    """The marked entity strings of a canonical sentence (head, then tail if present)."""
    out = []
    for start, end in ((HEAD_START, HEAD_END), (TAIL_START, TAIL_END)):
        a, b = sentence.find(start), sentence.find(end)
        if 0 <= a < b:
            entity = sentence[a + len(start) : b].strip()
            if entity:
                out.append(entity)
    return out


def _shorten_template(sentence: str, template: str, tokenizer: Any, markers: MarkerMap, cap: int) -> list[int]:
    """Template ids of at most ``cap`` tokens: halve the longest entity name in it until it fits, else cut."""
    skip = len(TEMPLATE_START)  # entity names come after the fixed opening words
    shown = {e: e for e in _entity_texts(sentence) if e in template[skip:]}
    ids = _tokenize(tokenizer, markers.apply(template))
    while len(ids) > cap and shown and max(len(v.split()) for v in shown.values()) > 1:
        longest = max(shown, key=lambda e: len(shown[e].split()))
        words = shown[longest].split()
        short = " ".join(words[: len(words) // 2])
        template = template[:skip] + template[skip:].replace(shown[longest], short, 1)
        shown[longest] = short
        ids = _tokenize(tokenizer, markers.apply(template))
    if len(ids) <= cap:
        return ids
    # Fixed template words alone are too long: keep a window of ids that holds the mask, from the start if it can.
    pos = ids.index(markers.mask_token_id)
    start = 0 if pos < cap else pos - cap + 2 if pos + 1 < len(ids) else pos - cap + 1
    return ids[start : start + cap]
