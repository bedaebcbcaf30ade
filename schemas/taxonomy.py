"""The moderation taxonomy: categories, their definitions and thresholds, declared once as data."""

from __future__ import annotations

import hashlib
import json
import math
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loupe.schemas.errors import UserError, one_line

# Keys become Parquet struct field names and SQL identifiers (`moderation.violence_gore`).
_KEY = re.compile(r"[a-z][a-z0-9_]*")
_MODES = ("replace", "extend")
_TOP_FIELDS = {"mode", "category"}
_CATEGORY_FIELDS = {"key", "definition", "threshold"}

# The question put to the model for every category, and the two answers it is scored on. They
# decide the scores as much as the definitions do, so they are part of the content hash. The
# shared instruction comes first so that it is encoded once per image, before the categories.
QUESTION = "Answer Yes or No. Does this image show {definition}?"
ANSWERS = ("Yes", "No")


@dataclass(frozen=True)
class Category:
    """One moderation category: the model is asked whether an image shows `definition`."""

    key: str
    definition: str
    threshold: float = 0.5


@dataclass(frozen=True)
class Taxonomy:
    """An ordered set of categories; the order is the order of the output struct's fields."""

    categories: tuple[Category, ...]

    def __post_init__(self) -> None:
        # Also for taxonomies built in code: keys become Parquet field names and dict keys.
        if not self.categories:
            raise UserError("a moderation taxonomy needs at least one category")
        seen: set[str] = set()
        for c in self.categories:
            if not isinstance(c.key, str) or not _KEY.fullmatch(c.key):
                raise UserError(f"category key {c.key!r} is not a valid identifier")
            if c.key in seen:
                raise UserError(f"duplicate category key {c.key!r}")
            if not 0.0 <= c.threshold <= 1.0:
                raise UserError(f"category {c.key!r} threshold {c.threshold!r} is outside [0, 1]")
            seen.add(c.key)

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(c.key for c in self.categories)

    def content_hash(self) -> str:
        """sha256 of the question, answers, keys, definitions and thresholds: equal hashes, equal scores."""
        canonical = json.dumps(
            [QUESTION, list(ANSWERS), [[c.key, c.definition, float(c.threshold)] for c in self.categories]],
            ensure_ascii=False,
            separators=(",", ":"),
        )
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def to_toml(self) -> str:
        """The taxonomy as a TOML file that load_taxonomy reads back unchanged."""
        lines = [
            "# Moderation categories. Each image gets P(Yes) for the question",
            '# "Does this image show <definition>?"; a score >= threshold flags the category.',
            '# mode = "replace" uses exactly these categories; "extend" adds them to the defaults',
            "# (a category with a default's key replaces that default).",
            'mode = "replace"',
        ]
        for c in self.categories:
            lines += [
                "",
                "[[category]]",
                f"key = {_toml_string(c.key)}",
                f"definition = {_toml_string(c.definition)}",
                f"threshold = {float(c.threshold)!r}",
            ]
        return "\n".join(lines) + "\n"


def _toml_string(value: str) -> str:
    # A JSON string is a valid TOML basic string for everything json escapes (\", \\, \n, \uXXXX).
    return json.dumps(value, ensure_ascii=False)


# Short on purpose: every definition's tokens are run once per image, so they are the
# per-category cost. Each reads as the end of "Does this image show ...?".
DEFAULT_TAXONOMY = Taxonomy(
    (
        Category("sexual_explicit", "sexually explicit content"),
        Category("nudity_suggestive", "nudity or sexually suggestive content"),
        Category("violence_gore", "violence, blood or gore"),
        Category("hate_symbols", "hate symbols or extremist propaganda"),
        Category("self_harm", "self-harm or suicide"),
        Category("weapons_dangerous", "weapons or dangerous objects"),
        Category("drugs_alcohol_tobacco", "drugs, alcohol or tobacco"),
        Category("criminal_activity", "criminal activity"),
        Category("animal_cruelty", "cruelty to animals"),
        Category("disaster_suffering", "a disaster or human suffering"),
    )
)


def load_taxonomy(path: str | Path) -> Taxonomy:
    """Read a taxonomy TOML file; any mistake is a one-line UserError naming the file."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"taxonomy file {path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"taxonomy file {path} is a directory") from None
    except UnicodeDecodeError:
        raise UserError(f"taxonomy file {path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"taxonomy file {path} is not valid TOML: {one_line(exc)}") from None

    def refuse(problem: str) -> UserError:
        return UserError(f"{problem} (in taxonomy file {path})")

    unknown = sorted(set(data) - _TOP_FIELDS)
    if unknown:
        raise refuse(f"unknown field {unknown[0]!r}; expected mode and [[category]] tables")
    mode = data.get("mode", "replace")
    if mode not in _MODES:
        raise refuse(f"mode must be one of {', '.join(map(repr, _MODES))}, not {mode!r}")
    tables = data.get("category", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise refuse("category must be a list of [[category]] tables")

    categories = [_category(table, number, refuse) for number, table in enumerate(tables, start=1)]
    seen: set[str] = set()
    for c in categories:
        if c.key in seen:
            raise refuse(f"duplicate category key {c.key!r}")
        seen.add(c.key)

    if mode == "extend":
        overrides = {c.key: c for c in categories}
        merged = [overrides.pop(c.key, c) for c in DEFAULT_TAXONOMY.categories]
        categories = merged + list(overrides.values())
    if not categories:
        raise refuse("no categories; add at least one [[category]] table")
    return Taxonomy(tuple(categories))


def _category(table: dict[str, Any], number: int, refuse) -> Category:
    where = f"category #{number}"
    unknown = sorted(set(table) - _CATEGORY_FIELDS)
    if unknown:
        raise refuse(f"unknown field {unknown[0]!r} in {where}; expected key, definition, threshold")
    if "key" not in table:
        raise refuse(f"{where} has no key")
    key = table["key"]
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise refuse(
            f"{where} key {key!r} is not a valid identifier (lowercase letters, digits and _, starting with a letter)"
        )
    where = f"category {key!r}"
    definition = table.get("definition")
    if definition is None:
        raise refuse(f"{where} has no definition")
    if not isinstance(definition, str):
        raise refuse(f"{where} definition {definition!r} is not a string")
    if not definition.strip():
        raise refuse(f"{where} has an empty definition")
    threshold = table.get("threshold", 0.5)
    # bool is an int in Python, but `threshold = true` is a mistake, not 1.0.
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold):
        raise refuse(f"{where} threshold {threshold!r} is not a number")
    if not 0.0 <= threshold <= 1.0:
        raise refuse(f"{where} threshold {threshold!r} is outside [0, 1]")
    # A definition is asked about as "Does this image show <definition>?": stray whitespace
    # would only cost tokens, and a newline would break the one-line question.
    return Category(key, " ".join(definition.split()), float(threshold))
