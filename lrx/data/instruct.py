"""Instruct format: JSONL prompt/response, Alpaca or chat ``messages`` for causal-LM tuning.

Each line is one of ``{"prompt", "response"}``, Alpaca ``{"instruction", "input"?, "output"}``
or ``{"messages": [{"role", "content"}, ...]}`` whose last message is the assistant's.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import datasets

from lrx.data.collate import IGNORE_INDEX
from lrx.data.files import nul_message, reading, shown
from lrx.data.tokens import TokenCache
from lrx.errors import DataError

logger = logging.getLogger(__name__)

PLAIN_PROMPT_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"
"""Prompt format used when the tokenizer has no chat template."""

_ROLES = ("system", "user", "assistant")


def _has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _eos_text(tokenizer: Any) -> str:
    """End-of-sequence marker appended to responses (EOS, else SEP, else nothing)."""
    return tokenizer.eos_token or tokenizer.sep_token or ""


def _render_messages(tokenizer: Any, history: list[dict[str, str]]) -> str:
    """Renders the conversation before the final assistant turn as prompt text."""
    if _has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=False)
    if not history:
        text = ""
    elif history[-1]["role"] == "user" and all(m["role"] == "system" for m in history[:-1]):
        # The common single-turn case (optionally with a system message): plain text.
        text = "\n\n".join(m["content"] for m in history)
    else:
        # Multi-turn without a chat template: label each turn so roles stay visible.
        text = "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in history)
    return PLAIN_PROMPT_TEMPLATE.format(prompt=text)


def prompt_add_special_tokens(tokenizer: Any) -> bool:
    """Whether rendered prompts are tokenized with the tokenizer's special tokens.

    A chat template already writes the model's special tokens (BOS etc.) into the text,
    so its prompts use ``add_special_tokens=False``; the plain template relies on the
    tokenizer adding them (``True``). Use this when tokenizing ``render_prompt`` output
    so inference sees the same ids as training.
    """
    return not _has_chat_template(tokenizer)


def render_prompt(tokenizer: Any, prompt_text: str) -> str:
    """Renders one user message exactly as training prompts are rendered.

    Tokenize the result with
    ``add_special_tokens=prompt_add_special_tokens(tokenizer)`` to get the training ids.

    Args:
        tokenizer: A Hugging Face tokenizer.
        prompt_text: The user's message.

    Returns:
        The prompt string, ending where the model's response should begin.
    """
    return _render_messages(tokenizer, [{"role": "user", "content": prompt_text}])


def _parse_instruct_record(obj: Any, where: str) -> tuple[list[dict[str, str]], str]:
    """Validates one JSONL record; returns (messages before the answer, answer text)."""
    if not isinstance(obj, dict):
        raise DataError(
            f"{where}: expected a JSON object, got {type(obj).__name__}; write one object per line"
        )
    if "messages" in obj:
        history = _parse_messages(obj["messages"], where)
        return history[:-1], history[-1]["content"]
    if "prompt" in obj and "response" in obj:
        prompt = _text(where, "prompt", obj["prompt"])
        return [{"role": "user", "content": prompt}], _text(where, "response", obj["response"])
    if "instruction" in obj and "output" in obj:
        prompt = _text(where, "instruction", obj["instruction"])
        extra = obj.get("input")
        if extra:  # Alpaca's optional context goes after the instruction.
            prompt = f"{prompt}\n\n{_text(where, 'input', extra)}"
        return [{"role": "user", "content": prompt}], _text(where, "output", obj["output"])
    keys = ", ".join(shown(k) for k in list(obj)[:8]) or "none"
    raise DataError(
        f"{where}: unrecognised record (keys: {keys}); use 'prompt'+'response', "
        "'instruction'+'output' (Alpaca) or 'messages'"
    )


def _parse_messages(msgs: Any, where: str) -> list[dict[str, str]]:
    """Validates a ``messages`` list whose last turn is the assistant's answer."""
    if not isinstance(msgs, list) or not msgs:
        raise DataError(
            f"{where}: 'messages' must be a non-empty list of {{role, content}} objects"
        )
    history = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            got = m.get("role") if isinstance(m, dict) else m
            raise DataError(
                f"{where}: messages[{i}] needs a 'role' of system/user/assistant "
                f"(got {shown(got)}); fix that line"
            )
        content = _text(where, f"messages[{i}].content", m.get("content"))
        history.append({"role": m["role"], "content": content})
    if history[-1]["role"] != "assistant":
        raise DataError(
            f"{where}: the last message must have role 'assistant' "
            f"(got {history[-1]['role']!r}); "
            "it is the training target"
        )
    return history


def _text(where: str, key: str, value: Any) -> str:
    """``value`` if it is a string that UTF-8 can hold; DataError naming ``key`` otherwise."""
    if not isinstance(value, str):
        raise DataError(
            f"{where}: {key!r} must be a string, got {type(value).__name__}; fix that line"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate escape such as "\ud800"
        raise DataError(
            f"{where}: {key!r} holds an unpaired surrogate escape (\\ud800-\\udfff), "
            "which is not text; fix that line"
        ) from None
    return value


def _parse_json_line(line: str, where: str) -> Any:
    """One JSONL line as a Python object; DataError naming the line otherwise."""
    if "\x00" in line:
        raise DataError(nul_message(where))
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{where}: malformed JSON ({e.msg} at column {e.colno}); "
            "each line must be one complete JSON object"
        ) from None
    except (RecursionError, ValueError) as e:  # nesting too deep, integers over 4,300 digits
        what = "nested too deeply" if isinstance(e, RecursionError) else "a number too long"
        raise DataError(
            f"{where}: malformed JSON ({what}); each line must be one JSON object of strings"
        ) from None


def read_instruct(path: Path, tokenizer: Any) -> datasets.Dataset:
    """Reads an instruct JSONL file into rendered ``prompt`` / ``response`` strings."""
    prompts: list[str] = []
    responses: list[str] = []
    eos = _eos_text(tokenizer)
    with reading(path), path.open(encoding="utf-8-sig") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            history, response = _parse_instruct_record(_parse_json_line(line, where), where)
            try:
                prompts.append(_render_messages(tokenizer, history))
            except Exception as e:  # Jinja errors from templates that reject the roles
                raise DataError(
                    f"{where}: the tokenizer's chat template rejected this "
                    f"conversation ({type(e).__name__}: {e}); fix the messages for this model"
                ) from None
            responses.append(response + eos)
    if not prompts:
        raise DataError(f"{path}: no examples found; the file is empty or has only blank lines")
    return datasets.Dataset.from_dict({"prompt": prompts, "response": responses})


def tokenize_instruct(
    ds: datasets.Dataset, tokenizer: Any, max_length: int, mask_prompt: bool, cache: TokenCache
) -> datasets.Dataset:
    """Tokenizes prompt and response separately so the label boundary is exact.

    Examples whose prompt fills ``max_length`` are dropped; ``check_tokenized`` reports them.
    """
    prompt_special = prompt_add_special_tokens(tokenizer)

    def tokenize(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        p_ids = tokenizer(batch["prompt"], add_special_tokens=prompt_special)["input_ids"]
        r_ids = tokenizer(batch["response"], add_special_tokens=False)["input_ids"]
        out: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
        for p, r in zip(p_ids, r_ids):
            if len(p) >= max_length or not r:
                continue  # no response token would survive truncation: nothing to learn
            ids = (list(p) + list(r))[:max_length]  # keep the start
            prompt_labels = [IGNORE_INDEX] * len(p) if mask_prompt else list(p)
            out["input_ids"].append(ids)
            out["labels"].append((prompt_labels + list(r))[:max_length])
        return out

    return cache.map(ds, tokenize, datasets.List(datasets.Value("int64")), tokenizer,
                     kind="instruct", max_length=max_length, mask_prompt=mask_prompt,
                     prompt_special=prompt_special)


def check_tokenized(
    raw: datasets.Dataset, out: datasets.Dataset, path: Path, max_length: int
) -> datasets.Dataset:
    """Warns about the examples ``tokenize_instruct`` dropped; DataError when none is left."""
    dropped = len(raw) - len(out)
    if dropped:
        logger.warning(
            "%s: dropped %d of %d examples whose prompt fills max_length=%d "
            "(no response token left); raise data.max_length or shorten those prompts",
            path, dropped, len(raw), max_length,
        )
    if len(out) == 0:
        raise DataError(
            f"{path}: every example's prompt is at least max_length={max_length} tokens long; "
            "raise data.max_length"
        )
    return out
