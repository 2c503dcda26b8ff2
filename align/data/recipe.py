"""Recipe files: parse and check a data recipe YAML, following its ``include:`` list.

The schema is documented in data_recipes/README.md; every problem with a recipe itself (unknown
key, bad value, missing file to include) is a one-line DataError naming the recipe file, raised
before any data is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

import align
from align.data.formats import FORMATS, PAIRING, kinds_for
from align.errors import DataError

REPO_ROOT = Path(align.__file__).resolve().parent.parent
RECIPE_DIR = REPO_ROOT / "data_recipes"
KINDS = ("sft", "preference", "prompt")
ON_ERROR = ("raise", "skip")
RECIPE_KEYS = {
    "kind", "sources", "eval", "include", "seed", "on_error", "max_length",
    "max_prompt_length", "num_samples", "dedup", "description",
}  # fmt: skip
SOURCE_KEYS = {
    "path", "format", "split", "weight", "num_samples", "columns", "pairs", "name",
    "data_dir", "revision", "max_length", "max_prompt_length",
}  # fmt: skip
EVAL_KEYS = {"fraction", "sources"}


@dataclass
class SourceSpec:
    """One source of a recipe; ``recipe`` is the file that declared it (relative paths start there)."""

    path: str
    format: str
    recipe: Path
    split: str = "train"
    weight: float | None = None
    num_samples: int | None = None
    columns: dict[str, str] = field(default_factory=dict)
    pairs: str = "best_vs_rest"
    name: str | None = None
    data_dir: str | None = None
    revision: str | None = None
    max_length: int | None = None
    max_prompt_length: int | None = None


@dataclass
class Recipe:
    path: Path
    kind: str
    sources: list[SourceSpec]
    eval_sources: list[SourceSpec]
    eval_fraction: float = 0.0
    seed: int | None = None
    on_error: str = "raise"
    max_length: int | None = None
    max_prompt_length: int | None = None
    num_samples: int | None = None
    dedup: bool = True
    content: dict[str, Any] = field(default_factory=dict)  # the merged YAML, for the cache key


def display_path(path: Path) -> str:
    """The path as a user would type it: relative to the working directory when under it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def resolve_recipe_path(recipe: str) -> Path:
    """A recipe name (``demo_sft`` -> ``<repo>/data_recipes/demo_sft.yaml``) or a path to a .yaml."""
    candidate = Path(recipe).expanduser()
    if candidate.suffix in (".yaml", ".yml") or candidate.is_file():
        if not candidate.is_file():
            raise DataError(f"data recipe file not found: {recipe}")
        return candidate.resolve()
    named = RECIPE_DIR / f"{recipe}.yaml"
    if not named.is_file():
        known = sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))
        raise DataError(f"unknown data recipe {recipe!r}: no {display_path(named)} (known: {', '.join(known)})")
    return named


def load_recipe(recipe: str | Path) -> Recipe:
    path = resolve_recipe_path(str(recipe))
    merged = _load_merged(path, stack=())
    return _build(path, merged)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise DataError(f"{display_path(path)}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(content, dict):
        raise DataError(f"{display_path(path)}: a recipe must be a mapping of keys, got {type(content).__name__}")
    unknown = set(content) - RECIPE_KEYS
    if unknown:
        raise DataError(
            f"{display_path(path)}: unknown key {sorted(unknown)[0]!r} (known: {', '.join(sorted(RECIPE_KEYS))})"
        )
    return content


def _load_merged(path: Path, stack: tuple[Path, ...]) -> dict[str, Any]:
    """The recipe with its includes folded in: included settings are defaults, sources are appended.

    Each source remembers the file it came from (``_recipe``) so its relative path resolves there.
    """
    if path in stack:
        raise DataError(f"{display_path(path)}: include cycle ({' -> '.join(p.name for p in (*stack, path))})")
    content = _read_yaml(path)
    merged: dict[str, Any] = {"sources": [], "eval_sources": []}
    includes = content.get("include") or []
    includes = [includes] if isinstance(includes, str) else includes
    for name in includes:
        target = Path(name)
        if target.suffix in (".yaml", ".yml") and not target.is_absolute():
            target = path.parent / target  # a relative include path starts at the including recipe
        included = _load_merged(resolve_recipe_path(str(target)), (*stack, path))
        if "kind" in included and "kind" in content and included["kind"] != content["kind"]:
            raise DataError(
                f"{display_path(path)}: includes {name!r} of kind {included['kind']!r}, "
                f"but this recipe is of kind {content['kind']!r}"
            )
        for key, value in included.items():
            if key in ("sources", "eval_sources"):
                merged[key] += value
            else:
                merged[key] = value
    for key, value in content.items():
        if key == "sources":
            merged["sources"] += [_tag(s, path) for s in (value or [])]
        elif key == "eval":
            if not isinstance(value, dict) or set(value) - EVAL_KEYS:
                raise DataError(f"{display_path(path)}: 'eval' must be {{fraction: 0.1}} or {{sources: [...]}}")
            merged["eval_sources"] += [_tag(s, path) for s in (value.get("sources") or [])]
            if "fraction" in value:
                merged["eval_fraction"] = value["fraction"]
        elif key != "include":
            merged[key] = value
    return merged


def _tag(source: Any, path: Path) -> dict[str, Any]:
    if not isinstance(source, dict):
        raise DataError(f"{display_path(path)}: each source must be a mapping with 'path' and 'format'")
    return {**source, "_recipe": str(path)}


def _check(cond: bool, path: Path, message: str) -> None:
    if not cond:
        raise DataError(f"{display_path(path)}: {message}")


def _positive_int(value: Any, path: Path, name: str) -> int | None:
    _check(value is None or (isinstance(value, int) and value > 0), path, f"{name} must be a positive integer")
    return value


def _source(raw: dict[str, Any], kind: str, index: int, path: Path) -> SourceSpec:
    recipe = Path(raw.pop("_recipe"))
    label = f"source {index} ({raw.get('path', '?')!r})"
    unknown = set(raw) - SOURCE_KEYS
    _check(
        not unknown,
        recipe,
        f"{label}: unknown key {sorted(unknown)[0] if unknown else ''!r} (known: {', '.join(sorted(SOURCE_KEYS))})",
    )
    for key in ("path", "format"):
        _check(isinstance(raw.get(key), str) and raw[key], recipe, f"{label}: '{key}' is required")
    fmt = raw["format"]
    _check(
        fmt in FORMATS,
        recipe,
        f"source {raw['path']!r}: unknown format {fmt!r} (known: {', '.join(FORMATS)})",
    )
    native = FORMATS[fmt][0]
    _check(
        kind in kinds_for(native),
        recipe,
        f"source {raw['path']!r}: format {fmt!r} gives {native} rows, not {kind} rows",
    )
    weight, count = raw.get("weight"), raw.get("num_samples")
    _check(weight is None or count is None, recipe, f"{label}: give 'weight' or 'num_samples', not both")
    _check(
        weight is None or (isinstance(weight, int | float) and weight > 0),
        recipe,
        f"{label}: weight must be > 0",
    )
    _positive_int(count, recipe, f"{label}: num_samples")
    _check(raw.get("pairs", "best_vs_rest") in PAIRING, recipe, f"{label}: pairs must be one of {PAIRING}")
    columns = raw.get("columns") or {}
    _check(isinstance(columns, dict), recipe, f"{label}: columns must map canonical field -> column name")
    return SourceSpec(
        path=raw["path"],
        format=fmt,
        recipe=recipe,
        split=str(raw.get("split", "train")),
        weight=weight,
        num_samples=count,
        columns={str(k): str(v) for k, v in columns.items()},
        pairs=raw.get("pairs", "best_vs_rest"),
        name=raw.get("name"),
        data_dir=raw.get("data_dir"),
        revision=raw.get("revision"),
        max_length=_positive_int(raw.get("max_length"), recipe, f"{label}: max_length"),
        max_prompt_length=_positive_int(raw.get("max_prompt_length"), recipe, f"{label}: max_prompt_length"),
    )


def _build(path: Path, merged: dict[str, Any]) -> Recipe:
    kind = merged.get("kind")
    _check(kind in KINDS, path, f"'kind' must be one of {', '.join(KINDS)} (got {kind!r})")
    _check(bool(merged["sources"]), path, "no sources")
    fraction = merged.get("eval_fraction", 0.0)
    _check(isinstance(fraction, int | float) and 0 <= fraction < 1, path, "eval fraction must be in [0, 1)")
    _check(not (fraction and merged["eval_sources"]), path, "give an eval fraction or eval sources, not both")
    on_error = merged.get("on_error", "raise")
    _check(on_error in ON_ERROR, path, f"on_error must be one of {', '.join(ON_ERROR)}")
    seed = merged.get("seed")
    _check(seed is None or isinstance(seed, int), path, "seed must be an integer")
    content = {k: v for k, v in merged.items()}
    return Recipe(
        path=path,
        kind=kind,
        sources=[_source(dict(s), kind, i, path) for i, s in enumerate(merged["sources"])],
        eval_sources=[_source(dict(s), kind, i, path) for i, s in enumerate(merged["eval_sources"])],
        eval_fraction=float(fraction),
        seed=seed,
        on_error=on_error,
        max_length=_positive_int(merged.get("max_length"), path, "max_length"),
        max_prompt_length=_positive_int(merged.get("max_prompt_length"), path, "max_prompt_length"),
        num_samples=_positive_int(merged.get("num_samples"), path, "num_samples"),
        dedup=bool(merged.get("dedup", True)),
        content=content,
    )
