"""Reward-model benchmark: the real `gleaner reward train` path (Ray Train, checkpoints in a
store, held-out pairwise accuracy) on pairs made from real Alpaca records; prints tokens/s,
wall time, peak GPU memory (on a GPU), held-out accuracy and the loss curve.

Pairs: for Alpaca prompt i, chosen = its own output, rejected = the output of another
record (an answer to a different question): a preference a reward model must learn from
the prompt *and* the response. GPT-4-LLM trained OPT-1.3B; on a GPU machine with the
weights at hand run ``--base-model facebook/opt-1.3b --gpu`` (bf16 autocast). Without
weights, ``--tiny opt`` (or ``llama``) builds a small model of that architecture from a
config with SmolLM2's tokenizer, so the OPT sequence-classification path runs on a CPU too.

    .venv/bin/python bench/bench_reward.py [--pairs 256] [--max-steps 8] [--gpu]
        [--base-model M | --tiny opt|llama] [--batch 16] [--micro 4] [--max-length 512]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ALPACA = ROOT.parent / "shared" / "data" / "alpaca" / "alpaca_random_9k.json"


def alpaca_pairs(count: int, seed: int = 0) -> list[dict]:
    from gleaner.tasks.compare.pairs import pair_id
    from gleaner.tasks.compare.sources import prompt_id

    rows = json.loads(ALPACA.read_text(encoding="utf-8"))[:count]
    rng = random.Random(seed)
    out = []
    for i, row in enumerate(rows):
        other = rows[(i + rng.randint(1, len(rows) - 1)) % len(rows)]
        question = f"{row['instruction']}\n\n{row['input']}" if row["input"] else row["instruction"]
        pid = prompt_id([("user", question)])
        out.append({"id": pair_id(pid, f"c{i}", f"r{i}"), "prompt_id": pid,
                    "turns": [{"role": "user", "content": question}],
                    "instruction": row["instruction"], "input": row["input"],
                    "chosen": row["output"], "rejected": other["output"], "chosen_score": 9.0,
                    "rejected_score": 2.0, "margin": 7.0, "chosen_id": f"c{i}",
                    "rejected_id": f"r{i}", "chosen_sources": ["alpaca"],
                    "rejected_sources": ["another prompt's answer"]})
    return out


def tiny_model(kind: str, folder: Path) -> str:
    """A small OPT or Llama built from a config with SmolLM2's tokenizer (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    from gleaner.models import smollm2_gguf
    from gleaner.tasks.train.finetune import load_tokenizer

    tok = load_tokenizer(str(smollm2_gguf()))
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
           "pad_token_id": tok.pad_token_id}
    if kind == "opt":
        model = OPTForCausalLM(OPTConfig(vocab_size=len(tok), hidden_size=128, ffn_dim=256,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         word_embed_proj_dim=128, max_position_embeddings=1024,
                                         **ids))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=128,
                                             intermediate_size=256, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=1024, **ids))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--max-steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16, help="effective batch (pairs)")
    parser.add_argument("--micro", type=int, default=4, help="pairs per device and micro-batch")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--lr", type=float, default=None, help="default: the preset's 9e-6")
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--base-model", default=None, help="HF id / folder / .gguf")
    parser.add_argument("--tiny", choices=["opt", "llama"], default=None)
    parser.add_argument("--store", default=None, help="keep the store here (default: a temp "
                        "folder); the model is runs/bench/finetune/reward-model/model")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    import pyarrow as pa

    from gleaner.config import GleanerConfig
    from gleaner.runtime import init_ray
    from gleaner.store import Store
    from gleaner.tasks.compare.pairs import PAIRS_SCHEMA
    from gleaner.tasks.reward.train import run_reward_train

    with tempfile.TemporaryDirectory(prefix="bench-rm-") as scratch:
        base = tiny_model(args.tiny, Path(scratch) / "tiny") if args.tiny else args.base_model
        store = Store(args.store or str(Path(scratch) / "store"))
        store.write_part("bench", "compare/pairs", 0,
                         pa.Table.from_pylist(alpaca_pairs(args.pairs), schema=PAIRS_SCHEMA))
        recipe = {"max_steps": args.max_steps, "effective_batch_size": args.batch,
                  "per_device_batch_size": args.micro, "max_length": args.max_length,
                  "checkpoint_every_steps": max(1, args.max_steps), "epochs": 100.0}
        if args.lr:
            recipe["learning_rate"] = args.lr
        config = GleanerConfig().with_overrides({
            "store.url": store.url, "reward.train.base_model": base,
            "reward.train.overrides": recipe, "reward.train.num_workers": args.num_workers,
            "reward.train.use_gpu": args.gpu, "reward.train.force": True})
        init_ray(config)
        started = time.perf_counter()
        summary = run_reward_train(store, "bench", config)
        wall = time.perf_counter() - started
        metrics = store.read_json(store.run_path("bench", "finetune", "reward-model",
                                                 "metrics.json"))
    gpu = metrics.get("gpu_max_memory_bytes")
    accuracy = summary["heldout_accuracy"]
    print(f"model: {base or 'SmolLM2-135M-Instruct (GGUF, de-quantised)'}"
          + (f" (tiny {args.tiny} from a config)" if args.tiny else ""))
    print(f"data: {summary['data']}")
    print(f"device: {metrics['device']} x{metrics['world_size']}, bf16={metrics['bf16']}, "
          f"grad accumulation {metrics['gradient_accumulation']}")
    print(f"steps: {metrics['steps']}, tokens (chosen + rejected): {metrics['tokens']}, "
          f"train {metrics['train_seconds']:.1f} s, tokens/s {metrics['tokens_per_s']}")
    print(f"wall (run_reward_train, incl. tokenising, worker start, checkpoints, upload): "
          f"{wall:.1f} s")
    print(f"held-out pairwise accuracy: {'n/a' if accuracy is None else f'{accuracy:.3f}'} "
          f"on {summary['data']['heldout_pairs']} pairs")
    print(f"peak GPU memory: {'n/a (CPU)' if gpu is None else f'{gpu / 2**30:.2f} GiB'}")
    print(f"driver peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    print("loss: " + " ".join(f"{h['loss']:.3f}" for h in metrics["history"]))


if __name__ == "__main__":
    main()
