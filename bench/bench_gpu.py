"""GPU benchmark: fine-tune a model for N steps in a given layout, then answer the AlpaGasus test
sets; prints tokens/s, step time, peak memory per GPU and the projected time of the full
AlpaGasus run (9k examples, 3 epochs, effective batch 128).

Training runs the trainer every gleaner run uses (TRL's SFTTrainer with the arguments
tasks/train/trainer_settings.py builds), without Ray, Prefect or vLLM: one process per GPU
under torchrun (or one plain process), so it runs on a bare GPU host that has only torch,
transformers, accelerate and peft (TRL, datasets and their small dependencies carried as
wheels, then ``pip install --no-deps .`` of gleaner itself). With no weights at hand it
builds the model from its config with random weights (``--shape llama-7b``: Llama-2-7B's
shape; or a folder holding a config.json): throughput and memory depend on the shape, not
on the weights.

    # one 8-GPU node, AlpaGasus-7B's layout
    torchrun --nproc-per-node 8 bench/bench_gpu.py --shape llama-7b --strategy fsdp --steps 20
    # one GPU, LoRA
    python bench/bench_gpu.py --model meta-llama/Llama-2-7b-hf --peft lora --steps 20
    # CPU: the same code on a tiny config-built Llama
    python bench/bench_gpu.py --shape tiny --steps 4 --max-length 128
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ALPACA = ROOT.parent / "shared" / "data" / "alpaca" / "alpaca_random_9k.json"
EVAL_SETS = ROOT.parent / "shared" / "data" / "eval_sets"
ALPAGASUS_RUN = {"examples": 9_000, "epochs": 3, "effective_batch": 128}
# Llama-2-7B (Touvron et al. 2023), as its config.json states it
SHAPES: dict[str, dict[str, Any]] = {
    "llama-7b": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
                 "num_hidden_layers": 32, "num_attention_heads": 32,
                 "num_key_value_heads": 32, "max_position_embeddings": 4096},
    "tiny": {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "max_position_embeddings": 1024},
}


def rank_and_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def has_weights(model: str | None) -> bool:
    folder = Path(model) if model else None
    return bool(folder and folder.is_dir() and (any(folder.glob("*.safetensors"))
                                                 or any(folder.glob("*.bin"))))


def build_model(args: argparse.Namespace, layout: Any) -> tuple[Any, str]:
    """The named model with its weights, loaded as the trainer loads it (a bf16 base under
    LoRA on GPU, 4-bit under QLoRA), or one built from a config with random weights (the
    same on every rank: seeded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    from gleaner.tasks.train.objectives import load_pretrained
    from gleaner.tasks.train.trainer_settings import frozen_base_dtype

    if has_weights(args.model) or (args.model and not Path(args.model).exists()):
        return load_pretrained(AutoModelForCausalLM, args.model, layout, None), "weights"
    if args.peft == "qlora":
        raise SystemExit("--peft qlora needs --model with weights (a 4-bit base is quantised "
                         "from them)")
    config = (AutoConfig.from_pretrained(args.model) if args.model
              else LlamaConfig(**SHAPES[args.shape], tie_word_embeddings=False))
    config._attn_implementation = args.attn
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=frozen_base_dtype(layout)), \
        "random weights (config-built)"


def training_rows(args: argparse.Namespace, vocab: int, tokenizer: Any) -> tuple[Any, str]:
    """Tokenised Alpaca records when a tokenizer and the data are here, else random ids of
    ``--max-length`` tokens (the worst case), with what was used."""
    import pyarrow as pa

    count = args.steps * args.micro_batch * rank_and_world()[1] * args.accumulation
    if tokenizer is not None and ALPACA.exists():
        from gleaner.tasks.train.finetune import sequences_table
        from gleaner.tasks.train.sft_data import SftFormat, prepare_tokenizer, tokenise_all

        records = json.loads(ALPACA.read_text())[:count]
        rows = [{"instruction": r["instruction"], "input": r["input"], "output": r["output"],
                 "conversation": []} for r in records]
        prepare_tokenizer(tokenizer, SftFormat("alpaca"))
        items = tokenise_all(rows, tokenizer, SftFormat("alpaca"), args.max_length)
        return sequences_table(items.sequences), f"{len(items.sequences)} Alpaca records"
    import random

    rng = random.Random(0)
    ids = [[rng.randrange(3, vocab) for _ in range(args.max_length)] for _ in range(count)]
    return pa.table({"input_ids": ids, "labels": ids}), f"{count} random rows of " \
                                                          f"{args.max_length} tokens"


def train(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer, TrainerCallback

    from gleaner.tasks.train.finetune import decoder_layers
    from gleaner.tasks.train.objectives import CausalLM
    from gleaner.tasks.train.recipes import build_recipe
    from gleaner.tasks.train.trainer_settings import RunLayout, lora_config, training_arguments

    rank, world = rank_and_world()
    on_gpu = torch.cuda.is_available()
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model) if args.model else None
    except (OSError, ValueError, TypeError):
        tokenizer = None
    recipe = build_recipe("alpaca", {
        "max_steps": args.steps, "per_device_batch_size": args.micro_batch,
        "effective_batch_size": args.micro_batch * world * args.accumulation,
        "max_length": args.max_length, "gradient_checkpointing": args.gradient_checkpointing,
        "checkpoint_every_steps": 10**9})
    layout = RunLayout(strategy=args.strategy, peft=args.peft, use_gpu=on_gpu,
                       attn_implementation=args.attn)
    model, weights = build_model(args, layout)
    table, data = training_rows(args, model.config.vocab_size, tokenizer)
    if tokenizer is None:
        from tokenizers import Tokenizer, models
        from transformers import PreTrainedTokenizerFast

        vocab = {f"t{i}": i for i in range(model.config.vocab_size)}
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t1")),
            pad_token="t0", eos_token="t2")
    layers = decoder_layers(model)
    layer = type(layers[0]).__name__ if layers else None
    arguments = training_arguments(recipe, layout, output_dir=str(out / "trainer"),
                                   world_size=world, layer_class=layer)
    arguments["save_strategy"] = "no"
    trainer = CausalLM().trainer(model, arguments, table, tokenizer,
                                 lora_config(layout, "CAUSAL_LM"), recipe)

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.started = 0.0

        def on_step_begin(self, *_: Any, **__: Any) -> None:
            if on_gpu:
                torch.cuda.synchronize()
            self.started = time.perf_counter()

        def on_step_end(self, *_: Any, **__: Any) -> None:
            if on_gpu:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.started)

    timer = StepTimer()
    trainer.add_callback(timer)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    result = trainer.train()
    tokens = int(trainer.state.num_input_tokens_seen)
    steady = timer.times[2:] or timer.times
    step_s = statistics.mean(steady)
    tokens_per_step = tokens / max(1, len(timer.times))
    peak = torch.cuda.max_memory_allocated() if on_gpu else None
    peaks = [peak]
    if world > 1 and torch.distributed.is_initialized():
        peaks = [None] * world
        torch.distributed.all_gather_object(peaks, peak)
    alpagasus_steps = math.ceil(ALPAGASUS_RUN["examples"] / ALPAGASUS_RUN["effective_batch"]) \
        * ALPAGASUS_RUN["epochs"]
    examples_per_step = recipe.effective_batch_size
    seconds_per_example = step_s / examples_per_step
    return {
        "model": args.model or f"{args.shape} shape", "weights": weights, "data": data,
        "strategy": args.strategy, "peft": args.peft,
        "world_size": world, "device": "cuda" if on_gpu else "cpu",
        "gpu": torch.cuda.get_device_name(0) if on_gpu else None,
        "dtype": "bf16" if trainer.args.bf16 else "fp32",
        "steps": trainer.state.global_step, "step_seconds": round(step_s, 4),
        "tokens_per_s": round(tokens_per_step / step_s, 1),
        "train_runtime_s": round(result.metrics.get("train_runtime", 0.0), 2),
        "peak_memory_gib_per_gpu": [None if p is None else round(p / 2**30, 2) for p in peaks],
        "alpagasus_projection": {
            "steps": alpagasus_steps,
            "hours": round(seconds_per_example * ALPAGASUS_RUN["examples"]
                           * ALPAGASUS_RUN["epochs"] / 3600, 2),
            "basis": f"{seconds_per_example:.4f} s an example at micro-batch "
                     f"{args.micro_batch} x {world} ranks, max length {args.max_length}",
        },
    }


def generate(args: argparse.Namespace, model_dir: str) -> dict[str, Any]:
    """Answers to the AlpaGasus test sets with each local back end, tokens/s per set."""
    import importlib.util

    from gleaner.tasks.evaluate.eval_sets import load_eval_set
    from gleaner.tasks.evaluate.generation import GenerationSettings, Generator

    results: dict[str, Any] = {}
    for backend in args.backends.split(","):
        if backend == "vllm" and importlib.util.find_spec("vllm") is None:
            results[backend] = "skipped: vllm is not installed here"
            continue
        generator = Generator(model_dir, GenerationSettings(
            max_new_tokens=args.new_tokens, batch_size=args.generation_batch), backend=backend)
        tokenizer = generator.renderer.tokenizer
        per_set = {}
        for name in ("koala", "vicuna", "wizardlm", "sinstruct"):
            prompts = load_eval_set(name, str(EVAL_SETS), limit=args.prompts)
            started = time.perf_counter()
            answers = generator.answer(prompts)
            seconds = time.perf_counter() - started
            tokens = sum(len(tokenizer(a, add_special_tokens=False)["input_ids"])
                         for a in answers)
            per_set[name] = {"prompts": len(prompts), "tokens": tokens,
                             "tokens_per_s": round(tokens / seconds, 1)}
        results[backend] = per_set
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="a folder or HF id (config only: random weights)")
    source.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--strategy", choices=["ddp", "fsdp", "deepspeed"], default="ddp")
    parser.add_argument("--peft", choices=["none", "lora", "qlora"], default="none")
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--generate", action="store_true",
                        help="then answer the four AlpaGasus test sets (rank 0)")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per test set")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--generation-batch", type=int, default=8)
    parser.add_argument("--backends", default="transformers,vllm",
                        help="generation back ends to time, comma-separated (vllm: if installed)")
    parser.add_argument("--work-dir", type=Path, default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))

    work = args.work_dir or Path(tempfile.gettempdir()) / "gleaner-bench-gpu"
    work.mkdir(parents=True, exist_ok=True)
    figures = train(args, work)
    rank, _ = rank_and_world()
    if rank == 0:
        if args.generate:
            if not has_weights(args.model):
                raise SystemExit("--generate needs --model: a folder with weights")
            figures["generation"] = generate(args, args.model)
        print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
