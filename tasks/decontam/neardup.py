"""Near-duplicate removal: MinHash LSH over word shingles, one example kept per cluster.

Two steps (docs/methods.md):

1. ``minhash``, an engine stage (parts per batch, resumable, cached): every example's text
   (``neardup.text``: its prompt, i.e. every user turn, or the whole example with the
   answers) is normalised as decontamination does (lower case, words only) and cut into
   shingles of ``neardup.shingle`` words (a shorter text is one shingle); datasketch's
   ``MinHash`` (``num_perm`` permutations, ``seed``) makes its signature, kept as uint32
   (datasketch's values are below 2^32). The signature is cut into ``b`` bands of ``r``
   rows, (b, r) from datasketch's ``_optimal_param(threshold, num_perm)`` (the split that
   minimises the false positive and false negative areas, what ``MinHashLSH`` uses); each
   band is hashed to a uint64 key (BLAKE2b).
2. ``neardup``, a global step on the driver: examples sharing a band key are candidate
   pairs (each with the next one and with the first one of the same key); a pair is kept
   when its Jaccard estimated from the signatures' low 8 bits (b-bit minwise hashing, Li &
   König 2010: ``(P_equal - 2^-8) / (1 - 2^-8)``) is at least ``neardup.threshold``; the
   connected components of the kept pairs are the clusters (scipy). In each cluster the
   example with the longest response (characters of every assistant turn; ties: the
   smallest id) is kept, every other one is marked ``near_duplicate`` with the cluster id
   (the kept example's id). The driver holds band keys (8 bytes x b) and 8-bit signatures
   (``num_perm`` bytes) per example, never MinHash objects.

Registered here: the pool stage (``gleaner neardup``, ``curate.filters``) and the mark
selection honours (reason ``near_duplicate:<kept id>``).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gleaner import layout
from gleaner.config import GleanerConfig, NearDupConfig
from gleaner.engine import Stage, stage_schema
from gleaner.engine.catalog import Drop, PoolStage, StageFlag
from gleaner.engine.stage import declare
from gleaner.registry import register
from gleaner.store import Store
from gleaner.tasks.decontam.stage import NORMALISATION, prompts_of, words
from gleaner.tasks.select.selectors import NEAR_DUPLICATE

MINHASH = "minhash"  # the engine stage: a signature per example
NEARDUP = "neardup"  # the clusters (the global step's output), the pool stage, its verb
B_BITS = 8  # bits of each MinHash value the driver keeps to check a candidate pair
PAIR_CHUNK = 200_000  # candidate pairs checked at once (num_perm bytes each, twice)
PART_ROWS = 500_000  # rows of one part of the clusters' output

CLUSTER_SCHEMA = stage_schema(
    pa.field("near_duplicate", pa.bool_(), nullable=False),  # in a cluster, not the kept one
    pa.field("cluster", pa.string()),  # the kept example's id (None: no near duplicate)
    pa.field("cluster_size", pa.int32(), nullable=False),  # 1: no near duplicate
    pa.field("kept", pa.bool_(), nullable=False),  # the longest response of its cluster
    pa.field("response_chars", pa.int64(), nullable=False),
)


def lsh_params(settings: NearDupConfig) -> tuple[int, int]:
    """(bands, rows) for the Jaccard threshold: datasketch's own choice for MinHashLSH with
    ``weights=(1 - false_negative_weight, false_negative_weight)``."""
    from datasketch.lsh import _optimal_param

    weight = settings.false_negative_weight
    bands, rows = _optimal_param(settings.threshold, settings.num_perm, 1.0 - weight, weight)
    return int(bands), int(rows)


def shingles(text: str, size: int) -> list[bytes]:
    """Distinct word shingles of the normalised text (a shorter text: itself)."""
    tokens = words(text)
    if not tokens:
        return []
    if len(tokens) <= size:
        return [" ".join(tokens).encode()]
    return list({" ".join(tokens[i:i + size]).encode() for i in range(len(tokens) - size + 1)})


def text_of(row: Mapping[str, Any], what: str) -> str:
    if what == "prompt":
        return "\n".join(prompts_of(row))
    turns = [t["content"] for t in row.get("conversation") or [] if t["role"] != "system"]
    return "\n".join(turns) or f"{row.get('instruction')}\n{row.get('input')}\n{row.get('output')}"


def response_chars(row: Mapping[str, Any]) -> int:
    turns = [t["content"] for t in row.get("conversation") or [] if t["role"] == "assistant"]
    return sum(len(t) for t in turns) if turns else len(row.get("output") or "")


def signatures(texts: list[list[bytes]], num_perm: int, seed: int) -> np.ndarray:
    """datasketch MinHash signatures, one uint32 row per shingle list (empty: all max)."""
    from datasketch import MinHash

    out = np.full((len(texts), num_perm), np.iinfo(np.uint32).max, dtype=np.uint32)
    for row, minhash in enumerate(MinHash.generator(texts, num_perm=num_perm, seed=seed)):
        out[row] = minhash.hashvalues  # < 2^32: datasketch masks them to 32 bits
    return out


def band_keys(signature: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """A uint64 key per band: BLAKE2b of the band's ``rows`` values."""
    keys = np.empty((signature.shape[0], bands), dtype=np.uint64)
    raw = np.ascontiguousarray(signature)
    for band in range(bands):
        part = np.ascontiguousarray(raw[:, band * rows:(band + 1) * rows])
        keys[:, band] = [int.from_bytes(hashlib.blake2b(v.tobytes(), digest_size=8).digest(),
                                        "little") for v in part]
    return keys


class MinHashWorker:
    def __init__(self, stage: MinHashStage):
        self.stage = stage

    def process(self, rows: pa.Table) -> pa.Table:
        s = self.stage.settings
        bands, band_rows = lsh_params(s)
        records = rows.to_pylist()
        texts = [shingles(text_of(r, s.text), s.shingle) for r in records]
        signature = signatures(texts, s.num_perm, s.seed)
        keys = band_keys(signature, bands, band_rows)
        n = len(records)
        return pa.Table.from_arrays([
            pa.array([r["id"] for r in records], pa.string()),
            pa.FixedSizeListArray.from_arrays(pa.array(signature.ravel(), pa.uint32()),
                                              s.num_perm),
            pa.FixedSizeListArray.from_arrays(pa.array(keys.ravel(), pa.uint64()), bands),
            pa.array([len(t) for t in texts], pa.int32()),
            pa.array([response_chars(r) for r in records], pa.int64()),
            pa.array(["ok"] * n, pa.string()), pa.nulls(n, pa.string()),
            pa.nulls(n, pa.string()), pa.array([False] * n, pa.bool_()),
        ], schema=self.stage.schema)

    def close(self) -> None:
        return None


class MinHashStage(Stage):
    """A MinHash signature and LSH band keys per ingested example."""

    declared = declare(batch_size=20_000)

    name = MINHASH
    input_columns = ("id", "instruction", "input", "output", "conversation")
    summary_columns = ("shingles",)
    description = "MinHash signatures of word shingles (near-duplicate removal)"

    def __init__(self, section: NearDupConfig):
        super().__init__(section)
        self.settings = section

    @property
    def schema(self) -> pa.Schema:
        bands, _ = lsh_params(self.settings)
        return stage_schema(
            pa.field("signature", pa.list_(pa.uint32(), self.settings.num_perm)),
            pa.field("bands", pa.list_(pa.uint64(), bands)),
            pa.field("shingles", pa.int32(), nullable=False),  # 0: no words, never clustered
            pa.field("response_chars", pa.int64(), nullable=False))

    def check_input(self, rows: int) -> None:
        if rows == 0:
            raise ValueError("the pool is empty: there are no near duplicates to look for "
                             "(0 examples ingested); ingest examples first")

    def requested(self) -> dict[str, Any]:
        s = self.settings
        bands, rows = lsh_params(s)
        return {"num_perm": s.num_perm, "seed": s.seed, "shingle": s.shingle, "text": s.text,
                "normalisation": NORMALISATION, "bands": bands, "rows": rows,
                "band_hash": "blake2b-64", "minhash": "datasketch-sha1"}

    def row_defaults(self) -> dict[str, Any]:
        return {"shingles": 0, "response_chars": 0}

    def open(self) -> MinHashWorker:
        return MinHashWorker(self)

    def summarize(self, table: pa.Table) -> dict[str, Any]:
        ok = table.filter(pc.equal(table["status"], "ok"))
        empty = ok.filter(pc.equal(ok["shingles"], 0)).num_rows
        bands, rows = lsh_params(self.settings)
        return {"no_words": empty, "bands": bands, "rows": rows}


# ---- the global step: candidate pairs, their check, the clusters -----------------------------
def band_pairs(keys: np.ndarray) -> np.ndarray:
    """Pair codes ``a * n + b`` (a < b, distinct) of rows sharing one band's key: each row with
    the next of the same key and with the first of it."""
    n = keys.shape[0]
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    same = np.flatnonzero(ordered[1:] == ordered[:-1])
    if same.size == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.concatenate([[True], ordered[1:] != ordered[:-1]]))
    first = starts[np.searchsorted(starts, same + 1, side="right") - 1]
    a = np.concatenate([order[same], order[first]]).astype(np.int64)
    b = np.concatenate([order[same + 1], order[same + 1]]).astype(np.int64)
    keep = a != b
    low, high = np.minimum(a[keep], b[keep]), np.maximum(a[keep], b[keep])
    return np.unique(low * n + high)


def candidate_pairs(keys: np.ndarray) -> np.ndarray:
    """Distinct (a, b), a < b, of rows sharing a key in some band."""
    n = keys.shape[0]
    codes = np.unique(np.concatenate([band_pairs(keys[:, band]) for band in
                                      range(keys.shape[1])] or [np.zeros(0, np.int64)]))
    return np.stack([codes // max(n, 1), codes % max(n, 1)], 1)


def close_pairs(keys: np.ndarray, sketch: np.ndarray, threshold: float
                ) -> tuple[np.ndarray, int]:
    """The candidate pairs (as for :func:`candidate_pairs`) whose estimated Jaccard reaches
    the threshold, band by band, each pair checked once; and how many were checked."""
    n = keys.shape[0]
    checked = np.zeros(0, dtype=np.int64)
    close = []
    for band in range(keys.shape[1]):
        codes = np.setdiff1d(band_pairs(keys[:, band]), checked, assume_unique=True)
        pairs = np.stack([codes // n, codes % n], 1)
        close.append(pairs[estimated_jaccard(sketch, pairs) >= threshold])
        checked = np.union1d(checked, codes)
    found = np.concatenate(close) if close else np.zeros((0, 2), dtype=np.int64)
    return found, int(checked.size)


def estimated_jaccard(sketch: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Jaccard of each pair from b-bit (8-bit) MinHash values, corrected for chance equality."""
    out = np.empty(len(pairs), dtype=np.float64)
    chance = 2.0 ** -B_BITS
    for at in range(0, len(pairs), PAIR_CHUNK):
        a, b = pairs[at:at + PAIR_CHUNK, 0], pairs[at:at + PAIR_CHUNK, 1]
        equal = (sketch[a] == sketch[b]).mean(axis=1)
        out[at:at + PAIR_CHUNK] = (equal - chance) / (1.0 - chance)
    return out


def clusters(n: int, pairs: np.ndarray) -> np.ndarray:
    """A component label per row (connected components of the pairs)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])),
                       shape=(n, n)).tocsr()
    return connected_components(graph, directed=False)[1]


def keepers(labels: np.ndarray, chars: np.ndarray, id_rank: np.ndarray) -> np.ndarray:
    """Per row, the row kept in its component: the longest response, then the smallest id."""
    order = np.lexsort((id_rank, -chars, labels))
    ordered = labels[order]
    starts = np.concatenate([[True], ordered[1:] != ordered[:-1]])
    kept_of_label = np.empty(labels.max() + 1 if labels.size else 0, dtype=np.int64)
    kept_of_label[ordered[starts]] = order[starts]
    return kept_of_label[labels]


def read_minhash(store: Store, run_id: str, num_perm: int
                 ) -> tuple[pa.Array, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(ids, usable, response chars, band keys, 8-bit sketches), filled part by part into
    arrays sized from the parts' footers: the 32-bit signatures are never all in memory."""
    import pyarrow.parquet as pq

    paths = [path for _, path in sorted(
        store.part_paths(store.stage_path(run_id, MINHASH)).items())]
    counts = []
    for path in paths:
        with store.fs.open(path) as handle:
            counts.append(pq.read_metadata(handle).num_rows)
    n = sum(counts)
    ids, usable = [], np.zeros(n, dtype=bool)
    chars = np.zeros(n, dtype=np.int64)
    keys: np.ndarray | None = None
    sketch = np.zeros((n, num_perm), dtype=np.uint8)
    at = 0
    for path, rows in zip(paths, counts, strict=True):
        table = store.dataset([path]).to_table(
            columns=["id", "status", "shingles", "response_chars", "bands", "signature"])
        ids.append(table.column("id").combine_chunks())
        ok = pc.and_(pc.equal(table["status"], "ok"), pc.greater(table["shingles"], 0))
        usable[at:at + rows] = np.asarray(ok.to_numpy(zero_copy_only=False), dtype=bool)
        chars[at:at + rows] = table.column("response_chars").to_numpy()
        bands = table.column("bands").combine_chunks()
        if keys is None:
            keys = np.zeros((n, bands.type.list_size), dtype=np.uint64)
        keys[at:at + rows] = bands.flatten().to_numpy(zero_copy_only=False).reshape(rows, -1)
        signature = table.column("signature").combine_chunks().flatten().to_numpy(
            zero_copy_only=False).reshape(rows, num_perm)
        sketch[at:at + rows] = signature & 0xFF
        at += rows
        del table, signature, bands
    return (pa.concat_arrays(ids) if ids else pa.array([], pa.string()), usable, chars,
            keys if keys is not None else np.zeros((0, 1), np.uint64), sketch)


def cluster_step(config: GleanerConfig, run_id: str, summary: dict[str, Any]
                 ) -> dict[str, Any]:
    """The clusters of the run's MinHash rows, written as stage ``neardup``; the summary."""
    started = time.perf_counter()
    s = config.neardup
    store = Store(config.store.url, config.store.options)
    ids, usable, chars, keys, sketch = read_minhash(store, run_id, s.num_perm)
    n = len(ids)
    pa.default_memory_pool().release_unused()  # the parts' buffers: read and gone
    if usable.all():  # no copy of the keys and sketches (the usual case)
        close, checked = close_pairs(keys, sketch, s.threshold)
    else:
        rows = np.flatnonzero(usable)
        close, checked = close_pairs(keys[rows], sketch[rows], s.threshold)
        close = rows[close]
    del keys, sketch
    labels = clusters(n, close)
    id_rank = np.empty(n, dtype=np.int64)
    id_rank[pc.sort_indices(ids).to_numpy()] = np.arange(n)
    kept_row = keepers(labels, chars, id_rank)
    size = np.bincount(labels, minlength=labels.max() + 1 if n else 0)[labels] if n else labels
    in_cluster = size > 1
    is_kept = kept_row == np.arange(n)
    cluster_ids = pc.take(ids, pa.array(kept_row, pa.int64()))
    table = pa.Table.from_arrays([
        ids, pa.array(in_cluster & ~is_kept, pa.bool_()),
        pc.if_else(pa.array(in_cluster, pa.bool_()), cluster_ids, pa.nulls(n, pa.string())),
        pa.array(size.astype(np.int32), pa.int32()), pa.array(is_kept, pa.bool_()),
        pa.array(chars, pa.int64()), pa.array(["ok"] * n, pa.string()),
        pa.nulls(n, pa.string()), pa.nulls(n, pa.string()), pa.array([False] * n, pa.bool_()),
    ], schema=CLUSTER_SCHEMA)
    store.clear_stage(run_id, NEARDUP)
    for part, at in enumerate(range(0, max(n, 1), PART_ROWS)):
        store.write_part(run_id, NEARDUP, part, table.slice(at, PART_ROWS))
    marked = int(np.sum(in_cluster & ~is_kept))
    bands, band_rows = lsh_params(s)
    result = {
        **summary, "stage": NEARDUP, "minhash_seconds": summary.get("seconds"),
        "threshold": s.threshold, "num_perm": s.num_perm, "bands": bands, "rows": band_rows,
        "shingle": s.shingle, "text": s.text, "examples": n,
        "near_duplicates": marked, "clean": n - marked,
        "clusters": int(len(np.unique(labels[in_cluster]))),
        "largest_cluster": int(size.max()) if n else 0,
        "candidate_pairs": checked, "pairs_over_threshold": int(len(close)),
        "no_words": int(n - usable.sum()),
        "cluster_seconds": round(time.perf_counter() - started, 3)}
    store.write_json(layout.summary_path(store, run_id, NEARDUP), result)
    return result


def describe(summary: Mapping[str, Any]) -> str:
    return (f"{summary.get('near_duplicates', 0):,} of {summary.get('examples', 0):,} examples "
            f"are near duplicates in {summary.get('clusters', 0):,} clusters (the longest "
            f"response of each kept), {summary.get('clean', 0):,} left; Jaccard >= "
            f"{summary.get('threshold')} over {summary.get('shingle')}-word shingles, "
            f"{summary.get('bands')} bands x {summary.get('rows')} rows")


register("pool_stage", NEARDUP)(PoolStage(
    lambda config: MinHashStage(config.neardup), NEARDUP, NEARDUP,
    "Cluster near-duplicate examples (MinHash LSH); keep the longest response of each.",
    panel="Choose", describe=describe,
    drop=Drop(NEARDUP, "near_duplicate", NEAR_DUPLICATE, detail="cluster"),
    finish=cluster_step,
    flags=(StageFlag("--threshold", "neardup.threshold", float,
                     "Jaccard of the shingle sets at which two examples are near duplicates "
                     "(default 0.8)."),)))
