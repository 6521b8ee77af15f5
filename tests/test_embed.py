"""Embeddings: the encoder matches sentence-transformers, the engine's Ray actors match the
in-process encoder, and the embed stage resumes and reuses its cross-run cache. DEITA's
causal-LM embedding (SmolLM2's last hidden state) is tested in test_score.py, beside the HF
scorer, so the GGUF is loaded once for both."""

from __future__ import annotations

import numpy as np
import pytest

from gleaner.config import GleanerConfig
from gleaner.schema import Example, Turn, examples_to_table
from gleaner.store import Store
from gleaner.tasks.deita.embed import STAGE, Encoder, example_text, table_vectors

TEXTS = [
    "Give three tips for staying healthy.",
    "user: Translate 'good morning' into French.\n\nassistant: Bonjour.",
    "A much longer text about the history of the printing press, " * 12,
    "x",
    "Résumé: naïve café, 東京, emoji 🙂",
]


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return Encoder(batch_size=2)


def test_encoder_equals_sentence_transformers(encoder):
    from sentence_transformers import SentenceTransformer

    from gleaner.models import minilm_dir

    reference = SentenceTransformer(str(minilm_dir()), device="cpu").encode(TEXTS)
    vectors = encoder.encode(TEXTS)
    assert vectors.shape == (len(TEXTS), 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(vectors, reference, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def examples(n: int) -> list[Example]:
    rows = [Example("unit", i, f"Question number {i} about {'cats' if i % 2 else 'dogs'}?",
                    output=f"Answer {i}. " * (1 + i % 5)) for i in range(n)]
    rows.append(Example("unit", n, "And the follow-up?", output="Sure.",
                        history=[Turn("user", "First turn"), Turn("assistant", "First reply")]))
    return rows


@pytest.mark.slow  # three rounds of actor pools
def test_embed_stage_resumes_and_uses_the_cache(ray_local, tmp_path, encoder):
    """Two actors (the model loaded once each) embed what the in-process encoder does."""
    from gleaner.flows.deita_flow import run_embed

    store = Store(str(tmp_path / "store"))
    pool = examples(29)
    store.write_part("run-a", "ingest", 0, examples_to_table(pool))
    config = GleanerConfig().with_overrides({
        "store.url": store.url, "embed.resources.batch_size": 8, "embed.resources.actors": 2})

    def embed_examples(store: Store, run_id: str, config: GleanerConfig) -> dict:
        return run_embed(store, run_id, config)

    first = embed_examples(store, "run-a", config)
    assert first["made"] == 30 and first["batches"] == 4 and first["cached"] == 0
    assert first["ok"] == 30 and len(first["nodes"]) == 1
    assert store.finished_parts("run-a", STAGE) == {0, 1, 2, 3}
    table = store.read_stage("run-a", STAGE)
    assert table.schema.field("vector").type.list_size == 384
    ids, vectors = table_vectors(table)
    assert sorted(ids) == sorted(e.id for e in pool)
    by_id = dict(zip(ids, vectors, strict=True))
    rows = examples_to_table(pool).to_pylist()
    want = encoder.encode([example_text(r) for r in rows])
    np.testing.assert_allclose(np.stack([by_id[r["id"]] for r in rows]), want, atol=1e-5)
    assert "user: Question number 3" in example_text(rows[3])
    assert example_text(rows[-1]).startswith("user: First turn\n\nassistant: First reply")

    # Resume: a lost part is redone, finished parts are not (cache off, so it must embed).
    lost = store.part_paths(store.stage_path("run-a", STAGE))[2]
    expected_ids = table_vectors(Store(str(tmp_path / "store")).dataset([lost]).to_table())[0]
    store.fs.rm(lost)
    no_cache = config.with_overrides({"embed.cache": False})
    again = embed_examples(store, "run-a", no_cache)
    assert again["batches_resumed"] == 3 and again["made"] == len(expected_ids) == 8
    assert store.finished_parts("run-a", STAGE) == {0, 1, 2, 3}
    assert sorted(table_vectors(store.read_stage("run-a", STAGE))[0]) == sorted(ids)

    # Another run with an overlapping pool: known ids come from the cache, only new ones embed.
    bigger = examples(33)
    store.write_part("run-b", "ingest", 0, examples_to_table(bigger))
    third = embed_examples(store, "run-b", config)
    new_ids = {e.id for e in bigger} - {e.id for e in pool}
    assert third["made"] == len(new_ids) == 4
    assert third["cached"] == 30
    ids_b, vectors_b = table_vectors(store.read_stage("run-b", STAGE))
    got = dict(zip(ids_b, vectors_b, strict=True))
    for example_id, vector in by_id.items():
        np.testing.assert_array_equal(got[example_id], vector)

    # The plan guard: other batch settings on a run with output are refused, not mixed.
    with pytest.raises(ValueError, match="batch_size"):
        embed_examples(store, "run-a", config.with_overrides({"embed.resources.batch_size": 5}))
