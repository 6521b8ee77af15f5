"""Every published version holds a Hugging Face dataset card (README.md) and provenance.json;
`gleaner publish --to-hub` pushes a version (no Hub is reachable here: the offline parts).

The run is the viewer's small real run (real Alpaca records through the real ingest, real
selection; tests/support/viewer_run.py), with a person's exclusion and an approval recorded."""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from gleaner import layout
from gleaner.runs import decide_approval, record_run, request_approval
from gleaner.tasks.publish.card import PROVENANCE_FILE, README_FILE, scrub, size_category
from gleaner.tasks.publish.versions import publish_dataset_version
from gleaner.tasks.select.review import record_review
from gleaner.tasks.select.stage import select_examples
from tests.support.viewer_run import ViewerRun, build_viewer_run

ROOT = Path(__file__).resolve().parents[1]
CANARY = "sk-canary-0123456789abcdef"


@pytest.fixture(scope="module")
def run(tmp_path_factory, shared_data) -> ViewerRun:
    return build_viewer_run(tmp_path_factory.mktemp("card"), shared_data)


def version_folder(run: ViewerRun, manifest: dict) -> Path:
    return Path(manifest["path"]).parent


def test_size_categories_follow_the_hub_buckets() -> None:
    assert [size_category(n) for n in (0, 999, 1_000, 12_345, 999_999, 1_000_000)] == [
        "n<1K", "n<1K", "1K<n<10K", "10K<n<100K", "100K<n<1M", "1M<n<10M"]


def test_scrub_keeps_names_and_settings_and_drops_credentials() -> None:
    doc = {"endpoint": {"base_url": "https://u:pw@api.example/v1", "api_key_env": "X_KEY",
                        "api_key": "sk-1", "model": "m", "max_tokens": 5},
           "store": {"url": "s3://AKIA:secret@bucket/p", "options": {"endpoint_url": "e"}},
           "hf_token": "hf_x", "key": "abc", "prompt_tokens": 3}
    assert scrub(doc) == {"endpoint": {"base_url": "https://api.example/v1",
                                       "api_key_env": "X_KEY", "model": "m", "max_tokens": 5},
                          "store": {"url": "s3://bucket/p"}, "key": "abc", "prompt_tokens": 3}


def test_a_version_holds_a_card_and_provenance_with_the_exclusions_and_approval(
        run: ViewerRun, shared_data: Path) -> None:
    from huggingface_hub import DatasetCard

    manifest_rows = run.store.read_stage(run.run_id, layout.SELECT).to_pylist()
    target = next(r["id"] for r in manifest_rows if r["selected"])
    record_review(run.store, run.run_id, [target], "exclude", why="wrong answer", who="ana")
    select_examples(run.store, run.run_id, run.config)  # the next selection honours it
    request_approval(run.store, run.run_id, "publish")
    decide_approval(run.store, run.run_id, True, by="bo", note="looks right")
    curated = run.store.read_stage(run.run_id, layout.CURATED)
    manifest = publish_dataset_version(run.store, "card-test", run.run_id, curated)
    folder = version_folder(run, manifest)

    card = DatasetCard.load(folder / README_FILE, repo_type="dataset")
    data = card.data.to_dict()
    assert data["license"] == "unknown" and data["size_categories"] == ["n<1K"]
    assert data["task_categories"] == ["text-generation"]
    assert data["configs"] == [{"config_name": "default",
                                "data_files": [{"split": "train", "path": "data.parquet"}]}]
    assert "ana" in card.text and "wrong answer" in card.text and "bo" in card.text

    import datasets

    rows = datasets.load_dataset(str(folder), split="train")
    assert rows["id"] == curated["id"].to_pylist() and target not in rows["id"]

    prov = json.loads((folder / PROVENANCE_FILE).read_text())
    assert prov["dataset"]["label"] == "v0001" and prov["dataset"]["counts"]["examples"] == 12
    assert prov["data_file"]["sha256"] == hashlib.sha256(
        (folder / "data.parquet").read_bytes()).hexdigest()
    (source,) = prov["sources"]
    assert source["sha256"] == hashlib.sha256(Path(source["uri"]).read_bytes()).hexdigest()
    assert source["read"] == 43 and source["kept"] == 41
    (excluded,) = prov["exclusions"]
    assert (excluded["id"], excluded["who"], excluded["why"]) == (target, "ana", "wrong answer")
    assert prov["counts"]["select"]["excluded"] == 1 and prov["counts"]["ingest"]["read"] == 43
    assert prov["approval"]["state"] == "approved" and prov["approval"]["by"] == "bo"
    assert prov["steps"]["ingest"]["key"] and prov["steps"]["ingest"]["settings"]
    lock = prov["software"]["lock"]
    assert lock["of"] == "infra/lock/constraints.txt" and lock["sha256"] == hashlib.sha256(
        (ROOT / "infra/lock/constraints.txt").read_bytes()).hexdigest()
    assert prov["software"]["gleaner"]
    assert prov["rebuild"] is None  # made verb by verb, not by one curate command


def test_no_key_from_the_environment_or_store_options_reaches_the_card_or_provenance(
        run: ViewerRun, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CANARY_KEY", CANARY)
    monkeypatch.setenv("OPENAI_API_KEY", CANARY + "-openai")
    leaky = run.config.with_overrides({
        "rate.endpoint.api_key_env": "CANARY_KEY",
        "rate.endpoint.base_url": f"http://user:{CANARY}@127.0.0.1:9/v1",
        "store.options": {"client_kwargs": {"aws_secret_access_key": CANARY},
                          "endpoint_url": "http://127.0.0.1:9"},
        "publish.license": "cc-by-nc-4.0"})
    record_run(run.store, run.run_id, leaky, flow="curate", sources=["pool.json"])
    curated = run.store.read_stage(run.run_id, layout.CURATED)
    manifest = publish_dataset_version(run.store, "leak-test", run.run_id, curated,
                                       {"note": f"stats that echo {CANARY}"})
    folder = version_folder(run, manifest)
    for file in (README_FILE, PROVENANCE_FILE):
        text = (folder / file).read_text()
        assert CANARY not in text, file
    prov = json.loads((folder / PROVENANCE_FILE).read_text())
    config = prov["rebuild"]["config"]
    assert config["rate"]["endpoint"]["api_key_env"] == "CANARY_KEY"
    assert config["rate"]["endpoint"]["base_url"] == "http://127.0.0.1:9/v1"
    assert "options" not in config["store"] and prov["license"] == "cc-by-nc-4.0"
    assert "license: cc-by-nc-4.0" in (folder / README_FILE).read_text()


# ---- gleaner publish --to-hub (no Hub is reachable: what runs offline) -----------------------


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def published(run: ViewerRun) -> dict:
    curated = run.store.read_stage(run.run_id, layout.CURATED)
    return publish_dataset_version(run.store, "hub-test", run.run_id, curated)


def test_the_dataset_and_card_built_for_the_push(run: ViewerRun, published: dict) -> None:
    from huggingface_hub import DatasetCard

    from gleaner.tasks.publish.hub import hub_card, version_dataset
    from gleaner.tasks.publish.versions import find_version

    manifest = find_version(run.store, "hub-test", None)
    dataset = version_dataset(run.store, manifest)
    assert dataset.num_rows == published["counts"]["examples"]
    assert "instruction" in dataset.column_names
    card = DatasetCard(hub_card(run.store, manifest))
    assert card.data.configs[0]["data_files"] == [{"split": "train", "path": "data/train-*"}]


def test_publish_to_hub_fails_in_one_line_when_offline_or_unreachable(
        run: ViewerRun, published: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    from gleaner.flows.cli import app

    base = ["publish", "--store", run.url, "--name", "hub-test"]
    bad = CliRunner().invoke(app, [*base, "--to-hub", "no namespace!"])
    assert bad.exit_code == 2 and "is no Hub repo id" in bad.output
    missing = CliRunner().invoke(app, [*base, "--to-hub", "me/ds", "--version", "7"])
    assert missing.exit_code == 2 and "has no v0007" in missing.output

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = CliRunner().invoke(app, [*base, "--to-hub", "me/ds"])
    assert offline.exit_code == 1
    assert offline.output.count("\n") == 1 and "HF_HUB_OFFLINE is set" in offline.output

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    port = closed_port()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    refused = CliRunner().invoke(app, [*base, "--to-hub", "me/ds", "--private",
                                       "--token-env", "NO_SUCH_TOKEN"])
    assert refused.exit_code == 1, refused.output
    line = refused.output.strip()
    assert "\n" not in line and f"http://127.0.0.1:{port}" in line
    assert "hub-test v0001" in line and "refused" in line.lower()


def test_the_rebuild_config_is_a_loadable_config(run: ViewerRun) -> None:
    from gleaner.config import GleanerConfig
    from gleaner.tasks.publish.card import rebuild_command

    entry = rebuild_command(["/data/a.json"], run.config.model_dump(mode="json"))
    assert entry["command"][:3] == ["gleaner", "curate", "/data/a.json"]
    GleanerConfig.model_validate(yaml.safe_load(yaml.safe_dump(entry["config"])))


# ---- the recorded command rebuilds the selection ---------------------------------------------


@pytest.mark.slow
@pytest.mark.e2e  # two small curate runs (Prefect, Ray, MiniLM; a loopback OpenAI server)
def test_provenance_rebuilds_the_same_selection_from_the_same_store(
        prefect_api, ray_local, shared_data: Path, tmp_path: Path) -> None:
    from gleaner.flows.cli import app
    from tests.support.openai_server import OpenAIStub
    from tests.support.pipeline import pipeline_responder, write_config, write_sample

    sample = write_sample(tmp_path / "sample.json", 12)
    store = tmp_path / "store"
    with OpenAIStub(pipeline_responder) as stub:
        path = write_config(tmp_path / "config.yaml", str(store), stub.base_url, budget=5)
        first = CliRunner().invoke(app, ["curate", str(sample), "--config", str(path),
                                         "--run-id", "first", "--json"])
        assert first.exit_code == 0, first.output
        prov = json.loads((store / "datasets/curated/v0001" / PROVENANCE_FILE).read_text())
        rebuild = prov["rebuild"]
        config = tmp_path / "rebuild.yaml"
        config.write_text(yaml.safe_dump(rebuild["config"]))
        argv = [a.replace("{config}", str(config)).replace("{run_id}", "rebuilt")
                for a in rebuild["command"]]
        assert argv[:2] == ["gleaner", "curate"] and str(sample.resolve()) in argv
        second = CliRunner().invoke(app, [*argv[1:], "--json"])
        assert second.exit_code == 0, second.output

    versions = [json.loads((store / f"datasets/curated/v000{n}/manifest.json").read_text())
                for n in (1, 2)]
    assert [v["run_id"] for v in versions] == ["first", "rebuilt"]
    assert versions[0]["ids_sha256"] == versions[1]["ids_sha256"]
    assert versions[1]["diff"]["added"] == versions[1]["diff"]["removed"] == 0
    again = json.loads((store / "datasets/curated/v0002" / PROVENANCE_FILE).read_text())
    assert again["rebuild"]["config"] == rebuild["config"]
    assert again["steps"]["select"]["settings"]["select"] == \
        prov["steps"]["select"]["settings"]["select"]
    assert {s: p["key"] for s, p in again["stages"].items()} == \
        {s: p["key"] for s, p in prov["stages"].items()}
    assert again["counts"]["select"] == prov["counts"]["select"]
    assert again["sources"][0]["sha256"] == prov["sources"][0]["sha256"]
