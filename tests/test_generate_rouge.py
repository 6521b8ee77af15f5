"""The fast ROUGE-L filter decides exactly as Alpaca's all-pairs rouge-score loop."""

from __future__ import annotations

import json
import random
from pathlib import Path

from rouge_score import rouge_scorer

from gleaner.tasks.generate.rouge import RougeIndex, all_pairs_best, rouge_l, tokenize
from gleaner.tasks.generate.seeds import load_seed_tasks


def perturbed(text: str, rng: random.Random, vocabulary: list[str]) -> str:
    """A near copy: a few words dropped, swapped or replaced, around the 0.7 line."""
    words = text.split()
    for _ in range(rng.randint(1, max(1, len(words) // 3))):
        if len(words) < 3:
            break
        move = rng.random()
        at = rng.randrange(len(words))
        if move < 0.3:
            del words[at]
        elif move < 0.6:
            other = rng.randrange(len(words))
            words[at], words[other] = words[other], words[at]
        else:
            words[at] = rng.choice(vocabulary)
    return " ".join(words)


def test_the_index_decides_like_the_all_pairs_loop_on_real_instructions(
        shared_data: Path) -> None:
    seeds = [t.instruction for t in load_seed_tasks(
        str(shared_data / "alpaca_seed/seed_tasks.jsonl"))]
    generated = [r["instruction"] for r in json.loads(
        (shared_data / "alpaca/alpaca_random_9k.json").read_text())]
    rng = random.Random(7)
    vocabulary = sorted({w for text in generated[:2000] for w in text.split()})
    picked = rng.sample(generated, 160)
    candidates = []
    for text in picked:  # real generated instructions, and near copies of them and of seeds
        candidates.append(text)
        candidates.append(perturbed(rng.choice([text, rng.choice(seeds)]), rng, vocabulary))
    candidates += ["", "!!!", "Name three rivers.", "Name three rivers."]  # no tokens; exact dup
    rng.shuffle(candidates)

    index, pool = RougeIndex(0.7), []
    for text in seeds:
        index.add(tokenize(text))
        pool.append(tokenize(text))
    decisions = {"kept": 0, "rejected": 0}
    for text in candidates:
        tokens = tokenize(text)
        fast, slow = index.best_match(tokens), all_pairs_best(tokens, pool, 0.7)
        assert (fast is None) == (slow is None), text
        if slow is not None:
            assert fast.score == slow.score and fast.entry == slow.entry, text
            decisions["rejected"] += 1
            continue
        decisions["kept"] += 1
        index.add(tokens)
        pool.append(tokens)
    # the sample meets both sides of the line, and the bound spared most LCS tables
    assert decisions["rejected"] > 60 and decisions["kept"] > 150
    assert index.exact_scores < len(candidates) * 3


def test_scores_are_rouge_scores_own() -> None:
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    a, b = "Give three tips for staying healthy.", "Give me 3 tips to stay healthy!"
    assert rouge_l(tokenize(a), tokenize(b)) == scorer.score(b, a)["rougeL"].fmeasure
    assert tokenize("Hello, World! It's 2024.") == ["hello", "world", "it", "s", "2024"]


def test_a_score_exactly_at_the_threshold_is_a_near_duplicate() -> None:
    # 7 of 10 tokens in common, in order: F = 2*7/20 = 0.7 exactly: rejected (SPEC: >= 0.7;
    # Alpaca's code used > 0.7, which would keep it)
    first = "alpha beta gamma delta epsilon zeta eta theta iota kappa"
    second = "alpha beta gamma delta epsilon zeta eta one two three"
    assert rouge_l(tokenize(second), tokenize(first)) == 0.7
    index = RougeIndex(0.7)
    index.add(tokenize(first))
    match = index.best_match(tokenize(second))
    assert match is not None and match.score == 0.7
    assert index.best_match(tokenize("alpha beta gamma delta epsilon zeta one two three four")
                            ) is None  # 6 of 10: 0.6
