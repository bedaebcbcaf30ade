"""Moderation taxonomy: the defaults, TOML replace/extend, round trip, content hash, and every refusal."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest

from loupe.schemas.errors import UserError
from loupe.schemas.taxonomy import DEFAULT_TAXONOMY, Category, Taxonomy, load_taxonomy

DEFAULT_KEYS = (
    "sexual_explicit",
    "nudity_suggestive",
    "violence_gore",
    "hate_symbols",
    "self_harm",
    "weapons_dangerous",
    "drugs_alcohol_tobacco",
    "criminal_activity",
    "animal_cruelty",
    "disaster_suffering",
)


def _write(tmp_path, text: str, name: str = "taxonomy.toml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults():
    assert DEFAULT_TAXONOMY.keys == DEFAULT_KEYS
    for category in DEFAULT_TAXONOMY.categories:
        assert category.threshold == 0.5
        # Short: each definition's tokens are run once per image and category.
        assert "\n" not in category.definition and len(category.definition.split()) <= 6
    assert len({c.definition for c in DEFAULT_TAXONOMY.categories}) == len(DEFAULT_KEYS)
    hash(DEFAULT_TAXONOMY)  # frozen: usable as a cache key and in a frozen config


def test_replace_is_the_default_mode(tmp_path):
    path = _write(
        tmp_path,
        """
[[category]]
key = "violence_gore"
definition = "blood or gore"
threshold = 0.3

[[category]]
key = "spam"
definition = "an advertisement"
""",
    )
    assert load_taxonomy(path) == Taxonomy(
        (Category("violence_gore", "blood or gore", 0.3), Category("spam", "an advertisement", 0.5))
    )
    explicit = _write(tmp_path, 'mode = "replace"\n' + path.read_text(), "explicit.toml")
    assert load_taxonomy(explicit) == load_taxonomy(path)


def test_extend_adds_to_the_defaults_and_overrides_by_key(tmp_path):
    path = _write(
        tmp_path,
        """
mode = "extend"

[[category]]
key = "spam"
definition = "an advertisement"
threshold = 0.9

[[category]]
key = "self_harm"
definition = "self-injury"
threshold = 0.2
""",
    )
    taxonomy = load_taxonomy(str(path))
    assert taxonomy.keys == DEFAULT_KEYS + ("spam",)
    by_key = dict(zip(taxonomy.keys, taxonomy.categories, strict=True))
    assert by_key["self_harm"] == Category("self_harm", "self-injury", 0.2)
    assert by_key["spam"] == Category("spam", "an advertisement", 0.9)
    for default in DEFAULT_TAXONOMY.categories:
        if default.key != "self_harm":
            assert by_key[default.key] == default


def test_extend_with_no_categories_is_the_defaults(tmp_path):
    assert load_taxonomy(_write(tmp_path, 'mode = "extend"\n')) == DEFAULT_TAXONOMY


@pytest.mark.parametrize(
    "taxonomy",
    [
        DEFAULT_TAXONOMY,
        Taxonomy(
            (
                Category("quotes", 'a "quoted" word, a back\\slash and ünïcödé', 0.25),
                Category("edge", "anything", 1.0),
                Category("zero", "nothing", 0.0),
                Category("precise", "a threshold with many digits", 0.123456789012345),
            )
        ),
    ],
)
def test_to_toml_round_trips(tmp_path, taxonomy):
    loaded = load_taxonomy(_write(tmp_path, taxonomy.to_toml()))
    assert loaded == taxonomy
    assert loaded.content_hash() == taxonomy.content_hash()


def test_integer_thresholds_are_numbers(tmp_path):
    path = _write(tmp_path, '[[category]]\nkey = "a"\ndefinition = "x"\nthreshold = 1\n')
    assert load_taxonomy(path).categories[0].threshold == 1.0


def test_content_hash_is_stable_and_changes_with_every_field():
    digest = DEFAULT_TAXONOMY.content_hash()
    assert len(digest) == 64 and int(digest, 16) >= 0
    rebuilt = Taxonomy(tuple(Category(c.key, c.definition, c.threshold) for c in DEFAULT_TAXONOMY.categories))
    assert rebuilt.content_hash() == digest

    first = DEFAULT_TAXONOMY.categories[0]
    rest = DEFAULT_TAXONOMY.categories[1:]
    variants = [
        Taxonomy((replace(first, key="other"), *rest)),
        Taxonomy((replace(first, definition=first.definition + "!"), *rest)),
        Taxonomy((replace(first, threshold=0.51), *rest)),
        Taxonomy((*rest, first)),  # order: the struct's field order
        Taxonomy(rest),
    ]
    digests = {v.content_hash() for v in variants}
    assert digest not in digests and len(digests) == len(variants)


def test_content_hash_covers_the_question_and_answers(monkeypatch):
    # The question decides the scores as much as the definitions: a rewording is a new plan.
    import loupe.schemas.taxonomy as taxonomy

    digest = DEFAULT_TAXONOMY.content_hash()
    monkeypatch.setattr(taxonomy, "QUESTION", "Does this picture show {definition}? Yes or No.")
    reworded = DEFAULT_TAXONOMY.content_hash()
    monkeypatch.setattr(taxonomy, "ANSWERS", ("Yes.", "No."))
    assert len({digest, reworded, DEFAULT_TAXONOMY.content_hash()}) == 3


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('colour = "red"\n[[category]]\nkey = "a"\ndefinition = "x"\n', "unknown field 'colour'"),
        ('[[category]]\nkey = "a"\ndefinition = "x"\nweight = 2\n', "unknown field 'weight' in category #1"),
        ('[[category]]\nkey = "a"\ndefinition = "x"\nthreshold = 1.5\n', "threshold 1.5 is outside [0, 1]"),
        ('[[category]]\nkey = "a"\ndefinition = "x"\nthreshold = -0.1\n', "threshold -0.1 is outside [0, 1]"),
        ('[[category]]\nkey = "a"\ndefinition = "x"\nthreshold = "high"\n', "threshold 'high' is not a number"),
        ('[[category]]\nkey = "a"\ndefinition = "x"\nthreshold = true\n', "threshold True is not a number"),
        ('[[category]]\nkey = "a"\ndefinition = "x"\nthreshold = nan\n', "threshold nan is not a number"),
        (
            '[[category]]\nkey = "a"\ndefinition = "x"\n[[category]]\nkey = "a"\ndefinition = "y"\n',
            "duplicate category key 'a'",
        ),
        ('[[category]]\nkey = "a"\ndefinition = ""\n', "category 'a' has an empty definition"),
        ('[[category]]\nkey = "a"\ndefinition = "  \\n "\n', "category 'a' has an empty definition"),
        ('[[category]]\nkey = "a"\n', "category 'a' has no definition"),
        ('[[category]]\nkey = "a"\ndefinition = 3\n', "category 'a' definition 3 is not a string"),
        ('[[category]]\ndefinition = "x"\n', "category #1 has no key"),
        ('[[category]]\nkey = "Violence"\ndefinition = "x"\n', "key 'Violence' is not a valid identifier"),
        ('[[category]]\nkey = "1st"\ndefinition = "x"\n', "key '1st' is not a valid identifier"),
        ('[[category]]\nkey = "self-harm"\ndefinition = "x"\n', "key 'self-harm' is not a valid identifier"),
        ('[[category]]\nkey = "a b"\ndefinition = "x"\n', "key 'a b' is not a valid identifier"),
        ('[[category]]\nkey = ""\ndefinition = "x"\n', "key '' is not a valid identifier"),
        ('[[category]]\nkey = 7\ndefinition = "x"\n', "key 7 is not a valid identifier"),
        ("", "no categories"),
        ('mode = "replace"\n', "no categories"),
        ('mode = "merge"\n', "mode must be one of 'replace', 'extend', not 'merge'"),
        ('category = "violence"\n', "category must be a list of [[category]] tables"),
        ("[[category]\nkey = 1\n", "is not valid TOML"),
    ],
)
def test_refusals_are_one_line_naming_problem_and_file(tmp_path, text, problem):
    path = _write(tmp_path, text)
    with pytest.raises(UserError) as raised:
        load_taxonomy(path)
    message = str(raised.value)
    assert "\n" not in message
    assert problem in message
    assert str(path) in message


def test_missing_file_is_refused(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(UserError) as raised:
        load_taxonomy(path)
    message = str(raised.value)
    assert "\n" not in message and str(path) in message and "does not exist" in message


def test_definition_whitespace_is_folded_into_one_line(tmp_path):
    path = _write(tmp_path, '[[category]]\nkey = "a"\ndefinition = """\n  blood\n  or gore  """\n')
    assert load_taxonomy(path).categories[0].definition == "blood or gore"


@pytest.mark.parametrize(
    ("categories", "problem"),
    [
        ((), "at least one category"),
        ((Category("a", "x"), Category("a", "y")), "duplicate category key 'a'"),
        ((Category("Bad-Key", "x"),), "key 'Bad-Key' is not a valid identifier"),
        ((Category("a", "x", 2.0),), "threshold 2.0 is outside [0, 1]"),
    ],
)
def test_taxonomies_built_in_code_are_checked_too(categories, problem):
    with pytest.raises(UserError, match=re.escape(problem)):
        Taxonomy(categories)
