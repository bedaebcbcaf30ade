"""Job config: TOML plus flags, validated once, errors that name the field."""

import os

import pytest

from loupe.schemas.config import DEFAULT_MODEL, JobConfig, load_config
from loupe.schemas.errors import UserError


def test_defaults_use_a_real_model_id():
    config = load_config(input="in/", output="out/")
    assert config.model == DEFAULT_MODEL
    assert "/" in config.model and not config.model.startswith(("/", "."))


def test_flags_override_toml(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text('input = "a/"\noutput = "b/"\nbatch-size = 4\nmax_new_tokens = 10\n')
    config = load_config(job, batch_size=16, max_new_tokens=None)
    # INPUT is kept as the place it names (relative paths from the working directory).
    assert (config.input, config.batch_size, config.max_new_tokens) == (os.path.abspath("a"), 16, 10)


@pytest.mark.parametrize(
    ("toml", "flags", "message"),
    [
        ("colour = 1\n", {}, "unknown option 'colour'"),
        ("", {"batch_size": 0}, "invalid option 'batch_size'"),
        ("", {"max_new_tokens": 4, "min_new_tokens": 8}, "invalid option 'min_new_tokens'"),
        ("", {"endpoint_url": "localhost:9000"}, "invalid option 'endpoint_url'"),
        ("batch_size = 'many'\n", {}, "invalid option 'batch_size'"),
        ("input = \n", {}, "not valid TOML"),
    ],
)
def test_bad_fields_are_named(tmp_path, toml, flags, message):
    job = tmp_path / "job.toml"
    job.write_text(toml)
    with pytest.raises(UserError, match=message) as info:
        load_config(job, **({"input": "a/", "output": "b/"} | flags))
    assert "\n" not in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.toml", input="a", output="b")


def test_plan_settings_exclude_speed_knobs():
    a = JobConfig(input="a", output="b", batch_size=2, replicas=1)
    b = JobConfig(input="a", output="b", batch_size=32, replicas=8)
    assert a.plan_settings() == b.plan_settings()
    assert a.plan_settings() != JobConfig(input="a", output="b", prompt="other").plan_settings()


def test_tasks_are_validated_and_canonical():
    assert load_config(input="a", output="b", tasks="moderate, caption").tasks == ("caption", "moderate")
    assert load_config(input="a", output="b").tasks == ("caption", "moderate", "embed", "hash")
    with pytest.raises(UserError, match="invalid option 'tasks': .*unknown task 'translate'"):
        load_config(input="a", output="b", tasks="caption,translate")


def test_taxonomy_file_feeds_the_plan(tmp_path):
    policy = tmp_path / "policy.toml"
    policy.write_text('[[category]]\nkey = "weapons"\ndefinition = "a gun or a knife"\nthreshold = 0.7\n')
    job = tmp_path / "job.toml"
    job.write_text(f'input = "a"\noutput = "b"\ntaxonomy = "{policy}"\n')
    config = load_config(job)
    assert config.taxonomy.keys == ("weapons",)
    settings = config.plan_settings()
    assert settings["taxonomy_sha256"] == config.taxonomy.content_hash()
    assert settings["taxonomy"] == [{"key": "weapons", "definition": "a gun or a knife", "threshold": 0.7}]
    assert settings["moderation_model"] == config.model
    policy.write_text('[[category]]\nkey = "weapons"\ndefinition = "a gun or a knife"\nthreshold = 0.6\n')
    assert load_config(job).plan_settings() != settings
    assert "taxonomy" not in load_config(job, tasks="caption").plan_settings()


def test_bad_taxonomy_file_is_one_line(tmp_path):
    policy = tmp_path / "policy.toml"
    policy.write_text('[[category]]\nkey = "weapons"\ndefinition = ""\n')
    with pytest.raises(UserError) as info:
        load_config(input="a", output="b", taxonomy=str(policy))
    assert "policy.toml" in str(info.value) and "\n" not in str(info.value)
