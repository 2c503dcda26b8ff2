"""load_recipe_data: recipe -> validated, filtered, tokenised, mixed train/eval datasets.

Reads top to bottom: check the recipe, then (unless cached) for each source read -> adapt ->
filter -> tokenise, split off eval rows, mix, and build the datasets with a report per source.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from align.data.cache import cache_key, default_cache_dir, load_or_prepare, tokenizer_fingerprint
from align.data.formats import FORMATS, RowError, conversational_prompt, other_columns, to_kind
from align.data.mix import mixture_counts, rng_for, split_eval, take
from align.data.readers import read_rows, source_stamp
from align.data.recipe import ON_ERROR, Recipe, SourceSpec, display_path, load_recipe
from align.data.report import FILTER_REASONS, RecipeData, SourceReport
from align.errors import DataError
from align.modeling.chat import encode, render, tokenize_conversation

log = logging.getLogger("align.data")
Row = dict[str, Any]


@dataclass
class _Limits:
    max_length: int | None  # the whole rendered row (sft conversation, prompt + each response)
    max_prompt_length: int | None  # the prompt rendered with the generation prompt


def tokenize_row(tokenizer: Any, kind: str, row: Row) -> dict[str, list[int]]:
    """The token columns of one canonical row, rendered with the run's chat template."""
    if kind == "sft":
        return tokenize_conversation(tokenizer, row["messages"])
    if kind == "preference":
        return {
            f"{side}_input_ids": encode(tokenizer, render(tokenizer, row["prompt"] + row[side], False))
            for side in ("chosen", "rejected")
        }
    return {"prompt_input_ids": encode(tokenizer, render(tokenizer, row["prompt"], True))}


def _too_long(tokenizer: Any, kind: str, row: Row, tokens: dict[str, list[int]], limits: _Limits) -> bool:
    if kind == "prompt":
        limit = limits.max_prompt_length or limits.max_length
        return limit is not None and len(tokens["prompt_input_ids"]) > limit
    if limits.max_length is not None and max(len(ids) for ids in tokens.values()) > limits.max_length:
        return True
    if kind == "preference" and limits.max_prompt_length is not None:
        prompt_ids = encode(tokenizer, render(tokenizer, row["prompt"], True))
        return len(prompt_ids) > limits.max_prompt_length
    return False


def _min(*values: int | None) -> int | None:
    present = [v for v in values if v is not None]
    return min(present) if present else None


def _process_source(
    spec: SourceSpec,
    role: str,
    kind: str,
    tokenizer: Any,
    limits: _Limits,
    on_error: str,
    seen: set[str] | None,
) -> tuple[list[Row], SourceReport]:
    """Read, adapt, filter and tokenise one source; every row that is not kept is counted."""
    report = SourceReport(name=spec.path, recipe=display_path(spec.recipe), format=spec.format, role=role)
    native, adapter = FORMATS[spec.format]
    options = {"pairs": spec.pairs} if spec.format in ("ranked", "ultrafeedback") else {}
    limits = _Limits(_min(limits.max_length, spec.max_length), _min(limits.max_prompt_length, spec.max_prompt_length))
    kept: list[Row] = []
    for where, raw in read_rows(spec):
        report.rows_read += 1
        try:
            if isinstance(raw, RowError):
                raise raw
            rows = [to_kind(r, native, kind) for r in adapter(raw, spec.columns, **options)]
            if kind == "prompt":
                source = {
                    "other_columns": other_columns(raw, spec.format, spec.columns),
                    "conversational": conversational_prompt(raw, spec.format, spec.columns),
                }
                rows = [{**r, **source} for r in rows]
        except RowError as e:
            if on_error == "raise" and e.reason not in FILTER_REASONS:
                field = f"field {e.field!r}: " if e.field else ""
                raise DataError(
                    f"{report.recipe}: source {spec.path!r} {where}: {field}{e.detail}".replace("\n", " ")
                ) from None
            report.drop(e.reason)
            continue
        for row in rows:
            if kind == "preference" and row["chosen"] == row["rejected"]:
                report.drop("chosen_equals_rejected")
                continue
            if seen is not None:
                # The same prompt is a duplicate whatever else its source row holds (an id, say).
                content = {k: v for k, v in row.items() if k not in ("other_columns", "conversational")}
                digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
                if digest in seen:
                    report.drop("duplicate")
                    continue
                seen.add(digest)
            tokens = tokenize_row(tokenizer, kind, row)
            if _too_long(tokenizer, kind, row, tokens, limits):
                report.drop("too_long")
                continue
            kept.append({**row, **tokens})
    report.rows_kept = len(kept)
    if not kept:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(report.dropped.items())) or "the source is empty"
        raise DataError(f"{report.recipe}: source {spec.path!r}: no rows left of {report.rows_read} read ({reasons})")
    return kept, report


def _fingerprint(train: list[Row], eval_rows: list[Row]) -> str:
    h = hashlib.sha256()
    for part in (train, eval_rows):
        for row in part:
            h.update(json.dumps(row, sort_keys=True).encode())
            h.update(b"\n")
        h.update(b"\x00")  # the train/eval boundary is part of the data
    return h.hexdigest()


def _prepare(recipe: Recipe, tokenizer: Any, seed: int, limits: _Limits, on_error: str) -> RecipeData:
    kind = recipe.kind
    seen: set[str] | None = set() if recipe.dedup else None
    train_parts, eval_rows, reports = [], [], []
    for i, spec in enumerate(recipe.sources):
        rows, report = _process_source(spec, "train", kind, tokenizer, limits, on_error, seen)
        train_part, eval_part = split_eval(rows, recipe.eval_fraction, rng_for(seed, "eval", i))
        train_parts.append(train_part)
        eval_rows += eval_part
        report.rows_eval = len(eval_part)
        reports.append(report)
    # Eval sources come after train sources, so with dedup on a row in both counts as a duplicate
    # in eval and the held-out set never overlaps training.
    for spec in recipe.eval_sources:
        rows, report = _process_source(spec, "eval", kind, tokenizer, limits, on_error, seen)
        eval_rows += rows
        report.rows_eval = len(rows)
        reports.append(report)

    counts = mixture_counts(
        [len(p) for p in train_parts],
        [s.weight for s in recipe.sources],
        [s.num_samples for s in recipe.sources],
        recipe.num_samples,
    )
    train: list[Row] = []
    for i, (part, count) in enumerate(zip(train_parts, counts, strict=True)):
        train += take(part, count, rng_for(seed, "mix", i))
        reports[i].rows_train = count
    rng_for(seed, "shuffle").shuffle(train)
    if not train:
        raise DataError(f"{display_path(recipe.path)}: the mixture has no training rows")

    data = RecipeData(
        train=datasets.Dataset.from_list(train),
        eval=datasets.Dataset.from_list(eval_rows) if eval_rows else None,
        reports=reports,
        fingerprint=_fingerprint(train, eval_rows),
    )
    return data


def load_recipe_data(
    recipe: str,
    kind: str,
    tokenizer: Any,
    *,
    seed: int = 0,
    max_length: int | None = None,
    on_error: str | None = None,
    cache_dir: str | None = None,
) -> RecipeData:
    """Load a data recipe (name or path) as canonical, tokenised rows of ``kind``.

    ``seed`` is used when the recipe sets none (a recipe's own seed keeps its split fixed across
    training seeds). ``max_length`` and the recipe's limits all apply: the smallest wins.
    ``on_error`` overrides the recipe's policy. The result is cached under ``cache_dir``.
    """
    spec = load_recipe(recipe)
    where = display_path(spec.path)
    if spec.kind != kind:
        raise DataError(f"{where}: recipe is of kind {spec.kind!r}, but this stage needs {kind!r} data")
    on_error = on_error or spec.on_error
    if on_error not in ON_ERROR:
        raise DataError(f"on_error must be one of {', '.join(ON_ERROR)} (got {on_error!r})")
    seed = spec.seed if spec.seed is not None else seed
    limits = _Limits(_min(max_length, spec.max_length), spec.max_prompt_length)

    key = cache_key(
        {
            "recipe": spec.content,
            "sources": [source_stamp(s) for s in spec.sources + spec.eval_sources],
            "kind": kind,
            "seed": seed,
            "limits": [limits.max_length, limits.max_prompt_length],
            "on_error": on_error,
            "tokenizer": tokenizer_fingerprint(tokenizer),
        }
    )
    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    data = load_or_prepare(
        folder / f"{spec.path.stem}-{kind}-{key}", lambda: _prepare(spec, tokenizer, seed, limits, on_error)
    )
    log.info("data recipe %s (%s):", where, kind)
    for report in data.reports:
        log.info("  %s", report.line())
    log.info("  %s", data.summary())
    return data
