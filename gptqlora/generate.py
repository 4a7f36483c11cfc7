"""Inference on a run (or a quantized base plus adapters): loading, prompt rendering, batched generation.

`gptqlora generate` writes one JSON line per prompt; `gptqlora chat` (gptqlora/chat.py) builds on the
loading, prompt rendering and sampling settings here.
"""

from __future__ import annotations

import json
import logging
import re
import string
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence, TextIO

import torch

from gptqlora.data.templates import PromptTemplate
from gptqlora.data.tokenize import encode_prompt

logger = logging.getLogger(__name__)

OFF = "off"  # adapter "name" meaning: the base model alone
_NAME = re.compile(r"[\w-]+")  # PEFT keeps adapters in ModuleDicts: no dots


class InferenceError(ValueError):
    """A setting or input of `chat` / `generate` that the user can fix."""


# -- sampling -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sampling:
    """Decoding settings; temperature 0 means greedy."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise InferenceError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise InferenceError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InferenceError(f"--top-p must be in (0, 1], got {self.top_p}")

    def generate_kwargs(self, tokenizer: Any) -> dict[str, Any]:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        kw: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "pad_token_id": pad,
                              "eos_token_id": tokenizer.eos_token_id}
        if self.temperature == 0:
            # None overrides sampling values a model's generation_config may carry (no warnings).
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kw.update(do_sample=True, temperature=self.temperature, top_p=self.top_p)
        return kw


# -- prompt rendering -----------------------------------------------------------------------------------


def message_field(template: PromptTemplate) -> str:
    """The template field a user's message goes into (``instruction`` for alpaca, ``question`` for cot)."""
    names = {n for _, n, _, _ in string.Formatter().parse(template.prompt_no_input) if n} - {"input"}
    if len(names) != 1:
        raise InferenceError(f"prompt template {template.name!r} needs fields {sorted(names)}; chat and generate "
                             f"need a template with one field for the message, or use --chat-template")
    return names.pop()


@dataclass(frozen=True)
class PromptFormat:
    """How a conversation becomes token ids.

    mode "template": the run's prompt template. Earlier turns are rendered as complete examples
    (prompt + response), one after another, then the new message as a prompt: each piece is exactly
    the format the model was trained on, so it reads the history like few-shot examples.
    mode "chat": the tokenizer's chat template. mode "raw": the message is the prompt, as is.
    ``system`` (optional) is the system message (chat) or a paragraph before everything (template, raw).
    """

    mode: str
    template: PromptTemplate | None = None
    system: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("template", "chat", "raw") or (self.mode == "template") != (self.template is not None):
            raise ValueError(f"PromptFormat: mode {self.mode!r} with template {self.template!r}")

    def text(self, history: Sequence[tuple[str, str]], message: str, tokenizer: Any,
             input_text: str | None = None) -> str:
        if self.mode == "chat":
            msgs = [{"role": "system", "content": self.system}] if self.system else []
            for user, assistant in history:
                msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
            msgs.append({"role": "user", "content": message})
            try:
                return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            except Exception as e:  # jinja errors, e.g. a template that rejects system messages
                raise InferenceError(f"the tokenizer's chat template failed on this conversation ({e}); "
                                     f"drop --system or use the run's prompt template") from None
        head = f"{self.system}\n\n" if self.system else ""
        if self.mode == "raw":
            return head + "".join(f"{u}{a}" for u, a in history) + message
        tpl = self.template
        key = message_field(tpl)
        past = "".join(tpl.prompt({key: u}) + a + "\n\n" for u, a in history)
        return head + past + tpl.prompt({key: message, "input": input_text or ""})

    def encode(self, history: Sequence[tuple[str, str]], message: str, tokenizer: Any,
               input_text: str | None = None) -> list[int]:
        text = self.text(history, message, tokenizer, input_text)
        if self.mode == "chat":  # chat templates put BOS in themselves
            return list(tokenizer(text, add_special_tokens=False)["input_ids"])
        return encode_prompt(tokenizer, text)


# -- loading --------------------------------------------------------------------------------------------


@dataclass
class Loaded:
    """A model ready for inference and what goes with it."""

    model: Any
    tokenizer: Any
    template: PromptTemplate
    adapters: list[str]  # loaded adapter names, in load order (the first is active)
    chat_data: bool = False  # the run trained on chat records only
    source: str = ""  # what was loaded, for display
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def max_position_embeddings(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    def prompt_format(self, chat_template: bool = False, system: str | None = None,
                      raw: bool = False) -> PromptFormat:
        if raw:
            return PromptFormat("raw", system=system)
        if chat_template or self.chat_data:
            if getattr(self.tokenizer, "chat_template", None) is None:
                raise InferenceError(f"{self.source}: the tokenizer has no chat_template; use the prompt "
                                     f"template instead (drop --chat-template, or pass --template NAME)")
            return PromptFormat("chat", system=system)
        message_field(self.template)  # fail now, not at the first message
        return PromptFormat("template", self.template, system)

    def context_size(self, max_context: int | None, sampling: Sampling) -> int:
        """Tokens a prompt plus its reply may take; checks that a reply fits at all."""
        size = max_context or self.max_position_embeddings
        if size is None:
            raise InferenceError("the model config has no max_position_embeddings; pass --max-context")
        if sampling.max_new_tokens >= size:
            raise InferenceError(f"--max-new-tokens {sampling.max_new_tokens} leaves no room for a prompt in a "
                                 f"context of {size} tokens; lower it (or raise --max-context)")
        return size


def parse_adapter_spec(spec: str) -> tuple[str, Path]:
    """``NAME=PATH`` or ``PATH`` (a PEFT adapter folder or a run folder) -> (name, adapter folder)."""
    name, sep, path = spec.partition("=")
    if not sep:
        name, path = "", spec
    p = Path(path)
    if (p / "run.json").is_file() and (p / "adapter").is_dir():
        p = p / "adapter"
    if not name:  # named after its folder (runs/x/adapter -> x)
        folder = p.resolve()
        name = re.sub(r"[^\w-]", "_", folder.parent.name if folder.name == "adapter" else folder.name)
    if not _NAME.fullmatch(name) or name == OFF:
        raise InferenceError(f"--adapter {spec!r}: the name must be letters, digits, '_' or '-', and not "
                             f"{OFF!r}; write it as NAME=PATH")
    return name, p


def _first_record(path: str) -> Any:
    """The first record of a JSON Lines or JSON array file, read from its head only (None if unreadable)."""
    try:
        with open(path, encoding="utf-8") as f:
            head = f.read(1 << 16).lstrip()
        if head.startswith("["):
            return json.JSONDecoder().raw_decode(head[1:].lstrip())[0]
        return json.loads(head.split("\n", 1)[0])
    except (OSError, ValueError):
        return None


def _run_chat_data(info: Mapping[str, Any]) -> bool:
    """Whether every training file of a run held chat records (then chat uses the chat template)."""
    from gptqlora.data.records import detect_kind

    if "data_kinds" in info:  # recorded by finetune; older runs: look at the files
        return info["data_kinds"] == ["chat"]
    records = [_first_record(p) for p in info.get("data") or []]
    return bool(records) and all(isinstance(r, dict) and detect_kind(r) == "chat" for r in records)


def load_model(run_dir: str | Path | None = None, base: str | Path | None = None,
               adapters: Sequence[str] = (), device: str | None = None,
               template: str | None = None) -> Loaded:
    """A run's base with its adapter (``run_dir``), or a quantized ``base``; plus extra ``adapters`` specs."""
    from gptqlora.adapters.model import load_adapter
    from gptqlora.run import load_run, load_run_tokenizer, read_run_info

    if (run_dir is None) == (base is None):
        raise InferenceError("give a run folder (RUN_DIR) or --base CHECKPOINT, not both")
    specs = [parse_adapter_spec(s) for s in adapters]
    names: list[str] = []
    info: dict[str, Any] = {}
    if run_dir is not None:
        info = read_run_info(run_dir)
        names.append(parse_adapter_spec(str(run_dir))[0])
        model = load_run(run_dir, device=device, adapter_name=names[0])
        tokenizer = load_run_tokenizer(run_dir)
        tpl = PromptTemplate.load(template) if template else PromptTemplate.from_dict(info["template"])
        source = str(run_dir)
    else:
        from gptqlora.quant.checkpoint import load_quantized
        from transformers import AutoTokenizer

        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = load_quantized(base, device=dev, dtype=torch.float16 if dev.type == "cuda" else torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(base)
        tpl = PromptTemplate.load(template or "alpaca")
        source = str(base)
    for name, path in specs:
        if name in names:
            raise InferenceError(f"adapter name {name!r} is used twice; name them with --adapter NAME=PATH")
        model = load_adapter(model, path, adapter_name=name)
        names.append(name)
    if names:
        model.set_adapter(names[0], inference_mode=True)
    model.eval()
    return Loaded(model, tokenizer, tpl, names, chat_data=_run_chat_data(info), source=source, info=info)


@contextmanager
def using_adapter(model: Any, name: str | None) -> Iterator[None]:
    """Generate with adapter ``name``, or with the base model alone for None / "off"."""
    if name in (None, OFF):
        with model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext():
            yield
        return
    model.set_adapter(name, inference_mode=True)
    yield


# -- batched generation ---------------------------------------------------------------------------------


@torch.inference_mode()
def generate_responses(model: Any, tokenizer: Any, prompts: Sequence[list[int]], sampling: Sampling,
                       batch_size: int = 8) -> list[str]:
    """Completions (new tokens only, decoded) of tokenized prompts, in input order; left-padded batches."""
    from gptqlora.eval.accuracy import generate_responses as batched

    kw = sampling.generate_kwargs(tokenizer)
    return batched(model, tokenizer, prompts, kw.pop("max_new_tokens"), batch_size, **kw)


# -- prompt files ---------------------------------------------------------------------------------------


def read_prompts(path: str, fmt: str = "auto", stdin: TextIO | None = None) -> list[tuple[str, dict[str, Any]]]:
    """(location, item) per prompt; an item is {"prompt": str, ...other fields kept}.

    Text: one prompt per line (blank lines skipped). JSON Lines (``.jsonl``, or ``fmt="jsonl"``): objects
    with a "prompt" string, an optional "input" string (template context) and any other fields.
    ``-`` reads standard input.
    """
    name = "<stdin>" if path == "-" else path
    if path == "-":
        text = (stdin or sys.stdin).read()
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise InferenceError(f"{path}: prompts file not found") from None
        except UnicodeDecodeError as e:
            raise InferenceError(f"{path}: not UTF-8 text ({e}); save it as UTF-8") from None
    jsonl = fmt == "jsonl" or (fmt == "auto" and name.endswith(".jsonl"))
    items = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{name}:{lineno}"
        if not jsonl:
            items.append((where, {"prompt": line}))
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InferenceError(f"{where}: invalid JSON ({e.msg}, column {e.colno}); each line must be one "
                                 f'object like {{"prompt": "..."}}') from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise InferenceError(f'{where}: needs a "prompt" string field, e.g. {{"prompt": "..."}}')
        if not isinstance(obj.get("input", ""), str):
            raise InferenceError(f'{where}: "input" must be a string')
        items.append((where, obj))
    if not items:
        raise InferenceError(f"{name}: no prompts (the input is empty); give one prompt per line"
                             + (' or one {"prompt": ...} object per line' if jsonl else ""))
    return items


def generate_file(loaded: Loaded, fmt: PromptFormat, prompts_path: str, out: TextIO, sampling: Sampling,
                  file_format: str = "auto", stdin: TextIO | None = None, **kw: Any) -> int:
    """`generate_items` on the prompts of a file (see `read_prompts`)."""
    return generate_items(loaded, fmt, read_prompts(prompts_path, file_format, stdin), out, sampling, **kw)


def generate_items(loaded: Loaded, fmt: PromptFormat, items: Sequence[tuple[str, dict[str, Any]]], out: TextIO,
                   sampling: Sampling, use: Sequence[str | None] | None = None, batch_size: int = 8,
                   max_context: int | None = None) -> int:
    """Write {"prompt", "response", "adapter", ...} JSON lines for each prompt (and each adapter in ``use``).

    Prompts are done in chunks so output appears as it goes; within a chunk all adapters run, and lines
    come out in input order (per prompt: one line per adapter). Returns the number of lines written.
    """
    if batch_size < 1:
        raise InferenceError(f"--batch-size must be at least 1, got {batch_size}")
    use = list(use) if use else [loaded.adapters[0] if loaded.adapters else OFF]
    for name in use:
        if name not in (None, OFF) and name not in loaded.adapters:
            raise InferenceError(f"no adapter {name!r}; loaded: {', '.join(loaded.adapters) or 'none'} "
                                 f"(or {OFF!r} for the base model)")
    limit = loaded.context_size(max_context, sampling) - sampling.max_new_tokens
    encoded = []
    for where, item in items:  # all checked before any generation
        ids = fmt.encode([], item["prompt"], loaded.tokenizer, item.get("input"))
        if len(ids) > limit:
            raise InferenceError(f"{where}: the prompt is {len(ids)} tokens; with --max-new-tokens "
                                 f"{sampling.max_new_tokens} at most {limit} fit the context; shorten it")
        encoded.append(ids)
    written = 0
    chunk = batch_size * 4
    for start in range(0, len(items), chunk):
        ids = encoded[start : start + chunk]
        results = {}
        for name in use:
            with using_adapter(loaded.model, name):
                results[name] = generate_responses(loaded.model, loaded.tokenizer, ids, sampling, batch_size)
        for k, (_, item) in enumerate(items[start : start + chunk]):
            for name in use:
                text = results[name][k]
                row = {**item, "response": text if fmt.mode == "raw" else text.strip(),
                       "adapter": None if name in (None, OFF) else name}
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
                written += 1
        out.flush()
    logger.info("wrote %d responses", written)
    return written


def run_generate(prompts: str, run_dir: str | None = None, base: str | None = None,
                 adapters: Sequence[str] = (), use: Sequence[str] = (), template: str | None = None,
                 chat_template: bool = False, raw: bool = False, system: str | None = None,
                 sampling: Sampling | None = None, batch_size: int = 8, max_context: int | None = None,
                 file_format: str = "auto", device: str | None = None, seed: int | None = None,
                 out: TextIO | None = None) -> int:
    """What `gptqlora generate` does; returns the exit status."""
    sampling = sampling or Sampling()
    items = read_prompts(prompts, file_format)  # a bad prompts file fails before the model loads
    loaded = load_model(run_dir, base, adapters, device, template)
    fmt = loaded.prompt_format(chat_template, system, raw)
    if seed is not None:
        from transformers import set_seed

        set_seed(seed)
    generate_items(loaded, fmt, items, out or sys.stdout, sampling, use or None, batch_size, max_context)
    return 0
