"""Tokenization with exact prompt masking.

The prompt and the response are tokenized *separately* and their ids concatenated,
so the masked span is exactly the prompt's tokens: a BPE merge across the
prompt/response boundary cannot move it. (Caveat: SentencePiece tokenizers that
add a dummy prefix space will add one at the start of the response too.)

Labels are ``-100`` on masked tokens (the prompt, or non-assistant chat turns),
the token id elsewhere. Over-long examples lose the end of their response; a prompt
that leaves no room for a response token is an error.
"""

from __future__ import annotations

from typing import Any, Sequence

from gptqlora.data.records import DataError

IGNORE_INDEX = -100


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def bos_prefix(tokenizer: Any) -> list[int]:
    """``[bos_id]`` if the tokenizer puts BOS in front of text by default, else ``[]``."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    with_special = tokenizer("", add_special_tokens=True)["input_ids"]
    return [bos] if list(with_special[:1]) == [bos] else []


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Ids of a prompt as ``encode_example`` would feed it (BOS included if the tokenizer uses one)."""
    return bos_prefix(tokenizer) + _ids(tokenizer, prompt)


def _where(where: str | None) -> str:
    return f"{where}: " if where else ""


def encode_example(
    tokenizer: Any,
    prompt: str,
    response: str,
    cutoff_len: int,
    train_on_inputs: bool,
    add_eos: bool = True,
    where: str | None = None,
) -> dict[str, list[int]]:
    """Encode one prompt/response pair -> ``input_ids``, ``attention_mask``, ``labels`` (lists, same length).

    ``where`` (e.g. ``"data.jsonl:12"``) is put in front of error messages.
    """
    prompt_ids = encode_prompt(tokenizer, prompt)
    response_ids = _ids(tokenizer, response)
    if add_eos:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token; pass add_eos=False or set one")
        response_ids.append(tokenizer.eos_token_id)
    if len(prompt_ids) >= cutoff_len:
        raise DataError(
            f"{_where(where)}the prompt is {len(prompt_ids)} tokens but cutoff_len is {cutoff_len}, "
            "leaving no room for the response; raise cutoff_len or shorten this record"
        )
    response_ids = response_ids[: cutoff_len - len(prompt_ids)]  # truncation drops EOS too
    input_ids = prompt_ids + response_ids
    prompt_labels = list(prompt_ids) if train_on_inputs else [IGNORE_INDEX] * len(prompt_ids)
    return {
        "input_ids": input_ids,
        "attention_mask": [1] * len(input_ids),
        "labels": prompt_labels + list(response_ids),
    }


def chat_segments(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[tuple[str, bool]]:
    """Split a rendered chat into ``(text, is_assistant)`` pieces whose concatenation is the full render.

    Rendering is incremental: the text up to each assistant turn (with the
    generation prompt) is masked, the assistant turn itself (including its
    end-of-turn tokens) is trained on.
    """

    def render(msgs: Sequence[dict[str, str]], gen: bool) -> str:
        return tokenizer.apply_chat_template(list(msgs), tokenize=False, add_generation_prompt=gen)

    segments: list[tuple[str, bool]] = []
    done = ""  # rendered text covered by segments so far
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(messages[:i], gen=True) if i else render([], gen=True)
        through = render(messages[: i + 1], gen=False)
        if not before.startswith(done) or not through.startswith(before):
            raise ValueError(
                "the chat template does not render conversations incrementally (a prefix changes "
                "when turns are added), so assistant turns cannot be masked exactly"
            )
        segments.append((before[len(done) :], False))
        segments.append((through[len(before) :], True))
        done = through
    tail = render(messages, gen=False)[len(done) :]
    if tail:
        segments.append((tail, False))
    return [(t, a) for t, a in segments if t]


def encode_chat(
    tokenizer: Any,
    messages: Sequence[dict[str, str]],
    cutoff_len: int,
    train_on_inputs: bool,
    where: str | None = None,
) -> dict[str, list[int]]:
    """Encode a chat with ``tokenizer.apply_chat_template``; only assistant turns are trained on.

    The chat template is expected to add BOS and end-of-turn tokens itself.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the tokenizer has no chat_template; chat records need one")
    input_ids: list[int] = []
    labels: list[int] = []
    first_trained = None
    for text, trained in chat_segments(tokenizer, messages):
        ids = _ids(tokenizer, text)
        if trained and first_trained is None:
            first_trained = len(input_ids)
        input_ids += ids
        labels += ids if (trained or train_on_inputs) else [IGNORE_INDEX] * len(ids)
    if first_trained is None or first_trained >= cutoff_len:
        raise DataError(
            f"{_where(where)}the first assistant turn starts at token {first_trained} but cutoff_len is "
            f"{cutoff_len}; raise cutoff_len or shorten the conversation"
        )
    return {
        "input_ids": input_ids[:cutoff_len],
        "attention_mask": [1] * min(len(input_ids), cutoff_len),
        "labels": labels[:cutoff_len],
    }


def encode_record(
    tokenizer: Any,
    record: dict[str, Any],
    kind: str,
    template: Any,
    cutoff_len: int,
    train_on_inputs: bool,
    where: str | None = None,
) -> dict[str, list[int]]:
    """Encode a validated record of ``kind`` ("alpaca" | "cot" | "chat") with ``template`` (a PromptTemplate).

    Chat records ignore ``template`` and use the tokenizer's chat template.
    """
    if kind == "chat":
        return encode_chat(tokenizer, record["messages"], cutoff_len, train_on_inputs, where=where)
    return encode_example(
        tokenizer, template.prompt(record), template.response(record), cutoff_len, train_on_inputs, where=where
    )
