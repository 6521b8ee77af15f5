"""Supervised fine-tuning data: prompt templates, tokenisation, response-only labels.

Each example is rendered to one text plus the character spans that carry the
loss (the responses). Tokenising with offsets then marks exactly the tokens
inside those spans; every other label is -100, so the model learns to answer,
not to repeat prompts. Three templates:

- ``alpaca``: Stanford Alpaca's prompt (``### Instruction:`` / ``### Input:`` /
  ``### Response:``) for single-turn records, the model's own chat template for
  conversations; the response ends with the EOS token.
- ``chat``: the model's chat template for everything.
- ``eot``: LIMA's format: the utterances in order, each closed by a dedicated
  end-of-turn token (added to the vocabulary when missing) rather than EOS.
- ``raw``: the instruction is the whole prompt, as is (no template), and the response
  follows it directly: what DEITA's scorers are trained on (their prompt, then the score
  token). Prompt and response are tokenised separately, so the response's first token is
  the one a scorer reads after the prompt; an over-long prompt loses its start, not its end.

The same renderer builds the generation prompt, so a fine-tuned model is asked
questions in exactly the format it was trained on (recorded in ``gleaner_sft.json``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

IGNORE_INDEX = -100
FORMAT_FILE = "gleaner_sft.json"

# Stanford Alpaca's templates, verbatim (train.py, PROMPT_DICT).
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
TEMPLATES = ("alpaca", "chat", "eot", "raw")
DEFAULT_EOT_TOKEN = "<|end_of_turn|>"


@dataclass(frozen=True)
class SftFormat:
    """How prompts are rendered; saved beside the model so generation matches training."""

    template: str = "alpaca"
    end_of_turn_token: str | None = None

    def to_json(self) -> str:
        return json.dumps({"template": self.template, "end_of_turn_token": self.end_of_turn_token})

    @classmethod
    def from_json(cls, text: str) -> SftFormat:
        data = json.loads(text)
        return cls(template=data["template"], end_of_turn_token=data.get("end_of_turn_token"))


def alpaca_prompt(instruction: str, input: str = "") -> str:
    if input.strip():
        return ALPACA_PROMPT_INPUT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def turns_of(record: dict[str, Any]) -> list[dict[str, str]]:
    """A record's turns: its ``conversation`` column, or one exchange built from the fields."""
    conversation = record.get("conversation") or []
    if conversation:
        return [{"role": t["role"], "content": t["content"]} for t in conversation]
    user = record["instruction"] if not record.get("input") else (
        f"{record['instruction']}\n\n{record['input']}")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]


def is_single_turn(record: dict[str, Any]) -> bool:
    turns = turns_of(record)
    return [t["role"] for t in turns] == ["user", "assistant"]


def prepare_tokenizer(tokenizer: Any, fmt: SftFormat) -> bool:
    """A pad token and (``eot``) the end-of-turn token; True when the vocabulary grew."""
    grew = False
    if fmt.template == "eot":
        token = fmt.end_of_turn_token or DEFAULT_EOT_TOKEN
        if tokenizer.convert_tokens_to_ids(token) in (None, tokenizer.unk_token_id):
            tokenizer.add_special_tokens({"additional_special_tokens": [token]})
            grew = True
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return grew


def stop_token_ids(tokenizer: Any, fmt: SftFormat) -> list[int]:
    """Token ids that end an answer: EOS, plus the end-of-turn token for ``eot``."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if fmt.template == "eot":
        ids.append(tokenizer.convert_tokens_to_ids(fmt.end_of_turn_token or DEFAULT_EOT_TOKEN))
    return ids


Spans = list[tuple[int, int]]


def _chat_spans(tokenizer: Any, turns: Sequence[dict[str, str]]) -> tuple[str, Spans]:
    """Full chat-template text and the spans of assistant turns (incl. their end markers).

    A turn's span is the text the template adds between the prompt-with-generation-
    header for the turns before it and the rendering that includes it.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; use template 'alpaca' or 'eot'")
    text = tokenizer.apply_chat_template(list(turns), tokenize=False)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for index, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(list(turns[:index]), tokenize=False,
                                               add_generation_prompt=True)
        through = tokenizer.apply_chat_template(list(turns[: index + 1]), tokenize=False)
        if text.startswith(before) and text.startswith(through):
            start, end = len(before), len(through)
        else:  # a template that is not prefix-stable: find the content itself
            start = text.index(turn["content"], cursor)
            end = start + len(turn["content"])
        spans.append((start, end))
        cursor = end
    return text, spans


def raw_prompt(record: dict[str, Any]) -> str:
    """The ``raw`` template's prompt: the instruction (and its input) exactly as given."""
    given = record.get("input") or ""
    return f"{record['instruction']}\n\n{given}" if given else record["instruction"]


def render(record: dict[str, Any], tokenizer: Any, fmt: SftFormat) -> tuple[str, Spans]:
    """The training text of one example and the character spans that carry the loss."""
    if fmt.template == "raw":
        prompt, response = raw_prompt(record), record["output"] + (tokenizer.eos_token or "")
        return prompt + response, [(len(prompt), len(prompt) + len(response))]
    turns = turns_of(record)
    if fmt.template == "eot":
        eot = fmt.end_of_turn_token or DEFAULT_EOT_TOKEN
        text, spans = "", []
        for turn in turns:
            start = len(text)
            text += turn["content"] + eot
            if turn["role"] == "assistant":
                spans.append((start, len(text)))
        return text, spans
    if fmt.template == "alpaca" and is_single_turn(record):
        instruction = record.get("instruction") or turns[0]["content"]
        prompt = alpaca_prompt(instruction, record.get("input") or "")
        response = (record.get("output") or turns[1]["content"]) + (tokenizer.eos_token or "")
        return prompt + response, [(len(prompt), len(prompt) + len(response))]
    if fmt.template in ("alpaca", "chat"):
        return _chat_spans(tokenizer, turns)
    raise ValueError(f"unknown template {fmt.template!r}; choose one of {', '.join(TEMPLATES)}")


def generation_prompt(instruction: str, input: str, tokenizer: Any, fmt: SftFormat) -> str:
    """The prompt a trained model answers: the training format up to where the response begins."""
    if fmt.template == "alpaca":
        return alpaca_prompt(instruction, input)
    if fmt.template == "raw":
        return raw_prompt({"instruction": instruction, "input": input})
    user = instruction if not input else f"{instruction}\n\n{input}"
    if fmt.template == "eot":
        return user + (fmt.end_of_turn_token or DEFAULT_EOT_TOKEN)
    return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                         add_generation_prompt=True)


def conversation_prompt(turns: Sequence[dict[str, str]], tokenizer: Any, fmt: SftFormat) -> str:
    """The prompt for a conversation's next assistant turn, rendered as ``render`` trains it:
    a single user turn as ``generation_prompt``; longer conversations through the chat
    template (``alpaca`` and ``chat``) or each utterance closed by the end-of-turn token
    (``eot``). MT-Bench's second turn is asked this way, after the model's own first answer."""
    if len(turns) == 1 and turns[0]["role"] == "user":
        return generation_prompt(turns[0]["content"], "", tokenizer, fmt)
    if fmt.template == "eot":
        eot = fmt.end_of_turn_token or DEFAULT_EOT_TOKEN
        return "".join(turn["content"] + eot for turn in turns)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("a multi-turn prompt needs the tokenizer's chat template (template "
                         f"{fmt.template!r}); this tokenizer has none")
    return tokenizer.apply_chat_template([dict(t) for t in turns], tokenize=False,
                                         add_generation_prompt=True)


@dataclass
class Tokenised:
    input_ids: list[int]
    labels: list[int]
    trimmed: bool


def tokenise(record: dict[str, Any], tokenizer: Any, fmt: SftFormat, max_length: int) -> Tokenised:
    """Token ids and labels (-100 outside responses), trimmed to ``max_length`` tokens."""
    if fmt.template == "raw":
        return tokenise_raw(record, tokenizer, max_length)
    text, spans = render(record, tokenizer, fmt)
    encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    labels = []
    for token, (start, end) in zip(ids, offsets, strict=True):
        inside = end > start and any(s <= start < e for s, e in spans)
        labels.append(token if inside else IGNORE_INDEX)
    trimmed = len(ids) > max_length
    return Tokenised(ids[:max_length], labels[:max_length], trimmed)


def tokenise_raw(record: dict[str, Any], tokenizer: Any, max_length: int) -> Tokenised:
    """Prompt ids then response ids (+ EOS), tokenised apart; the prompt's end is kept."""
    prompt = tokenizer(raw_prompt(record), add_special_tokens=True)["input_ids"]
    answer = tokenizer(record["output"], add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        answer = answer + [tokenizer.eos_token_id]
    trimmed = len(prompt) + len(answer) > max_length
    if trimmed:
        keep = max(0, max_length - len(answer))
        prompt = prompt[len(prompt) - keep:] if keep else []
        answer = answer[:max_length - len(prompt)]
    return Tokenised(prompt + answer, [IGNORE_INDEX] * len(prompt) + answer, trimmed)


@dataclass
class TokenisedSet:
    sequences: list[Tokenised]
    examples: int
    trimmed: int
    dropped_no_response: int  # prompt alone filled max_length: nothing left to learn from
    tokens: int

    def counts(self) -> dict[str, int]:
        return {"examples": self.examples, "trimmed": self.trimmed,
                "dropped_no_response_tokens": self.dropped_no_response,
                "sequences": len(self.sequences), "tokens": self.tokens}


def tokenise_all(records: Iterable[dict[str, Any]], tokenizer: Any, fmt: SftFormat,
                 max_length: int) -> TokenisedSet:
    """Every record tokenised with its response-only labels (packing is the trainer's: TRL's
    padding-free packing keeps the examples apart)."""
    kept: list[Tokenised] = []
    examples = trimmed = dropped = 0
    for record in records:
        examples += 1
        item = tokenise(record, tokenizer, fmt, max_length)
        trimmed += item.trimmed
        if all(label == IGNORE_INDEX for label in item.labels):
            dropped += 1
            continue
        kept.append(item)
    return TokenisedSet(kept, examples, trimmed, dropped, sum(len(s.input_ids) for s in kept))
