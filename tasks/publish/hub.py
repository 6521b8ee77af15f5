"""A published version to the Hugging Face Hub: its rows with ``datasets``' push_to_hub, then
its card (README.md) and provenance.json with huggingface_hub.

The rows are read with ``datasets`` as the Hub will read them: a local store's version folder
through ``load_dataset(<folder>)`` (the card's ``configs``), a remote store's data file as an
Arrow table. push_to_hub writes ``data/train-*.parquet``, so the card that goes up names that
file pattern; everything else is the version's own card. The Hub endpoint is ``HF_ENDPOINT``
(read when pushing); ``HF_HUB_OFFLINE`` stops before anything is sent. Whatever stops the push
(offline, no route, refused, no permission) is one :class:`HubUnavailable` line.
"""

from __future__ import annotations

import os
import posixpath
from typing import Any

from gleaner.store import Store
from gleaner.tasks.publish.card import PROVENANCE_FILE, README_FILE
from gleaner.tasks.publish.versions import find_version

HUB_DATA_FILES = "data/train-*"  # where push_to_hub puts a single train split


class HubUnavailable(RuntimeError):
    """The Hub cannot take the push: the message names the endpoint and the cause."""


def version_dataset(store: Store, manifest: dict[str, Any]) -> Any:
    """The version's rows as a ``datasets.Dataset`` (what push_to_hub sends)."""
    import datasets

    folder = posixpath.dirname(manifest["path"])
    protocols = store.fs.protocol
    if "file" in ((protocols,) if isinstance(protocols, str) else protocols):
        return datasets.load_dataset(folder, split="train")
    from gleaner.tasks.publish.versions import read_version

    return datasets.Dataset(read_version(store, manifest["name"], manifest["version"]))


def hub_card(store: Store, manifest: dict[str, Any]) -> str:
    """The version's card with its ``configs`` naming the files push_to_hub writes."""
    from huggingface_hub import DatasetCard

    folder = posixpath.dirname(manifest["path"])
    card = DatasetCard(store.read_bytes(posixpath.join(folder, README_FILE)).decode("utf-8"))
    card.data.configs = [{"config_name": "default",
                          "data_files": [{"split": "train", "path": HUB_DATA_FILES}]}]
    return str(card)


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def hub_offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return flag in ("1", "true", "yes", "on") or bool(constants.HF_HUB_OFFLINE)


def check_repo_id(repo_id: str) -> str:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"--to-hub {repo_id!r} is no Hub repo id: {error}") from None
    if "/" not in repo_id:
        raise ValueError(f"--to-hub {repo_id!r}: name the namespace too (user/{repo_id} or "
                         f"org/{repo_id})")
    return repo_id


def _cause(error: BaseException) -> str:
    """The innermost message of an exception chain, on one line."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__  # type: ignore[assignment]
    text = " ".join(str(error).split()) or type(error).__name__
    return text[:300]


def push_version(store: Store, name: str, version: int | None, repo_id: str,
                 private: bool = False, token: str | None = None) -> dict[str, Any]:
    """Push ``name``'s version (latest when None) to dataset repo ``repo_id``; what was sent."""
    check_repo_id(repo_id)
    manifest = find_version(store, name, version)
    dataset = version_dataset(store, manifest)
    card = hub_card(store, manifest)
    endpoint = hub_endpoint()
    where = f"cannot push {name} {manifest['label']} to the Hugging Face Hub at {endpoint}"
    if hub_offline():
        raise HubUnavailable(f"{where}: HF_HUB_OFFLINE is set (unset it to push)")
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token)
    message = f"gleaner: {name} {manifest['label']} (run {manifest['run_id']})"
    folder = posixpath.dirname(manifest["path"])
    try:
        repo = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        dataset.push_to_hub(repo_id, private=private, token=token, commit_message=message)
        for file, data in ((README_FILE, card.encode("utf-8")),
                           (PROVENANCE_FILE, store.read_bytes(posixpath.join(folder,
                                                                             PROVENANCE_FILE)))):
            api.upload_file(path_or_fileobj=data, path_in_repo=file, repo_id=repo_id,
                            repo_type="dataset", commit_message=message)
    except Exception as error:  # every way the Hub refuses: one line naming the cause
        raise HubUnavailable(f"{where}: {_cause(error)}") from error
    return {"repo_id": repo_id, "url": str(repo), "private": private, "name": name,
            "version": manifest["version"], "label": manifest["label"],
            "rows": dataset.num_rows, "endpoint": endpoint}
