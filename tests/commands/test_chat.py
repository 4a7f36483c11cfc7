"""`gptqlora chat`: the loop driven by scripted input, Ctrl-C (a real SIGINT) and a real pseudo-terminal."""

import io
import os
import pty
import select
import signal
import sys
import threading
import time

import pytest

from gptqlora.commands.chat import ChatSession, run_chat
from gptqlora.data.templates import PromptTemplate
from gptqlora.inference import InferenceError, PromptFormat, Sampling, load_model


@pytest.fixture(scope="module")
def run(tiny_run):
    return tiny_run


@pytest.fixture(scope="module")
def loaded(run):
    return load_model(run, device="cpu")


def session(loaded, max_new_tokens=8, context=None, **kw):
    sampling = Sampling(max_new_tokens=max_new_tokens)
    return ChatSession(loaded.model, loaded.tokenizer, loaded.prompt_format(**kw), sampling,
                       loaded.context_size(context, sampling), loaded.adapters)


def script(*lines, end=EOFError):
    """A `read` that returns ``lines`` one by one, then raises ``end``."""
    it = iter(lines)

    def read(_prompt):
        try:
            return next(it)
        except StopIteration:
            raise end from None

    return read


def test_turns_are_streamed_and_kept_as_history(loaded):
    s = session(loaded)
    pieces = []
    first = s.reply("hello", pieces.append)
    assert len(pieces) > 1 and "".join(pieces) == first.text  # streamed piece by piece
    assert not first.interrupted and s.history == [("hello", first.text.strip())]
    prompt_with_history, _ = s.prompt_ids("again")
    assert len(prompt_with_history) > len(s.fmt.encode([], "again", loaded.tokenizer))


def test_loop_commands_and_eof_exit(loaded):
    s, out = session(loaded), io.StringIO()
    rc = run_chat(s, script("hello", "/adapters", "/adapter off", "hello", "/adapter nope", "/adapter run1",
                            "/bogus", "/help", "/reset"), out)
    text = out.getvalue()
    assert rc == 0
    assert "* run1\n  off (base model)\n" in text and "[adapter: off (base model)]" in text
    assert "no adapter 'nope'" in text and "[adapter: run1]" in text
    assert "unknown command /bogus" in text and "/adapter NAME" in text
    assert "[conversation cleared]" in text and s.history == [] and s.active == "run1"
    assert run_chat(session(loaded), script("hi", end=KeyboardInterrupt), io.StringIO()) == 0  # Ctrl-C at prompt
    assert run_chat(session(loaded), script("/exit", "never read"), io.StringIO()) == 0


def test_adapter_off_is_the_base_model(loaded):
    s = session(loaded)
    with_adapter = s.reply("hello", lambda _t: None).text
    s.reset()
    s.use("off")
    base = s.reply("hello", lambda _t: None).text
    assert base != with_adapter
    with loaded.model.disable_adapter():  # switching back and forth left nothing behind
        assert loaded.model.base_model.model.model.layers[0].self_attn.q_proj.disable_adapters
    s.use("run1")
    s.reset()
    assert s.reply("hello", lambda _t: None).text == with_adapter


def test_decode_loop_streams_what_generate_streams(loaded, monkeypatch):
    """chat through graph_decode's loop (`--decode compiled`; on a CPU its step runs eagerly) streams the
    replies transformers' generate gives, with the adapter and with it switched off (another graph key)."""
    from gptqlora import inference

    want = {}
    for name in ("run1", "off"):
        s = session(loaded)
        s.use(name)
        want[name] = s.reply("hello", lambda _t: None).text
    monkeypatch.setattr(inference, "compiled_decode", lambda model, sampling: True)
    s = session(loaded)
    for name in ("run1", "off", "run1"):
        s.reset()
        s.use(name)
        pieces = []
        assert s.reply("hello", pieces.append).text == "".join(pieces) == want[name]
    assert len(pieces) > 1


def test_oldest_turns_dropped_to_fit_context(loaded):
    s = session(loaded, max_new_tokens=8, context=300)
    s.fmt = PromptFormat("template", PromptTemplate.load("alpaca_short"))  # ~80 tokens a turn
    s.history = [(f"question {i}", "x" * 40) for i in range(6)]
    ids, drop = s.prompt_ids("last")
    assert 0 < drop < 6 and len(ids) <= 300 - 8
    assert len(s.fmt.encode(s.history[drop - 1:], "last", loaded.tokenizer)) > 300 - 8  # dropped no more than needed
    out = io.StringIO()
    run_chat(s, script("last"), out)
    assert f"[dropped the {drop} oldest turn(s)" in out.getvalue() and len(s.history) == 6 - drop + 1
    with pytest.raises(InferenceError, match="too long"):
        s.prompt_ids("y" * 400)
    assert len(s.history) == 6 - drop + 1  # a refused message changes nothing


class LongReply(Sampling):
    """Never ends early: the reply must still be streaming when the SIGINT lands (a model that happens to
    emit EOS after three tokens would otherwise let the signal hit the test itself)."""

    def generate_kwargs(self, tokenizer):
        return {**super().generate_kwargs(tokenizer), "min_new_tokens": self.max_new_tokens}


def test_ctrl_c_stops_the_reply_not_the_chat(loaded):
    s, out = session(loaded, max_new_tokens=300), io.StringIO()
    s.sampling = LongReply(max_new_tokens=300)
    pieces = []

    def interrupt_after_some(text):  # a real SIGINT, as Ctrl-C sends, once the reply has started
        pieces.append(text)
        if len(pieces) == 3:
            threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT)).start()

    t0 = time.time()
    reply = s.reply("hello", interrupt_after_some)
    assert reply.interrupted and time.time() - t0 < 10
    assert 3 <= len(reply.text.split()) < 300 and s.history == [("hello", reply.text.strip())]
    s.sampling = Sampling(max_new_tokens=8)
    assert s.reply("next", lambda _t: None).text  # the model still works (no leftover generation)
    rc = run_chat(s, script("hello", "/reset"), out)
    assert rc == 0 and "[conversation cleared]" in out.getvalue()


# -- the real terminal ----------------------------------------------------------------------------------


class Terminal:
    """`gptqlora chat` in a child process on a pseudo-terminal (its controlling tty, so Ctrl-C is SIGINT)."""

    def __init__(self, *args: str) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TERM": "dumb", "TOKENIZERS_PARALLELISM": "false"}
        argv = [sys.executable, "-m", "gptqlora.cli", "chat", *args, "--device", "cpu"]
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # child
            os.execve(sys.executable, argv, env)
        self.buf = ""

    def poll(self, timeout: float) -> bool:
        """Read what the child wrote within ``timeout``; False once it is gone."""
        if select.select([self.fd], [], [], timeout)[0]:
            try:
                self.buf += os.read(self.fd, 4096).decode(errors="replace")
            except OSError:  # EIO: the child closed the terminal
                return False
        return True

    def expect(self, text: str, timeout: float = 60) -> str:
        """Read until ``text`` appears; returns everything before it and keeps what follows."""
        deadline = time.time() + timeout
        while text not in self.buf:
            left = deadline - time.time()
            assert left > 0, f"timed out waiting for {text!r}; got {self.buf!r}"
            assert self.poll(left), f"chat exited before {text!r}; got {self.buf!r}"
        before, _, self.buf = self.buf.partition(text)
        return before

    def send(self, data: str) -> None:
        os.write(self.fd, data.encode())

    def wait(self, timeout: float = 30) -> int:
        deadline = time.time() + timeout
        while time.time() < deadline:
            self.poll(0.1)  # drain output so the child never blocks on a full pty
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
        state = open(f"/proc/{self.pid}/status").read().split("\n")[2]
        os.kill(self.pid, signal.SIGKILL)
        raise AssertionError(f"chat did not exit ({state}); output {self.buf!r}")


def test_terminal_streamed_answer_ctrl_c_reset_and_eof(run):
    """One child process (startup is most of the time): Ctrl-C stops a long reply, /reset, Ctrl-D exits 0.

    Ctrl-C at the prompt is the same path as in `test_loop_commands_and_eof_exit` (input() raises).
    """
    t = Terminal(str(run), "--max-new-tokens", "300")
    assert "/help for commands" in t.expect(">>> ")
    t.send("hello\n")
    t.expect("hello")
    deadline = time.time() + 30
    while len(t.buf.split()) < 3:  # the reply streams: words show up while it is still being generated
        assert time.time() < deadline and t.poll(1), t.buf
    t.send("\x03")  # Ctrl-C during the reply
    assert "[stopped]" in t.expect(">>> ", timeout=15)
    t.send("/reset\n")
    assert "[conversation cleared]" in t.expect(">>> ")
    t.send("\x04")  # Ctrl-D
    assert t.wait() == 0
