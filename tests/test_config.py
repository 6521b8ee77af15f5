"""The one config model: example files validate, flags override, secrets are refused."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from gleaner.config import GleanerConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_configs_validate(path: Path) -> None:
    config = load_config(path)
    assert isinstance(config, GleanerConfig)


def test_cli_overrides_win_over_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("rate:\n  endpoint:\n    model: from-file\n  resources:\n    batch_size: 7\n")
    config = load_config(path, {"rate.endpoint.model": "from-flag",
                                "rate.resources.batch_size": None})
    assert config.rate.endpoint.model == "from-flag"
    assert config.rate.resources.batch_size == 7  # None means "flag not given"


def test_unknown_keys_are_errors_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text("rate:\n  treshold: 4\n")
    with pytest.raises(ValueError, match=r"(?s)typo\.yaml.*rate\.treshold"):
        load_config(path)


def test_credentials_in_store_options_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "leak.yaml"
    path.write_text("store:\n  url: s3://b/p\n  options:\n    secret: hunter2\n")
    with pytest.raises(ValueError) as error:
        load_config(path)
    assert "hunter2" not in str(error.value)
    assert "AWS_SECRET_ACCESS_KEY" in str(error.value)


def test_api_key_comes_from_the_named_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_config(None, {"rate.endpoint.api_key_env": "MY_RATER_KEY"})
    monkeypatch.setenv("MY_RATER_KEY", "sk-test-123")
    assert config.rate.endpoint.api_key() == "sk-test-123"
    assert "sk-test-123" not in config.model_dump_json()


DOCS = [ROOT / "README.md", ROOT / "infra" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FILE_SUFFIXES = {"yaml", "yml", "py", "md", "json", "jsonl", "toml", "txt", "parquet"}
DOTTED_KEY = re.compile(r"`([a-z_]+(?:\.[a-z_<>]+)+)(?:\s*[:=][^`]*)?`")


def config_key_exists(dotted: str) -> bool:
    """A dotted key of the schema; a dict-valued field (overrides, options, prices) ends the
    walk, so ``prices.<model>`` and ``finetune.overrides.max_steps`` count as real."""
    from pydantic import BaseModel

    node: type[BaseModel] | None = GleanerConfig
    for part in dotted.split("."):
        if node is None:
            return True
        field = node.model_fields.get(part)
        if field is None:
            return False
        annotation = field.annotation
        node = annotation if isinstance(annotation, type) and issubclass(
            annotation, BaseModel) else None
    return True


def test_every_config_key_the_docs_name_exists() -> None:
    sections = set(GleanerConfig.model_fields)
    named: dict[str, set[str]] = {}
    for doc in DOCS:
        for key in DOTTED_KEY.findall(doc.read_text(encoding="utf-8")):
            if key.split(".")[0] in sections and key.rsplit(".", 1)[1] not in FILE_SUFFIXES:
                named.setdefault(key, set()).add(doc.relative_to(ROOT).as_posix())
    assert len(named) > 30  # the docs do name keys: the pattern finds them
    missing = {key: sorted(docs) for key, docs in named.items() if not config_key_exists(key)}
    assert not missing
    from gleaner.config import RENAMED_KEYS

    deprecated = {key: sorted(docs) for key, docs in named.items() if key in RENAMED_KEYS}
    assert not deprecated  # the docs name the new keys only


# A value for each renamed key that is not an integer (by its new leaf name).
SAMPLES = {"endpoint": {"base_url": "http://127.0.0.1:9/v1", "model": "m-3"},
           "grammar": True, "cache": False, "do_sample": True, "temperature": 0.3,
           "test_sets_dir": "/data/test-sets", "resources": {"batch_size": 3},
           "temperatures": {"writing": 0.3}}


@pytest.mark.parametrize("old", sorted(__import__("gleaner.config").config.RENAMED_KEYS))
def test_a_renamed_key_loads_the_same_settings_and_warns(old: str, tmp_path: Path) -> None:
    """Each old key of the rename table still works, with a warning naming its new key, and
    `gleaner config upgrade --write` rewrites a file to the new key."""
    from typer.testing import CliRunner

    from gleaner.config import RENAMED_KEYS, load_config
    from gleaner.flows.cli import app

    new = RENAMED_KEYS[old]

    def nested(dotted: str, value: object) -> dict:
        for part in reversed(dotted.split(".")):
            value = {part: value}
        return value  # type: ignore[return-value]

    def read(config: GleanerConfig, dotted: str) -> object:
        node: object = config
        for part in dotted.split("."):
            node = getattr(node, part)
        return node.model_dump(exclude_defaults=True) if hasattr(node, "model_dump") else node

    value = SAMPLES.get(new.rsplit(".", 1)[1], 3)  # a value the key takes (most: an integer)
    if new.endswith("max_failed_share"):
        value = 0.25
    with pytest.warns(FutureWarning, match=re.escape(f"{old} is now {new}")):
        via_old = GleanerConfig.model_validate(nested(old, value))
    assert read(via_old, new) == value == read(GleanerConfig.model_validate(nested(new, value)),
                                               new)
    with pytest.warns(FutureWarning, match=re.escape(f"{old} is now {new}")):
        flagged = GleanerConfig().with_overrides({old: value})  # a CLI flag or parameter
    assert read(flagged, new) == value
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(nested(old, value)))
    result = CliRunner().invoke(app, ["config", "upgrade", str(path), "--write"])
    assert result.exit_code == 0, result.output
    assert read(load_config(path), new) == value
    document: object = yaml.safe_load(path.read_text())
    for part in old.split("."):  # the old key is gone from the file
        document = document.get(part) if isinstance(document, dict) else None
    assert document is None


def test_the_config_reference_is_made_from_the_schema_and_up_to_date() -> None:
    """docs/config.md is what `python -m gleaner.config_docs` writes today: every key with
    its type, default and a meaning (none blank)."""
    from gleaner.config_docs import render

    text = render()
    assert (ROOT / "docs" / "config.md").read_text(encoding="utf-8") == text, (
        "docs/config.md is stale: python -m gleaner.config_docs > docs/config.md")
    keys = re.findall(r"^\| `([a-z_.]+)` \| `[^`]+` \| `[^`]*` \| (.*) \|$", text, re.M)
    assert len(keys) > 400 and all(meaning.strip() for _, meaning in keys)
    assert all(config_key_exists(key) for key, _ in keys)
    assert "evaluate.generation.backend" in dict(keys)


def test_config_upgrade_keeps_comments_and_upgrades_deployment_configs(tmp_path: Path) -> None:
    """`gleaner config upgrade --write` renames keys in place, comments kept, and in a
    prefect.yaml it upgrades the config each deployment carries in its parameters."""
    from typer.testing import CliRunner

    from gleaner.flows.cli import app

    plain = tmp_path / "gleaner.yaml"
    plain.write_text("select:\n  budget: 9   # how many to keep\n")
    deployments = tmp_path / "prefect.yaml"
    deployments.write_text(
        "name: gleaner\n"
        "deployments:\n"
        "- name: nightly  # the refresh\n"
        "  parameters:\n"
        "    config:\n"
        "      evaluate:\n"
        "        judge: {model: gpt-4o}\n"
        "- name: by-path\n"
        "  parameters: {config: examples/openai.yaml}\n")
    for path in (plain, deployments):
        result = CliRunner().invoke(app, ["config", "upgrade", str(path), "--write"])
        assert result.exit_code == 0, result.output
    assert re.fullmatch(r"select:\n  size: 9 +# how many to keep\n", plain.read_text())
    upgraded = deployments.read_text()
    assert "# the refresh" in upgraded and "endpoint: {model: gpt-4o}" in upgraded
    assert "judge" not in upgraded and "config: examples/openai.yaml" in upgraded
