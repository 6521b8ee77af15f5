"""Field mappings: one record of a known instruction format -> the parts of an :class:`Example`.

Formats (``ingest.format``):

- ``alpaca``: ``instruction``, ``input``, ``output`` (plus optional ``history`` and ``system``,
  as LIMA and LLaMA-Factory write them);
- ``dolly``: ``instruction``, ``context``, ``response`` (``category`` and the rest go to metadata);
- ``lima``: Alpaca plus ``history`` = earlier ``[user, assistant]`` turns, in order; LIMA's
  own ``conversations: [user, assistant, ...]`` strings are read too;
- ``sharegpt``: ``conversations: [{from, value}]``, ``from`` in human/gpt/system;
- ``messages``: OpenAI chat ``messages: [{role, content}]``.

A mapper raises :class:`Rejected` with the offending field and a plain reason;
it never guesses a value. Fields it does not map go to ``metadata``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gleaner.schema import Turn

FORMATS = ("alpaca", "dolly", "lima", "sharegpt", "messages")

SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "system": "system",
}
MESSAGE_ROLES = {
    "user": "user",
    "assistant": "assistant",
    "system": "system",
    "developer": "system",
}


class Rejected(Exception):
    """A record that cannot become an example: goes to quarantine with code, field and reason."""

    def __init__(self, code: str, field: str | None, reason: str):
        super().__init__(reason)
        self.code = code
        self.field = field
        self.reason = reason


@dataclass
class Mapped:
    """The parts of an example, plus every text with the source field it came from
    (so size and encoding problems name the field as the user knows it)."""

    instruction: str
    input: str
    output: str
    history: list[Turn] = field(default_factory=list)
    system: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    texts: list[tuple[str, str]] = field(default_factory=list)
    output_field: str = "output"  # where the response lives, for "no response" messages


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _string(value: Any, label: str) -> str:
    if isinstance(value, str):
        return value
    raise Rejected("not_a_string", label, f"field '{label}' is a {json_type(value)}, not a string")


def _optional(record: dict[str, Any], key: str) -> str:
    value = record.get(key)
    return "" if value is None else _string(value, key)


def _instruction(record: dict[str, Any], key: str = "instruction") -> str:
    value = record.get(key)
    if value is None:
        raise Rejected("missing_instruction", key, f"lacks an instruction: no '{key}' field")
    text = _string(value, key)
    if not text.strip():
        raise Rejected("missing_instruction", key, f"lacks an instruction: '{key}' is empty")
    return text


def _rest(record: dict[str, Any], mapped: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in mapped}


def _single_turn(record: dict[str, Any], instruction: str, input: str, output: str) -> Mapped:
    ins, inp, out = (
        _instruction(record, instruction),
        _optional(record, input),
        _optional(record, output),
    )
    return Mapped(
        ins,
        inp,
        out,
        metadata=_rest(record, (instruction, input, output)),
        texts=[(instruction, ins), (input, inp), (output, out)],
        output_field=output,
    )


def map_alpaca(record: dict[str, Any]) -> Mapped:
    """Alpaca, with the optional ``history`` and ``system`` of LIMA / LLaMA-Factory's Alpaca
    layout (what :mod:`tasks.export` writes), so multi-turn examples survive a round trip."""
    mapped = _single_turn(record, "instruction", "input", "output")
    history = mapped.metadata.pop("history", None)
    system = mapped.metadata.pop("system", None)
    if system is not None:
        mapped.system = _string(system, "system")
        mapped.texts.append(("system", mapped.system))
    if history is None:
        return mapped
    if not isinstance(history, list):
        raise Rejected(
            "bad_conversation",
            "history",
            f"'history' is a {json_type(history)}, not a list of [user, assistant] turns",
        )
    turns: list[Turn] = []
    for i, pair in enumerate(history):
        if not isinstance(pair, list | tuple) or len(pair) != 2:
            raise Rejected(
                "bad_conversation",
                f"history[{i}]",
                f"'history[{i}]' is not a [user, assistant] pair",
            )
        user = _string(pair[0], f"history[{i}][0]")
        assistant = _string(pair[1], f"history[{i}][1]")
        turns += [Turn("user", user), Turn("assistant", assistant)]
        mapped.texts += [(f"history[{i}][0]", user), (f"history[{i}][1]", assistant)]
    mapped.history = turns
    return mapped


def map_dolly(record: dict[str, Any]) -> Mapped:
    return _single_turn(record, "instruction", "context", "response")


def map_lima(record: dict[str, Any]) -> Mapped:
    if "instruction" not in record and "conversations" in record:
        return _lima_conversations(record)
    return map_alpaca(record)


def _lima_conversations(record: dict[str, Any]) -> Mapped:
    """LIMA's native form: alternating user/assistant strings (the test set has one prompt)."""
    conversation = record["conversations"]
    if isinstance(conversation, str):
        conversation = [conversation]
    if not isinstance(conversation, list) or not conversation:
        raise Rejected("bad_conversation", "conversations", "'conversations' holds no turns")
    texts = [_string(text, f"conversations[{i}]") for i, text in enumerate(conversation)]
    roles = ["user" if i % 2 == 0 else "assistant" for i in range(len(texts))]
    turns = [
        (f"conversations[{i}]", role, text)
        for i, (role, text) in enumerate(zip(roles, texts, strict=True))
    ]
    return _from_turns(turns, _rest(record, ("conversations",)), "conversations")


def _from_turns(
    turns: list[tuple[str, str, str]], metadata: dict[str, Any], key: str
) -> Mapped:
    """(label, role, content) turns -> final exchange + history; leading system turns -> system."""
    system_parts: list[tuple[str, str]] = []
    while turns and turns[0][1] == "system":
        label, _, content = turns.pop(0)
        system_parts.append((label, content))
    for label, role, _ in turns:
        if role == "system":
            raise Rejected(
                "bad_conversation",
                label,
                f"'{label}' is a system turn after the conversation started",
            )
    if not turns:
        raise Rejected(
            "missing_instruction", None, "lacks an instruction: the conversation has no user turn"
        )
    if turns[-1][1] == "assistant":
        if len(turns) < 2 or turns[-2][1] != "user":
            raise Rejected(
                "bad_conversation", turns[-1][0], "the last response does not follow a user turn"
            )
        final_user, final_assistant, earlier = turns[-2], turns[-1][2], turns[:-2]
    else:
        final_user, final_assistant, earlier = turns[-1], "", turns[:-1]
    if not final_user[2].strip():
        raise Rejected(
            "missing_instruction",
            final_user[0],
            f"lacks an instruction: '{final_user[0]}' is empty",
        )
    return Mapped(
        instruction=final_user[2],
        input="",
        output=final_assistant,
        history=[Turn(role, content) for _, role, content in earlier],
        system="\n\n".join(content for _, content in system_parts),
        metadata=metadata,
        texts=system_parts + [(label, content) for label, _, content in turns],
        output_field=key,
    )


def _turn_list(
    record: dict[str, Any], key: str, role_key: str, content_key: str, roles: dict[str, str]
) -> list[tuple[str, str, str]]:
    conversation = record.get(key)
    if conversation is None:
        raise Rejected("missing_instruction", key, f"lacks an instruction: no '{key}' field")
    if not isinstance(conversation, list):
        raise Rejected(
            "bad_conversation", key, f"'{key}' is a {json_type(conversation)}, not a list"
        )
    turns = []
    for i, turn in enumerate(conversation):
        label = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise Rejected(
                "bad_conversation", label, f"'{label}' is a {json_type(turn)}, not an object"
            )
        speaker = turn.get(role_key)
        role = roles.get(speaker) if isinstance(speaker, str) else None
        if role is None:
            raise Rejected(
                "bad_conversation",
                f"{label}.{role_key}",
                f"'{label}.{role_key}' is {speaker!r}, not one of {sorted(set(roles))}",
            )
        content = _string(turn.get(content_key), f"{label}.{content_key}")
        turns.append((f"{label}.{content_key}", role, content))
    return turns


def map_sharegpt(record: dict[str, Any]) -> Mapped:
    turns = _turn_list(record, "conversations", "from", "value", SHAREGPT_ROLES)
    return _from_turns(turns, _rest(record, ("conversations",)), "conversations")


def map_messages(record: dict[str, Any]) -> Mapped:
    turns = _turn_list(record, "messages", "role", "content", MESSAGE_ROLES)
    return _from_turns(turns, _rest(record, ("messages",)), "messages")


MAPPERS: dict[str, Callable[[dict[str, Any]], Mapped]] = {
    "alpaca": map_alpaca,
    "dolly": map_dolly,
    "lima": map_lima,
    "sharegpt": map_sharegpt,
    "messages": map_messages,
}


def detect_format(record: Any) -> str | None:
    """The format a record looks like, from its keys; None when it matches none."""
    if not isinstance(record, dict):
        return None
    if isinstance(record.get("messages"), list):
        return "messages"
    conversations = record.get("conversations")
    if isinstance(conversations, list) and conversations and isinstance(conversations[0], dict):
        return "sharegpt"
    if isinstance(conversations, list | str):
        return "lima"
    if "instruction" in record:
        if "history" in record:
            return "lima"
        if "response" in record or "context" in record:
            return "dolly"
        return "alpaca"
    return None
