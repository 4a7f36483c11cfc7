"""The decode loop `chat` and `generate` use on CUDA: a static KV cache and the one-token step captured in
one CUDA graph, so that a generated token costs the host one graph replay.

Why not transformers' own `generate(compile_config=...)`: it compiles the same step, but enters it through
torch.compile's guards on every token, and its loop (logits processors, stopping criteria, a host sync per
token) runs in Python between steps. For the 7B shape with LoRA on seven projections that host work was
~7 ms per token against ~5 ms of GPU work (bench/decode.py, H200, 2026-12-02: 12.0 ms wall per token), so
the GPU waited on the host for more than half of every step. Here:

- the step (one token per row through the model, the next token chosen, the row's state advanced) is
  compiled once by inductor without its own CUDA graphs, then captured with `torch.cuda.CUDAGraph`; a
  replay evaluates no guards and runs no Python;
- everything a step reads or writes lives in static buffers on the device (token ids, positions, finished
  flags, the output tokens), so the host loop only replays. It reads the finished flags every CHECK_EVERY
  tokens, or every token when streaming;
- one graph per (batch size, cache length, adapter state, greedy or sampled); temperature and top-p are
  tensors the graph reads, so one graph serves every value.

The prompt runs eagerly (prefill: many tokens take the training kernels, and its shape varies). On a CPU the
same loop runs the step eagerly (`compile=False, graph=False`); the tests compare its greedy tokens with
transformers' `generate`.
"""

from __future__ import annotations

import inspect
import logging
from collections import OrderedDict
from typing import Any, Callable

import torch

logger = logging.getLogger(__name__)

CHECK_EVERY = 16  # without streaming, the finished flags are read (one host sync) every this many tokens
MAX_DECODERS = 2  # (batch, cache length) pairs kept per model, each with its KV cache and graphs
DECODERS = "_gptqlora_decoders"  # the model's __dict__ entry holding them (decoder_for)
EOS_SLOTS = 4  # end-of-sequence ids a graph compares against (unused slots hold -1)


class DecodeUnsupported(RuntimeError):
    """This model or transformers version lacks what the loop relies on (`--decode eager` still works)."""


def pick_next(logits: torch.Tensor, sample: bool, temperature: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """(B, V) logits -> (B,) next tokens: argmax, or a draw from the top-p nucleus of softmax(logits / T).

    The draw is an exponential race (argmax of p / E, E ~ Exp(1): token i wins with probability p_i), which
    needs no host sync and captures in a CUDA graph."""
    if not sample:
        return logits.argmax(-1)
    probs = (logits.float() / temperature).softmax(-1)
    sp, si = probs.sort(-1, descending=True)  # (B, V)
    sp = sp * ((sp.cumsum(-1) - sp) < top_p)  # the smallest prefix with mass >= top_p (the first always stays)
    choice = (sp / torch.empty_like(sp).exponential_()).argmax(-1, keepdim=True)  # (B, 1)
    return si.gather(-1, choice).squeeze(1)


def adapter_state(model: Any) -> tuple:
    """What a captured graph bakes in about adapters: a PEFT LoRA layer's active adapters, whether adapters
    are disabled, whether merged (the first such layer speaks for all: PEFT switches them together)."""
    for mod in model.modules():
        if hasattr(mod, "lora_A") and hasattr(mod, "active_adapters"):
            return (tuple(mod.active_adapters), bool(getattr(mod, "disable_adapters", False)),
                    bool(getattr(mod, "merged", False)))
    return ()


def _cache_kwarg(model: Any) -> str:
    """transformers renamed `past_key_values` to `cache` (5.2x keeps the old name as a deprecated alias)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _cache_lengths(cache: Any) -> list[torch.Tensor]:
    """The per-layer token counters of a StaticCache (device tensors it advances in place)."""
    counters = [getattr(layer, "cumulative_length", None) for layer in cache.layers]
    if not all(isinstance(c, torch.Tensor) for c in counters):
        raise DecodeUnsupported("this transformers version's StaticCache keeps no tensor token counter per "
                                "layer, which the compiled decode loop needs; use --decode eager")
    return counters


class Decoder:
    """Static buffers, the KV cache and the captured steps for one (batch size, cache length)."""

    def __init__(self, model: Any, batch: int, length: int, device: torch.device, compile: bool = True,
                 graph: bool = True) -> None:
        from transformers import StaticCache

        self.model, self.batch, self.length, self.device = model, batch, length, device
        self.cache = StaticCache(config=model.config, max_cache_len=length)
        self.cache_kw = _cache_kwarg(model)
        z = dict(dtype=torch.long, device=device)
        self.ids = torch.zeros(batch, 1, **z)  # (B, 1) the token each row feeds next
        self.pos = torch.zeros(1, **z)  # cache slot of that token (the same for all rows: left padding)
        self.pads = torch.zeros(batch, **z)  # (B,) left-padding per row: position id = pos - pads
        self.mask = torch.ones(batch, length, **z)  # (B, L) 0 on left padding; causality masks the rest
        self.out = torch.zeros(batch, length, **z)  # (B, L) new tokens in order
        self.n = torch.zeros(1, **z)  # new tokens written to out
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)
        self.eos = torch.full((EOS_SLOTS,), -1, **z)
        self.pad_id = torch.zeros((), **z)
        self.temperature = torch.ones((), device=device)
        self.top_p = torch.ones((), device=device)
        self.use_graph = graph and device.type == "cuda"
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self.step = torch.compile(self._step, dynamic=False) if compile else self._step

    def _forward(self, ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=position_ids, use_cache=True,
                         logits_to_keep=1, **{self.cache_kw: self.cache})
        return out.logits[:, -1]  # (B, V)

    def _advance(self, tok: torch.Tensor) -> None:
        """Record (B,) tokens as the rows' next: pad after a row's end, end flags, output, position."""
        tok = torch.where(self.done, self.pad_id, tok)
        self.done |= torch.isin(tok, self.eos)
        self.out.index_copy_(1, self.n, tok.unsqueeze(1))
        self.ids.copy_(tok.unsqueeze(1))
        self.n += 1

    def _step(self, sample: bool) -> None:
        logits = self._forward(self.ids, (self.pos - self.pads).unsqueeze(1))  # each row's own position
        self._advance(pick_next(logits, sample, self.temperature, self.top_p))
        self.pos += 1

    def _state(self) -> list[torch.Tensor]:
        return [self.ids, self.pos, self.out, self.n, self.done, *_cache_lengths(self.cache)]

    def _graph(self, sample: bool) -> torch.cuda.CUDAGraph | None:
        """The captured step for this adapter state and mode, captured now if new. The warm-up steps (inductor
        compiles on the first) advance the state: it is saved before and put back after."""
        if not self.use_graph:
            return None
        key = (sample, adapter_state(self.model))
        if key in self.graphs:
            return self.graphs[key]
        saved = [t.clone() for t in self._state()]
        try:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self.step(sample)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.step(sample)
        except Exception as e:  # something in the step syncs or is not capturable: the compiled step, no graph
            logger.warning("decode: capturing the step in a CUDA graph failed (%s: %s); decoding without it",
                           type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
            self.use_graph = False
            graph = None
        for t, s in zip(self._state(), saved):
            t.copy_(s)
        if graph is not None:
            self.graphs[key] = graph
        return graph

    @torch.inference_mode()
    def run(self, ids: torch.Tensor, mask: torch.Tensor, max_new: int, eos: list[int], pad_id: int, sample: bool,
            temperature: float = 1.0, top_p: float = 1.0, on_token: Callable[[torch.Tensor], bool] | None = None
            ) -> torch.Tensor:
        """Left-padded `ids` (B, P) with `mask` (B, P) -> (B, new) new tokens (pad after a row's end).

        `on_token(tokens (B,) on the CPU)` is called for each step's tokens (streaming); returning True stops."""
        b, p = ids.shape
        if b != self.batch or p + max_new > self.length:
            raise ValueError(f"decoder for batch {self.batch}, {self.length} tokens got {b} x ({p} + {max_new})")
        if len(eos) > EOS_SLOTS:
            raise ValueError(f"at most {EOS_SLOTS} end-of-sequence ids, got {len(eos)}")
        self.mask.fill_(1)
        self.mask[:, :p].copy_(mask)
        self.pads.copy_(p - mask.sum(1))
        self.eos.fill_(-1)
        self.eos[:len(eos)].copy_(torch.tensor(eos, dtype=torch.long))
        self.pad_id.fill_(pad_id)
        self.temperature.fill_(temperature if sample else 1.0)
        self.top_p.fill_(top_p)
        self.done.zero_()
        self.n.zero_()
        for c in _cache_lengths(self.cache):
            c.zero_()  # the old tokens' keys stay in place; the mask and the counters keep them unread
        position_ids = (mask.cumsum(1) - 1).clamp_(min=0)  # (B, P)
        self._advance(pick_next(self._forward(ids, position_ids), sample, self.temperature, self.top_p))
        self.pos.fill_(p)
        graph = self._graph(sample)
        made = 1
        while True:
            if on_token is not None:
                if on_token(self.out[:, made - 1].cpu()) or bool(self.done.all()):
                    break
            elif made % CHECK_EVERY == 0 and bool(self.done.all()):
                break
            if made == max_new:
                break
            if graph is not None:
                graph.replay()
            else:
                self.step(sample)
            made += 1
        return self.out[:, :made].clone()


def forget_decoders(model: Any) -> None:
    """Drops the model's cached decoders (their KV caches and CUDA graphs), e.g. when the layers' decode plans,
    whose buffers the graphs read, are built again."""
    model.__dict__.pop(DECODERS, None)


def decoder_for(model: Any, batch: int, length: int, compile: bool | None = None,
                graph: bool | None = None) -> Decoder:
    """The model's Decoder for this batch size and cache length, made on first use; at most MAX_DECODERS
    are kept per model (the least recently used goes, with its cache and graphs). `compile` and `graph`
    default to whether the model is on CUDA."""
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    compile, graph = cuda if compile is None else compile, cuda if graph is None else graph
    decoders: OrderedDict = model.__dict__.setdefault(DECODERS, OrderedDict())
    key = (batch, length, compile, graph)
    if key in decoders:
        decoders.move_to_end(key)
        return decoders[key]
    while len(decoders) >= MAX_DECODERS:
        decoders.popitem(last=False)
    decoders[key] = Decoder(model, batch, length, device, compile, graph)
    return decoders[key]
