"""`gptqlora chat`: an interactive terminal chat with a run's model, streaming tokens as they are generated.

Generation runs in a worker thread feeding a `TextIteratorStreamer`; the main thread prints the pieces.
That keeps Ctrl-C in the main thread: while a reply streams, SIGINT only sets an event that the decode
loop checks after every token, so an interrupted reply ends cleanly (adapter state restored) and the
chat goes on. The handler must not raise: a KeyboardInterrupt landing inside the streamer's queue can
leave its lock held, and the worker's next put would then wait forever (CI saw that hang). It is one
worker thread for the whole session: the CUDA graphs graph_decode records belong to the thread that
recorded them, and replaying them from another thread would be wrong.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence, TextIO

from gptqlora.commands.model_options import add_model_options, sampling as sampling_from, set_seed

if TYPE_CHECKING:  # inference (torch, transformers) loads where a session starts: `--help` needs none of it
    from gptqlora.inference import PromptFormat, Sampling

logger = logging.getLogger(__name__)

DESCRIPTION = ("Interactive chat that streams the reply as it is generated. Earlier turns stay in the prompt (the "
               "oldest are dropped to fit the context). Commands: /reset, /adapter NAME, /adapter off, /adapters, "
               "/help, /exit. Ctrl-C stops a reply; Ctrl-D (or Ctrl-C at the prompt) quits.")
PROMPT = ">>> "
HELP = """commands:
  /reset          forget the conversation so far
  /adapter NAME   switch to adapter NAME (the conversation is kept)
  /adapter off    the base model alone, to compare
  /adapters       list the loaded adapters
  /help           this help
  /exit           quit (also Ctrl-D, or Ctrl-C at the prompt); Ctrl-C during a reply stops the reply"""


@dataclass
class Reply:
    text: str
    interrupted: bool = False  # stopped by Ctrl-C; the text so far is kept in the history
    dropped: int = 0  # oldest turns dropped from the history so the prompt fits the context


class ChatSession:
    """A conversation with a model: history, context budget, active adapter, streamed replies."""

    def __init__(self, model: Any, tokenizer: Any, fmt: PromptFormat, sampling: Sampling, context_size: int,
                 adapters: Sequence[str] = (), active: str | None = None) -> None:
        from gptqlora.inference import OFF

        self.model, self.tokenizer, self.fmt, self.sampling = model, tokenizer, fmt, sampling
        self.context_size = context_size
        self.adapters = list(adapters)
        self.active = active if active is not None else (self.adapters[0] if self.adapters else OFF)
        self.history: list[tuple[str, str]] = []
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gptqlora-generate")  # see above

    def reset(self) -> None:
        self.history.clear()

    def use(self, name: str) -> None:
        from gptqlora.inference import OFF, InferenceError

        if name != OFF and name not in self.adapters:
            raise InferenceError(f"no adapter {name!r}; loaded: {', '.join(self.adapters) or 'none'} "
                                 f"(or {OFF!r} for the base model)")
        self.active = name

    def prompt_ids(self, message: str) -> tuple[list[int], int]:
        """Token ids for ``message`` after the history, and how many oldest turns must go to fit."""
        from gptqlora.inference import InferenceError

        budget = self.context_size - self.sampling.max_new_tokens
        for drop in range(len(self.history) + 1):
            ids = self.fmt.encode(self.history[drop:], message, self.tokenizer)
            if len(ids) <= budget:
                return ids, drop
        raise InferenceError(f"the message is too long: its prompt is {len(ids)} tokens but at most {budget} "
                             f"fit (context {self.context_size} minus --max-new-tokens "
                             f"{self.sampling.max_new_tokens}); shorten it")

    def reply(self, message: str, on_text: Callable[[str], None]) -> Reply:
        """Generate a reply, calling ``on_text`` with each new piece; Ctrl-C stops it (the text so far stays)."""
        import torch
        from transformers import TextIteratorStreamer

        from gptqlora.inference import generate_ids, using_adapter

        ids, dropped = self.prompt_ids(message)
        del self.history[:dropped]
        device = next(self.model.parameters()).device
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        stop = threading.Event()
        errors: list[BaseException] = []

        def work() -> None:
            try:
                with torch.inference_mode(), using_adapter(self.model, self.active):
                    prompt = torch.tensor([ids], device=device)
                    streamer.put(torch.tensor([ids]))  # skipped (skip_prompt): the streamer's first put is the prompt

                    def put(tokens: torch.Tensor) -> bool:
                        streamer.put(tokens)
                        return stop.is_set()

                    generate_ids(self.model, self.tokenizer, prompt, torch.ones_like(prompt), self.sampling,
                                 length=self.context_size, on_token=put)
                streamer.end()
            except BaseException as e:  # handed to the main thread, which must not wait forever
                errors.append(e)
                streamer.end()

        pieces: list[str] = []
        interrupted = threading.Event()
        job = None
        try:
            with _sigint_sets(stop, interrupted):
                job = self._worker.submit(work)
                for piece in streamer:
                    if not stop.is_set():  # after Ctrl-C at most one more piece arrives; it is not shown
                        pieces.append(piece)
                        on_text(piece)
        except KeyboardInterrupt:  # not on the main thread (no handler), or before the handler was in place
            interrupted.set()
        finally:
            stop.set()
            if job is not None:
                _join(job)
        if errors:
            raise errors[0]
        text = "".join(pieces)
        self.history.append((message, text.strip()))
        return Reply(text, interrupted.is_set(), dropped)


@contextlib.contextmanager
def _sigint_sets(*events: threading.Event):
    """While inside, SIGINT (Ctrl-C) sets ``events`` instead of raising; only the main thread can do this."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        for e in events:
            e.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _join(job: Future) -> None:
    """Wait for a stopped generation (at most one more token); a second Ctrl-C must not leave it running."""
    while not job.done():
        try:
            wait([job])
        except KeyboardInterrupt:
            pass


def _command(session: ChatSession, line: str, out: TextIO) -> bool:
    """Handle a slash command; False means exit."""
    from gptqlora.inference import OFF, InferenceError

    cmd, _, arg = line.partition(" ")
    arg = arg.strip()
    if cmd in ("/exit", "/quit"):
        return False
    if cmd == "/reset":
        session.reset()
        out.write("[conversation cleared]\n")
    elif cmd == "/adapter" and arg:
        try:
            session.use(arg)
            out.write(f"[adapter: {arg}]\n" if arg != OFF else "[adapter: off (base model)]\n")
        except InferenceError as e:
            out.write(f"[{e}]\n")
    elif cmd in ("/adapter", "/adapters"):
        names = [*session.adapters, OFF]
        out.write("".join(f"{'*' if n == session.active else ' '} {n}{' (base model)' if n == OFF else ''}\n"
                          for n in names))
    elif cmd == "/help":
        out.write(HELP + "\n")
    else:
        out.write(f"[unknown command {cmd}; /help lists them]\n")
    return True


def run_chat(session: ChatSession, read: Callable[[str], str] = input, out: TextIO = sys.stdout,
             banner: str | None = None) -> int:
    """The chat loop: ``read(prompt)`` gives lines (EOFError / KeyboardInterrupt end it), replies go to ``out``."""
    from gptqlora.inference import InferenceError

    if banner:
        out.write(banner + "\n")
        out.flush()

    def show(text: str) -> None:
        out.write(text)
        out.flush()

    while True:
        try:
            line = read(PROMPT).strip()
        except (EOFError, KeyboardInterrupt):
            show("\n")
            return 0
        if not line:
            continue
        if line.startswith("/"):
            if not _command(session, line, out):
                return 0
            out.flush()
            continue
        try:
            reply = session.reply(line, show)
        except InferenceError as e:
            show(f"[{e}]\n")
            continue
        except KeyboardInterrupt:  # landed outside the streaming loop (e.g. while encoding)
            show("\n[stopped]\n")
            continue
        show("\n[stopped]\n" if reply.interrupted else "\n")
        if reply.dropped:
            show(f"[dropped the {reply.dropped} oldest turn(s) to fit the {session.context_size}-token context]\n")


def run_chat_command(run_dir: str | None = None, base: str | None = None, adapters: Sequence[str] = (),
                     template: str | None = None, chat_template: bool = False, system: str | None = None,
                     sampling: Sampling | None = None, max_context: int | None = None, device: str | None = None,
                     seed: int | None = None) -> int:
    """What `gptqlora chat` does: load, then chat on the terminal; returns the exit status."""
    from gptqlora.inference import Sampling, compiled_decode, load_model

    sampling = sampling or Sampling()
    loaded = load_model(run_dir, base, adapters, device, template)
    fmt = loaded.prompt_format(chat_template, system)
    size = loaded.context_size(max_context, sampling)
    compiled_decode(loaded.model, sampling)  # --decode compiled without CUDA fails now, not at the first reply
    set_seed(seed)
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (importing it gives input() line editing and history)
        except ImportError:
            pass
    session = ChatSession(loaded.model, loaded.tokenizer, fmt, sampling, size, loaded.adapters)
    how = "chat template" if fmt.mode == "chat" else f"template {loaded.template.name}"
    banner = (f"gptqlora chat: {loaded.source} ({how}, adapter {session.active}, up to {sampling.max_new_tokens} "
              f"new tokens, context {size})\n/help for commands; Ctrl-D quits; Ctrl-C stops a reply")
    return run_chat(session, input, sys.stdout, banner)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_options(p)


def run(args: argparse.Namespace) -> int:
    return run_chat_command(args.run_dir, args.base, args.adapters, args.template, args.chat_template, args.system,
                            sampling_from(args), args.max_context, args.device, args.seed)
