"""Map ConPET's canonical markers (``[unused0..3]``, ``[MASK]``) to single tokens of a given tokenizer.

Records keep one canonical text (see ``data/records.py``); every tokenizer gets its own mapping here, so a marker
or the mask is always exactly one token id and the mask position can be found by id.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from conpet_lightning.data.records import HEAD_END, HEAD_START, MASK, TAIL_END, TAIL_START

#: Canonical entity markers in stored order (head start/end, tail start/end).
MARKERS: tuple[str, ...] = (HEAD_START, HEAD_END, TAIL_START, TAIL_END)
#: Every canonical string that ``MarkerMap.apply`` rewrites.
CANONICAL: tuple[str, ...] = (*MARKERS, MASK)
_CANONICAL_RE = re.compile("|".join(re.escape(s) for s in CANONICAL))


@dataclass(frozen=True)
class MarkerMap:
    """How one tokenizer spells the canonical markers and the mask.

    Attributes:
        tokens: canonical string -> the tokenizer's token string (one token each).
        mask_token_id: id of the token that stands for ``[MASK]``; the representation is read there.
        token_ids: canonical string -> token id (markers and mask).
        added_tokens: True if new tokens had to be added to the tokenizer, so the model's embeddings must be
            resized (``model.resize_token_embeddings(len(tokenizer))``) before use.
    """

    tokens: dict[str, str]
    mask_token_id: int
    token_ids: dict[str, int] = field(default_factory=dict)
    added_tokens: bool = False

    def apply(self, text: str) -> str:
        """Replace every canonical marker and ``[MASK]`` in ``text`` by this tokenizer's tokens (one pass)."""
        return _CANONICAL_RE.sub(lambda m: self.tokens[m.group(0)], text)

    @property
    def marker_ids(self) -> tuple[int, ...]:
        """Ids of the four entity markers, in canonical order."""
        return tuple(self.token_ids[m] for m in MARKERS)


def _single_id(tokenizer: Any, token: str) -> int | None:
    """The id of ``token`` if the tokenizer encodes it as exactly one id, else None."""
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    return int(ids[0]) if len(ids) == 1 else None


def _spare_special_tokens(tokenizer: Any) -> list[str]:
    """Registered special tokens that play no role (not bos/eos/pad/unk/cls/sep/mask), in id order.

    SmolLM2 has 14 such tokens (ids 3-16: ``<repo_name>``, ``<reponame>``, ...). Reusing them needs no new
    embedding rows, which matters because the backbone is frozen: a new row would stay random.
    """
    reserved = {
        getattr(tokenizer, f"{role}_token_id", None) for role in ("bos", "eos", "pad", "unk", "cls", "sep", "mask")
    }
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return [
        str(tok.content if hasattr(tok, "content") else tok)
        for idx, tok in sorted(decoder.items())
        if getattr(tok, "special", True) and idx not in reserved
    ]


def markers_for(tokenizer: Any, is_decoder: bool) -> MarkerMap:
    """Choose (and if needed register) single-token markers and a mask token for ``tokenizer``.

    Encoders use their own mask token and register ``[unused0..3]`` as additional special tokens (BERT has them
    in its vocabulary, so this adds no rows; without registration they split into ``[``, ``unused``, ...).
    Decoders without a mask token reuse spare special tokens for the four markers and the mask; only if there
    are fewer than five spare ones are new tokens added (``added_tokens`` then tells the caller to resize).
    The tokenizer is modified in place.

    Raises:
        ValueError: an encoder without a mask token, or a marker that does not encode as one token.
    """
    size_before = len(tokenizer)
    tokens: dict[str, str] = {}
    if not is_decoder or tokenizer.mask_token is not None:
        if tokenizer.mask_token is None:
            raise ValueError(f"encoder tokenizer {type(tokenizer).__name__} has no mask token; cannot build a cloze")
        tokens[MASK] = str(tokenizer.mask_token)
        tokens.update({m: m for m in MARKERS})
        tokenizer.add_special_tokens({"additional_special_tokens": list(MARKERS)})
    else:
        spare = _spare_special_tokens(tokenizer)
        if len(spare) < len(CANONICAL):
            new = [f"<conpet_{i}>" for i in range(len(CANONICAL) - len(spare))]
            tokenizer.add_special_tokens({"additional_special_tokens": new})
            spare = spare + new
        tokens = dict(zip(CANONICAL, spare[: len(CANONICAL)], strict=True))
    token_ids: dict[str, int] = {}
    for canonical, token in tokens.items():
        idx = _single_id(tokenizer, token)
        if idx is None:
            raise ValueError(f"marker {canonical} -> {token!r} is not a single token for {type(tokenizer).__name__}")
        token_ids[canonical] = idx
    if len(set(token_ids.values())) != len(token_ids):
        raise ValueError(f"markers and mask must have distinct ids, got {token_ids}")
    return MarkerMap(
        tokens=tokens, mask_token_id=token_ids[MASK], token_ids=token_ids, added_tokens=len(tokenizer) > size_before
    )
