"""Prompt lists and files: plain text (one prompt per line) or JSONL with per-line settings.

JSONL lines are objects with "prompt" (required) and optional "negative_prompt", "seed",
"cfg_scale", "num_images", "steps"; a missing field takes the run's value. Files are read
line by line (a file of any length is streamed, never loaded whole).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Sequence

JSONL_FIELDS = ("prompt", "negative_prompt", "seed", "cfg_scale", "num_images", "steps")
MAX_SEED = 2**32 - 1


class PromptFileError(ValueError):
    """A prompt list or file the sampler cannot use."""


class EmptyPromptListError(PromptFileError):
    """Nothing to sample."""


@dataclasses.dataclass(frozen=True)
class PromptDefaults:
    seed: int
    cfg_scale: float
    num_images: int
    steps: int
    negative_prompt: str = ""


@dataclasses.dataclass(frozen=True)
class PromptSpec:
    """One prompt and its settings. `index` counts prompts from 0 and names its files; the
    default seed is `defaults.seed + index`, so prompts differ in noise unless a seed is set."""

    index: int
    prompt: str
    negative_prompt: str
    seed: int
    cfg_scale: float
    num_images: int
    steps: int


def _is_jsonl(path: str) -> bool:
    if path.endswith(".jsonl"):
        return True
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                return line.lstrip().startswith("{")
    return False


def _typed(where, name, value, kind):
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise PromptFileError(f"{where}: {name!r} must be an integer, got {value!r}")
    if kind is float and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise PromptFileError(f"{where}: {name!r} must be a number, got {value!r}")
    if kind is str and not isinstance(value, str):
        raise PromptFileError(f"{where}: {name!r} must be a string, got {value!r}")
    return value


def check_settings(where: str, *, seed, cfg_scale, num_images, steps) -> None:
    if not 0 <= seed <= MAX_SEED:
        raise PromptFileError(f"{where}: seed must be in [0, {MAX_SEED}], got {seed}")
    if cfg_scale < 0:
        raise PromptFileError(f"{where}: cfg_scale must be >= 0, got {cfg_scale}")
    if num_images < 1:
        raise PromptFileError(f"{where}: num_images must be >= 1, got {num_images}")
    if steps < 1:
        raise PromptFileError(f"{where}: steps must be >= 1, got {steps}")


def _parse_jsonl_line(where: str, text: str, index: int, defaults: PromptDefaults) -> PromptSpec:
    try:
        entry = json.loads(text)
    except json.JSONDecodeError as error:
        raise PromptFileError(f"{where}: not valid JSON ({error.msg})") from None
    if not isinstance(entry, dict):
        raise PromptFileError(f"{where}: expected a JSON object, got {type(entry).__name__}")
    unknown = sorted(set(entry) - set(JSONL_FIELDS))
    if unknown:
        raise PromptFileError(f"{where}: unknown field(s) {unknown}; allowed: {JSONL_FIELDS}")
    if "prompt" not in entry:
        raise PromptFileError(f"{where}: missing 'prompt'")
    prompt = _typed(where, "prompt", entry["prompt"], str)
    spec = PromptSpec(
        index=index,
        prompt=prompt,
        negative_prompt=_typed(where, "negative_prompt",
                               entry.get("negative_prompt", defaults.negative_prompt), str),
        seed=_typed(where, "seed", entry.get("seed", defaults.seed + index), int),
        cfg_scale=float(_typed(where, "cfg_scale", entry.get("cfg_scale", defaults.cfg_scale),
                               float)),
        num_images=_typed(where, "num_images", entry.get("num_images", defaults.num_images), int),
        steps=_typed(where, "steps", entry.get("steps", defaults.steps), int),
    )
    check_settings(where, seed=spec.seed, cfg_scale=spec.cfg_scale,
                   num_images=spec.num_images, steps=spec.steps)
    return spec


def _plain(index: int, prompt: str, defaults: PromptDefaults) -> PromptSpec:
    return PromptSpec(index, prompt, defaults.negative_prompt, defaults.seed + index,
                      defaults.cfg_scale, defaults.num_images, defaults.steps)


def iter_prompt_specs(prompts: Sequence[str], prompts_file: str | None,
                      defaults: PromptDefaults) -> Iterator[PromptSpec]:
    """--prompt values first, then the file's non-blank lines, as PromptSpecs."""
    check_settings("sample settings", seed=defaults.seed, cfg_scale=defaults.cfg_scale,
                   num_images=defaults.num_images, steps=defaults.steps)
    index = 0
    for prompt in prompts or ():
        yield _plain(index, prompt, defaults)
        index += 1
    if not prompts_file:
        return
    jsonl = _is_jsonl(prompts_file)
    with open(prompts_file, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            text = line.strip()
            if not text:
                continue
            where = f"{prompts_file} line {line_number}"
            yield (_parse_jsonl_line(where, text, index, defaults) if jsonl
                   else _plain(index, text, defaults))
            index += 1


def scan_prompts(prompts: Sequence[str], prompts_file: str | None,
                 defaults: PromptDefaults) -> dict:
    """Validates everything before any compile: returns {"prompts": n, "images": m}; raises
    PromptFileError naming the file and line of the first bad entry."""
    if prompts_file and not os.path.isfile(prompts_file):
        raise PromptFileError(f"prompts file {prompts_file} does not exist")
    count = images = 0
    for spec in iter_prompt_specs(prompts, prompts_file, defaults):
        count += 1
        images += spec.num_images
    if not count:
        where = f" ({prompts_file} has no non-empty lines)" if prompts_file else ""
        raise EmptyPromptListError(f"no prompts to sample{where}: pass --prompt or --prompts_file")
    return {"prompts": count, "images": images}
