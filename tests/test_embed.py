"""Embeddings: the encoder matches sentence-transformers, the Ray actor pool matches the
in-process encoder, and the embed stage resumes and reuses its cross-run cache."""

from __future__ import annotations

import numpy as np
import pytest

from gleaner.config import GleanerConfig
from gleaner.schema import Example, Turn, examples_to_table
from gleaner.store import Store
from gleaner.tasks.deita.embed import (
    STAGE,
    Encoder,
    actor_pool,
    embed_on_pool,
    example_text,
    length_batches,
    table_vectors,
)

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


@pytest.mark.slow  # starts Ray actors that each load the model (~15 s on 2 shared cores)
def test_actor_pool_equals_in_process(ray_local, encoder):
    import ray

    pool, actors = actor_pool(2, None, "mean", num_cpus=1)
    try:
        batches = [(i, [f"id{i}-{j}" for j in range(len(TEXTS))], TEXTS) for i in range(3)]
        results = sorted(embed_on_pool(pool, batches), key=lambda r: r[0])
    finally:
        for actor in actors:
            ray.kill(actor)
    want = encoder.encode(TEXTS)
    assert [r[0] for r in results] == [0, 1, 2]
    for _, ids, vectors in results:
        assert ids[0].endswith("-0")
        np.testing.assert_allclose(vectors, want, atol=1e-5)


def examples(n: int) -> list[Example]:
    rows = [Example("unit", i, f"Question number {i} about {'cats' if i % 2 else 'dogs'}?",
                    output=f"Answer {i}. " * (1 + i % 5)) for i in range(n)]
    rows.append(Example("unit", n, "And the follow-up?", output="Sure.",
                        history=[Turn("user", "First turn"), Turn("assistant", "First reply")]))
    return rows


@pytest.mark.slow  # three rounds of actor pools
def test_embed_stage_resumes_and_uses_the_cache(ray_local, tmp_path, encoder):
    from gleaner.flows.deita_flow import embed_examples

    store = Store(str(tmp_path / "store"))
    pool = examples(29)
    store.write_part("run-a", "ingest", 0, examples_to_table(pool))
    config = GleanerConfig().with_overrides({"embed.batch_size": 8, "embed.actors": 1})

    first = embed_examples(store, "run-a", config)
    assert first["embedded"] == 30 and first["batches"] == 4 and first["from_cache"] == 0
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
    assert again["skipped_batches"] == 3 and again["embedded"] == len(expected_ids) == 8
    assert store.finished_parts("run-a", STAGE) == {0, 1, 2, 3}
    assert sorted(table_vectors(store.read_stage("run-a", STAGE))[0]) == sorted(ids)

    # Another run with an overlapping pool: known ids come from the cache, only new ones embed.
    bigger = examples(33)
    store.write_part("run-b", "ingest", 0, examples_to_table(bigger))
    third = embed_examples(store, "run-b", config)
    new_ids = {e.id for e in bigger} - {e.id for e in pool}
    assert third["embedded"] == len(new_ids) == 4
    assert third["from_cache"] == 30
    ids_b, vectors_b = table_vectors(store.read_stage("run-b", STAGE))
    got = dict(zip(ids_b, vectors_b, strict=True))
    for example_id, vector in by_id.items():
        np.testing.assert_array_equal(got[example_id], vector)

    # The plan guard: other batch settings on a run with output are refused, not mixed.
    with pytest.raises(ValueError, match="batch_size"):
        embed_examples(store, "run-a", config.with_overrides({"embed.batch_size": 5}))


def test_length_batches_are_stable_and_sorted():
    ids = [f"i{k}" for k in range(7)]
    texts = ["a" * (7 - k) for k in range(7)]
    batches = length_batches(ids, texts, 3)
    assert [b[0] for b in batches] == [["i6", "i5", "i4"], ["i3", "i2", "i1"], ["i0"]]
    assert length_batches(list(reversed(ids)), list(reversed(texts)), 3) == batches


@pytest.mark.slow  # loads SmolLM2 from its GGUF (~20 s)
def test_causal_lm_last_hidden_state_embeddings():
    """DEITA's choice: the last token's final hidden state; left padding must not change it."""
    lm = Encoder(None, pooling="last", batch_size=3)
    assert lm.name.endswith("#last-hidden") and lm.dim == lm.model.config.hidden_size
    together = lm.encode(TEXTS[:3])
    alone = np.stack([lm.encode([t])[0] for t in TEXTS[:3]])
    np.testing.assert_allclose(together, alone, atol=1e-3)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(together[0], together[1])
