"""Inference: model loading (a run folder, or a quantized base plus adapters), prompt formatting, sampling
settings and batched generation, for `chat`, `generate` and the accuracy eval.
"""

from __future__ import annotations

import logging
import re
import string
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from gptqlora.data.collate import pad_token_id
from gptqlora.data.templates import DEFAULT_TEMPLATE, PromptTemplate
from gptqlora.data.tokenize import encode_prompt

logger = logging.getLogger(__name__)

OFF = "off"  # adapter "name" meaning: the base model alone
_NAME = re.compile(r"[\w-]+")  # PEFT keeps adapters in ModuleDicts: no dots


class InferenceError(ValueError):
    """A setting or input of `chat` / `generate` that the user can fix."""


# -- sampling and batched generation --------------------------------------------------------------------


DECODE_MODES = ("auto", "compiled", "eager")
CACHE_STEP = 256  # static KV caches are sized in steps of this many tokens: few distinct graphs


@dataclass(frozen=True)
class Sampling:
    """Decoding settings; temperature 0 means greedy. ``decode``: "compiled" = a static KV cache and the decode
    step compiled by torch.compile with CUDA graphs (CUDA only), "eager" = transformers' dynamic cache,
    "auto" = compiled on CUDA, eager elsewhere."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    decode: str = "eager"

    def __post_init__(self) -> None:
        if self.decode not in DECODE_MODES:
            raise InferenceError(f"--decode must be one of {', '.join(DECODE_MODES)}, got {self.decode!r}")
        if self.max_new_tokens < 1:
            raise InferenceError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise InferenceError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InferenceError(f"--top-p must be in (0, 1], got {self.top_p}")

    def generate_kwargs(self, tokenizer: Any) -> dict[str, Any]:
        kw: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "pad_token_id": pad_token_id(tokenizer),
                              "eos_token_id": tokenizer.eos_token_id}
        if self.temperature == 0:
            # None overrides sampling values a model's generation_config may carry (no warnings).
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kw.update(do_sample=True, temperature=self.temperature, top_p=self.top_p)
        return kw


def compiled_decode(model: Any, sampling: Sampling) -> bool:
    """Whether generation with ``sampling`` uses the static cache and the compiled decode step on this model."""
    cuda = next(model.parameters()).device.type == "cuda"
    if sampling.decode == "compiled" and not cuda:
        raise InferenceError("--decode compiled needs a CUDA device (CUDA graphs); use --decode auto or eager")
    return sampling.decode == "compiled" or (sampling.decode == "auto" and cuda)


def prepare_decode(model: Any, batch: int | None = None) -> None:
    """Builds the small-M kernel plans of every quantized layer and sibling group: they must exist before the
    decode step is compiled (under torch.compile a missing plan would send the step to the training kernels).
    `batch`: the rows decoded at a time. The largest batch a model was prepared for picks its GPTQ layers'
    kernel (kernels/gemv_mma.py `wanted`: the tensor-core kernel from 2 rows, the Triton kernels while only
    one was asked for); it only grows, so mixed batch sizes switch a model at most once (a switch plans every
    layer again and drops the model's cached decoders: their CUDA graphs read the old plans)."""
    from gptqlora.graph_decode import forget_decoders
    from gptqlora.kernels import gemv_mma
    from gptqlora.nn.quant_linear import QuantLinear
    from gptqlora.nn.decode_order import link_ahead
    from gptqlora.nn.sibling_gemv import group_plan
    from gptqlora.nn import spqr_siblings
    from gptqlora.nn.spqr_linear import SpQRLinear

    if batch is not None and _mma_fits(model):
        layers = [m for m in model.modules() if type(m) is QuantLinear]
        grown = [(m, max(batch, m.decode_batch or 0)) for m in layers]
        if any(gemv_mma.wanted(m.decode_batch, m.bits) != gemv_mma.wanted(b, m.bits) for m, b in grown):
            forget_decoders(model)
            logger.info("decoding %d rows at a time: the quantized layers are planned again for the %s kernel",
                        batch, "tensor-core" if gemv_mma.wanted(batch) else "Triton")
        for m, b in grown:
            m.decode_batch = b
    for mod in model.modules():
        if isinstance(mod, (QuantLinear, SpQRLinear)):
            mod.gemv_plan()
        if isinstance(mod, SpQRLinear):
            mod.mma_plan()  # the tensor-core plan (on CUDA unless GPTQLORA_GEMV_MMA=0: gemv_mma.wanted_spqr)
    groups = {id(g): g for mod in model.modules() if (g := getattr(mod, "siblings", None)) is not None}
    for g in groups.values():  # q|k|v and gate|up decoded by one launch each (nn/sibling_gemv.py)
        if all(isinstance(m.base_layer, QuantLinear) for m in g.layers):
            group_plan([m.base_layer for m in g.layers])
        elif all(type(m.base_layer) is SpQRLinear for m in g.layers) and spqr_siblings.wanted():
            spqr_siblings.group_plan([m.base_layer for m in g.layers])  # SpQR's (nn/spqr_siblings.py)
    link_ahead(model)  # each launch told the next one's packed weight (nn/decode_order.py; GPTQLORA_L2_AHEAD)


def _mma_fits(model: Any) -> bool:
    """Whether gemv_mma can take this model's decode calls: 16-bit embeddings (the compute dtype) and adapters
    of rank <= MAX_R; otherwise every call on a layer planned for it would go to its dense fallback."""
    from gptqlora.kernels import gemv_mma

    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    ranks = [m.weight.shape[0] for name, m in model.named_modules() if name.rsplit(".", 2)[-2:-1] == ["lora_A"]]
    return (emb is not None and emb.weight.dtype in (torch.float16, torch.bfloat16)
            and all(r <= gemv_mma.MAX_R for r in ranks))


def cache_length(model: Any, length: int) -> int:
    """A static KV cache's size for ``length`` tokens: rounded up to CACHE_STEP (a few graphs serve all
    calls), within the model's max_position_embeddings where that still holds ``length``."""
    size = -(-length // CACHE_STEP) * CACHE_STEP
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return min(size, limit) if limit and limit >= length else size


def _eos_ids(tokenizer: Any, model: Any) -> list[int]:
    ids = tokenizer.eos_token_id
    if ids is None:
        ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return [] if ids is None else [ids] if isinstance(ids, int) else list(ids)


def generate_ids(model: Any, tokenizer: Any, ids: torch.Tensor, mask: torch.Tensor, sampling: Sampling,
                 length: int | None = None, on_token: Callable[[torch.Tensor], bool] | None = None) -> torch.Tensor:
    """New tokens (B, <= max_new_tokens) for left-padded ``ids`` / ``mask`` on the model's device.

    Compiled decoding (``sampling.decode``, see `compiled_decode`) runs graph_decode's loop with a static
    cache of ``length`` tokens (default: prompt + max_new_tokens); eager decoding runs transformers'
    ``generate``. ``on_token(tokens (B,) on the CPU)`` streams each step's tokens; its True ends generation.
    Rows that ended early are padded with the pad token after their end-of-sequence token."""
    from gptqlora.graph_decode import DecodeUnsupported, decoder_for

    kw = sampling.generate_kwargs(tokenizer)
    if not compiled_decode(model, sampling):
        from transformers import StoppingCriteria, StoppingCriteriaList

        class _Stream(StoppingCriteria):  # transformers' hook after every token
            def __init__(self) -> None:
                self.seen = ids.shape[1]

            def __call__(self, input_ids: torch.Tensor, scores: Any, **_: Any) -> torch.Tensor:
                done = False
                for t in range(self.seen, input_ids.shape[1]):
                    done = done or bool(on_token(input_ids[:, t].cpu()))
                self.seen = input_ids.shape[1]
                return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

        stream = {"stopping_criteria": StoppingCriteriaList([_Stream()])} if on_token is not None else {}
        gen = model.generate(input_ids=ids, attention_mask=mask, disable_compile=True, **stream, **kw)
        return gen[:, ids.shape[1]:]
    prepare_decode(model, ids.shape[0])
    size = cache_length(model, length or ids.shape[1] + sampling.max_new_tokens)
    try:
        return decoder_for(model, ids.shape[0], size).run(
            ids, mask, sampling.max_new_tokens, _eos_ids(tokenizer, model), kw["pad_token_id"],
            sample=sampling.temperature > 0, temperature=sampling.temperature or 1.0, top_p=sampling.top_p,
            on_token=on_token)
    except DecodeUnsupported as e:
        raise InferenceError(str(e)) from None


@torch.inference_mode()
def generate_responses(model: Any, tokenizer: Any, prompts: Sequence[list[int]], sampling: Sampling = Sampling(),
                       batch_size: int = 8, progress: bool = False) -> list[str]:
    """Completions (decoded new tokens only) of tokenized prompts, in input order, in left-padded batches."""
    device = next(model.parameters()).device
    pad = pad_token_id(tokenizer)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths per batch
    out: list[str] = [""] * len(prompts)
    batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="generating")
    for idx in batches:
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):  # left padding: prompts end where generation starts
            n = len(prompts[i])
            ids[row, width - n:] = torch.tensor(prompts[i])
            mask[row, width - n:] = 1
        gen = generate_ids(model, tokenizer, ids.to(device), mask.to(device), sampling)
        for row, i in enumerate(idx):
            out[i] = tokenizer.decode(gen[row], skip_special_tokens=True)
    return out


# -- prompt formatting ----------------------------------------------------------------------------------


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


def record_prompt_ids(tokenizer: Any, record: dict[str, Any], template: PromptTemplate | None) -> list[int]:
    """The prompt of a data record, as training rendered it (chat: everything before the last assistant turn)."""
    if "messages" in record:
        msgs = record["messages"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        text = tokenizer.apply_chat_template(msgs[:last], tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if template is None:
        raise ValueError("no template for a non-chat record")
    return encode_prompt(tokenizer, template.prompt(record))


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
    info: Any = field(default=None)  # the run's RunInfo, when loaded from a run

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
    from gptqlora.run import Run

    name, sep, path = spec.partition("=")
    if not sep:
        name, path = "", spec
    p = Path(path)
    if Run.is_run(p) and Run(p).adapter_dir.is_dir():
        p = Run(p).adapter_dir
    if not name:  # named after its folder (runs/x/adapter -> x)
        folder = p.resolve()
        name = re.sub(r"[^\w-]", "_", folder.parent.name if folder.name == "adapter" else folder.name)
    if not _NAME.fullmatch(name) or name == OFF:
        raise InferenceError(f"--adapter {spec!r}: the name must be letters, digits, '_' or '-', and not "
                             f"{OFF!r}; write it as NAME=PATH")
    return name, p


def load_model(run_dir: str | Path | None = None, base: str | Path | None = None,
               adapters: Sequence[str] = (), device: str | None = None,
               template: str | None = None) -> Loaded:
    """A run's base with its adapter (``run_dir``), or a quantized ``base``; plus extra ``adapters`` specs."""
    from gptqlora.adapters.model import load_adapter
    from gptqlora.devices import default_dtype, resolve_device
    from gptqlora.run import Run

    if run_dir is None and base is None:
        raise InferenceError("give a run folder (RUN_DIR) or --base CHECKPOINT (a quantized checkpoint folder)")
    if run_dir is not None and base is not None:
        raise InferenceError("give a run folder (RUN_DIR) or --base CHECKPOINT, not both")
    from gptqlora.paths import require_dir

    require_dir(run_dir or base, "RUN_DIR" if run_dir is not None else "--base",
                "run folder" if run_dir is not None else "checkpoint folder")
    if device is not None:
        from gptqlora.devices import check_device

        check_device(device)
    specs = [parse_adapter_spec(s) for s in adapters]
    names: list[str] = []
    run = None
    if run_dir is not None:
        run = Run.open(run_dir)
        names.append(parse_adapter_spec(str(run_dir))[0])
        model = run.load(device=device, adapter_name=names[0])
        tokenizer = run.tokenizer()
        tpl = PromptTemplate.load(template) if template else run.template()
        source = str(run_dir)
    else:
        from transformers import AutoTokenizer

        from gptqlora.checkpoint.checkpoint import load_quantized

        dev = resolve_device(device)
        model = load_quantized(base, device=dev, dtype=default_dtype(dev))
        tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
        tpl = PromptTemplate.load(template or DEFAULT_TEMPLATE)
        source = str(base)
    for name, path in specs:
        if name in names:
            raise InferenceError(f"adapter name {name!r} is used twice; name them with --adapter NAME=PATH")
        model = load_adapter(model, path, adapter_name=name)
        names.append(name)
    if names:
        model.set_adapter(names[0], inference_mode=True)
    model.eval()
    return Loaded(model, tokenizer, tpl, names, chat_data=run is not None and run.chat_data, source=source,
                  info=run.info if run is not None else None)


@contextmanager
def using_adapter(model: Any, name: str | None) -> Iterator[None]:
    """Generate with adapter ``name``, or with the base model alone for None / "off"."""
    if name in (None, OFF):
        with model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext():
            yield
        return
    model.set_adapter(name, inference_mode=True)
    yield
