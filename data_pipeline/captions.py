"""Caption choice: which text of a sample trains the model, and why a sample has none.

A sample is the dict every source produces ({"__key__", "txt": bytes, "json": bytes, ...} for
tar shards and ArrayRecord records, {"caption": str | bytes} for TFDS). One caption is chosen at
random when a sample has several, from an rng the caller derives from the example's position,
so the choice is the same on a rerun and after a resume.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np

# Plain-text caption members, in the order they are tried (img2dataset writes "txt").
TEXT_MEMBERS = ("txt", "caption")

EMPTY_CAPTION_POLICIES = ("drop", "unconditional")

# Why a sample gave no caption; each becomes a counter ("skipped_<reason>" when dropped).
NO_CAPTION = "no_caption"
EMPTY_CAPTION = "empty_caption"
BAD_CAPTION = "bad_caption_bytes"


def _texts(value) -> list[str] | None:
    """Strings held by a caption field (one string or a list of them); None if not text."""
    if isinstance(value, bytes):
        value = value.decode("utf-8")  # UnicodeDecodeError is the caller's bad_caption_bytes
    if isinstance(value, str):
        return [value.strip()]
    if isinstance(value, list | tuple):
        return [item.strip() for item in value if isinstance(item, str)]
    return None


def caption_candidates(
    sample: dict, json_fields: Sequence[str], text_members: Sequence[str] = TEXT_MEMBERS
) -> tuple[list[str], str | None]:
    """(non-empty caption candidates, reason) where reason says why the list is empty.

    Text members are tried first, then the JSON member's fields; the first member that holds a
    non-empty caption wins. A present but empty caption is EMPTY_CAPTION; bytes that are not
    UTF-8 (in a text member, or JSON that does not parse) are BAD_CAPTION when nothing else
    holds a caption; no caption member at all is NO_CAPTION.
    """
    seen_empty = seen_bad = False
    for member in text_members:
        if member not in sample:
            continue
        try:
            texts = _texts(sample[member])
        except UnicodeDecodeError:
            seen_bad = True
            continue
        usable = [text for text in texts or () if text]
        if usable:
            return usable, None
        seen_empty = True
    if "json" in sample:
        try:
            metadata = json.loads(sample["json"])
        except (UnicodeDecodeError, ValueError):
            metadata, seen_bad = None, True
        if isinstance(metadata, dict):
            for field in json_fields:
                if field not in metadata:
                    continue
                texts = _texts(metadata[field])
                usable = [text for text in texts or () if text]
                if usable:
                    return usable, None
                seen_empty = True
    if seen_bad:
        return [], BAD_CAPTION
    return [], EMPTY_CAPTION if seen_empty else NO_CAPTION


def choose_caption(
    sample: dict, json_fields: Sequence[str], rng: np.random.Generator
) -> tuple[str | None, str | None]:
    """(caption, None), or (None, reason) when the sample holds no usable caption."""
    candidates, reason = caption_candidates(sample, json_fields)
    if not candidates:
        return None, reason
    if len(candidates) == 1:
        return candidates[0], None
    return candidates[int(rng.integers(len(candidates)))], None


def json_fields(caption_json_field: str) -> tuple[str, ...]:
    """The JSON fields read for a configured field name: it, then its plural list form."""
    plural = caption_json_field + "s"
    return (caption_json_field, plural) if not caption_json_field.endswith("s") else (
        caption_json_field,
    )
