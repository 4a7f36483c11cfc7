#!/usr/bin/env python
"""Train a small LLaMA on real English text found on a Debian machine: its manual pages.

The quality findings (bench/findings.py, docs/results.md) need a model trained on real text, with
held-out perplexity that means something. This script builds one on CPU in about a quarter of an hour:

1. reads the English manual pages in /usr/share/man/man{1,5,7,8} (gzip'd troff), strips the troff markup
   to plain text, and splits them by page (a hash of the page name): ~4% held out;
2. trains a byte-level BPE tokenizer (`--vocab` tokens) on the training pages;
3. trains a `LlamaForCausalLM` (4 blocks, hidden 128, FFN 384: about 1.1M parameters) on random
   `--seqlen`-token windows of the training text;
4. writes model + tokenizer, `test.txt` (held-out pages, the perplexity text), `train.txt` (a slice of the
   training text, the calibration and fine-tuning text of the findings) and a README with the numbers.

    python scripts/train_text_llama.py --out bench/assets/manpage-llama --minutes 14

`--write-val-heldout` trains nothing: it writes `val_heldout.txt` next to an existing test.txt, a validation
text of held-out pages that test.txt does not reach (see `val_heldout_text`), for choosing LoRA settings on
pages like test.txt's without looking at test.txt (bench/recovery_sweep.py --val-from heldout):

    python scripts/train_text_llama.py --out bench/assets/manpage-llama --write-val-heldout

`--write-test-nocopy` likewise writes `test_nocopy.txt`: test.txt without its pages that are copies of
training pages under another name (see `nocopy_text`), the score of held-out text the model never saw:

    python scripts/train_text_llama.py --out bench/assets/manpage-llama --write-test-nocopy
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import logging
import math
import random
import re
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

log = logging.getLogger("train_text_llama")

SECTIONS = ("man1", "man5", "man7", "man8")
ESCAPES = [(r"\\f(\[[^\]]*\]|\(..|.)", ""), (r"\\s[+-]?\d", ""), (r"\\\*(\(..|\[[^\]]*\]|.)", ""),
           (r"\\\(em|\\\(en", "-"), (r"\\\((lq|rq|dq)", '"'), (r"\\\((oq|cq)", "'"), (r"\\\(..", ""),
           (r"\\\[[^\]]*\]", ""), (r"\\[-e]", "-"), (r"\\[&|^/,~%:]", ""), (r"\\ ", " "), (r"\\\\", "\\\\")]
TEXT_MACROS = {"SH", "SS", "B", "I", "BI", "BR", "IB", "IR", "RB", "RI", "SB", "SM", "IP", "TP", "Nm", "Nd",
               "Sh", "Ss", "Fl", "Ar", "Op", "Xr", "Pa", "Em", "Dq", "Sy", "It", "Cm", "Li", "Ql", "Ev"}


def troff_to_text(src: str) -> str:
    """Plain text of a man page: macro lines keep their arguments (headings, bold words), requests and
    comments go, inline font/size/character escapes are dropped or replaced."""
    out = []
    for line in src.splitlines():
        if line.startswith(('.\\"', "'\\\"", '\\"')):
            continue
        if line.startswith((".", "'")):
            parts = line[1:].strip().split(None, 1)
            if not parts or parts[0] not in TEXT_MACROS or len(parts) == 1:
                if parts and parts[0] in ("PP", "LP", "P", "Pp", "sp", "br"):
                    out.append("")
                continue
            line = parts[1].replace('"', "")
        for pat, rep in ESCAPES:
            line = re.sub(pat, rep, line)
        out.append(line.rstrip())
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()
    return text


def read_pages(root: Path, limit: int | None) -> dict[str, str]:
    pages = {}
    for sec in SECTIONS:
        for f in sorted((root / sec).glob("*.gz")):
            try:
                raw = gzip.decompress(f.read_bytes()).decode("utf-8", "replace")
            except (OSError, EOFError):
                continue
            if raw.lstrip().startswith(".so "):  # a link to another page
                continue
            text = troff_to_text(raw)
            if len(text) > 200 and text.isascii():
                pages[f"{sec}/{f.name}"] = text
            if limit and len(pages) >= limit:
                return pages
    return pages


def held_out(name: str, percent: int) -> bool:
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % 100 < percent


def test_text(pages: dict[str, str], percent: int, test_chars: int) -> str:
    """test.txt: the held-out pages in order, joined by blank lines, cut at `test_chars`."""
    return "\n\n".join(pages[n] for n in pages if held_out(n, percent))[:test_chars]


def _held_out_starts(pages: dict[str, str], percent: int):
    """(name, start) of each held-out page in order, start its offset in test_text's join before the cut;
    and the set of the training pages' texts (to tell a held-out page that copies one under another name)."""
    train_texts = {t for n, t in pages.items() if not held_out(n, percent)}
    starts, pos = [], 0
    for n in (n for n in pages if held_out(n, percent)):
        starts.append((n, pos))
        pos += len(pages[n]) + 2
    return starts, train_texts


def val_heldout_text(pages: dict[str, str], percent: int, test_chars: int, page_chars: int,
                     total_chars: int) -> tuple[list[str], str]:
    """(page names, text) of a validation split disjoint from both train and test: the held-out pages (in
    main()'s order) that start after test.txt's cut (the page straddling the cut is dropped), kept only if
    they are classic section-1 pages like test.txt's (no gcloud_* pages: most of the held-out pages past the
    cut are gcloud's) and not a copy of a training page under another name (vi = vim, zcat = gzip, ...);
    each page's first `page_chars` characters (so no one page dominates), joined by blank lines, capped at
    `total_chars`."""
    starts, train_texts = _held_out_starts(pages, percent)
    names = [n for n, start in starts if start >= test_chars and n.startswith("man1/")
             and not n.startswith("man1/gcloud") and pages[n] not in train_texts]
    return names, "\n\n".join(pages[n][:page_chars] for n in names)[:total_chars]


def nocopy_text(pages: dict[str, str], percent: int, test_chars: int) -> tuple[list[str], list[str], str]:
    """(kept page names, dropped page names, text): the held-out pages (in main()'s order) that test.txt's
    `test_chars` reach, less those whose full text equals a training page's (as.1 = x86_64-linux-gnu-as.1,
    ...), each cut where test.txt cuts it, joined by blank lines."""
    starts, train_texts = _held_out_starts(pages, percent)
    reached = [(n, start) for n, start in starts if start < test_chars]
    kept = [(n, start) for n, start in reached if pages[n] not in train_texts]
    dropped = [n for n, start in reached if pages[n] in train_texts]
    return [n for n, _ in kept], dropped, "\n\n".join(pages[n][:test_chars - start] for n, start in kept)


def build_tokenizer(texts: list[str], vocab: int, max_len: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", model_max_length=max_len)


def encode(tokenizer, pages: list[str]) -> torch.Tensor:
    ids = []
    for p in pages:
        ids += tokenizer(p, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seqlen: int) -> float:
    nll, n = 0.0, 0
    for s in range(0, ids.numel() - seqlen + 1, seqlen):
        x = ids[s:s + seqlen].unsqueeze(0)
        nll += float(model(input_ids=x, labels=x).loss) * (seqlen - 1)
        n += seqlen - 1
    return math.exp(nll / n)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--man-root", default="/usr/share/man")
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--minutes", type=float, default=14.0, help="training time budget (wall clock)")
    p.add_argument("--max-steps", type=int, default=6000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--heldout-percent", type=int, default=4)
    p.add_argument("--test-chars", type=int, default=200_000, help="held-out text written to test.txt")
    p.add_argument("--train-chars", type=int, default=400_000, help="training text written to train.txt")
    p.add_argument("--page-limit", type=int, default=None, help="read at most this many pages (smoke runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write-val-heldout", action="store_true",
                   help="only write --out/val_heldout.txt (held-out pages past test.txt's cut; trains nothing)")
    p.add_argument("--write-test-nocopy", action="store_true",
                   help="only write --out/test_nocopy.txt (test.txt less copies of training pages; trains nothing)")
    p.add_argument("--val-page-chars", type=int, default=10_000, help="val_heldout.txt: characters kept per page")
    p.add_argument("--val-chars", type=int, default=150_000, help="val_heldout.txt: at most this many characters")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    pages = read_pages(Path(args.man_root), args.page_limit)
    if args.write_val_heldout:
        return write_val_heldout(pages, out, args)
    if args.write_test_nocopy:
        return write_test_nocopy(pages, out, args)
    train_names = [n for n in pages if not held_out(n, args.heldout_percent)]
    test_names = [n for n in pages if held_out(n, args.heldout_percent)]
    log.info("%d pages (%d held out), %.1f MB of text", len(pages), len(test_names),
             sum(map(len, pages.values())) / 1e6)
    tokenizer = build_tokenizer([pages[n] for n in train_names], args.vocab, 2048)
    train_ids = encode(tokenizer, [pages[n] for n in train_names])
    test = test_text(pages, args.heldout_percent, args.test_chars)
    (out / "test.txt").write_text(test)
    shuffled = train_names[:]
    random.Random(args.seed).shuffle(shuffled)
    (out / "train.txt").write_text("\n\n".join(pages[n] for n in shuffled)[:args.train_chars])
    test_ids = tokenizer(test, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    log.info("train %d tokens, test %d tokens", train_ids.numel(), test_ids.numel())

    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, rms_norm_eps=1e-6)
    model = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    budget = args.minutes * 60
    t0, step, losses = time.time(), 0, []
    model.train()
    while step < args.max_steps and time.time() - t0 < budget:
        frac = (time.time() - t0) / budget  # schedule on the time budget: warm-up, then cosine to 10%
        lr = args.lr * min(1.0, (step + 1) / 100) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(frac, 1.0))))
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, train_ids.numel() - args.seqlen - 1, (args.batch,))
        x = torch.stack([train_ids[s:s + args.seqlen] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        step += 1
        if step % 100 == 0:
            log.info("step %d loss %.3f lr %.2e (%.0fs)", step, sum(losses[-100:]) / 100, lr, time.time() - t0)
    seconds = time.time() - t0
    model.eval()
    ppl = perplexity(model, test_ids, args.seqlen)
    log.info("held-out perplexity %.2f after %d steps (%.0fs)", ppl, step, seconds)
    model.to(torch.float16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    stats = {"pages": len(pages), "heldout_pages": len(test_names), "train_tokens": int(train_ids.numel()),
             "test_tokens": int(test_ids.numel()), "params": n_params, "steps": step, "seconds": round(seconds),
             "tokens_seen": step * args.batch * args.seqlen, "final_train_loss": round(sum(losses[-100:]) /
                                                                                      max(1, len(losses[-100:])), 4),
             "test_perplexity_fp32": round(ppl, 3), "args": vars(args)}
    (out / "training_stats.json").write_text(json.dumps(stats, indent=2))
    (out / "README.md").write_text(f"""# manpage-llama

A {n_params / 1e6:.2f}M-parameter LLaMA (4 blocks, hidden 128, FFN 384, vocab {len(tokenizer)} byte-level BPE)
trained from scratch on the English manual pages of a Debian machine (sections 1, 5, 7, 8; troff stripped
to text) by `scripts/train_text_llama.py`, for the quality findings in `docs/results.md`.

- {len(pages)} pages, {len(test_names)} held out by a hash of their name; {train_ids.numel():,} training tokens
- {step} steps of {args.batch} x {args.seqlen} tokens ({stats['tokens_seen']:,} tokens), {seconds / 60:.1f} min on
  {args.threads} CPU thread(s)
- held-out perplexity (test.txt, {test_ids.numel():,} tokens, windows of {args.seqlen}): {ppl:.2f} in fp32
- `test.txt`: held-out pages (perplexity); `train.txt`: a slice of the training pages (calibration and
  fine-tuning text). The text is from the pages' own packages (free-software documentation).
- `val_heldout.txt` (only after `--write-val-heldout`): held-out pages past test.txt's cut, the validation
  text of `bench/recovery_sweep.py --val-from heldout`.

Rebuild: `python {' '.join(['scripts/train_text_llama.py'] + [f'--{k.replace("_", "-")} {v}' for k, v in vars(args).items() if v is not None and k in ('out', 'minutes', 'threads', 'seed')])}`
(the pages present on a machine differ, so a rebuild gives a similar, not the same, model).
""")
    return 0


def _checked_test_text(pages: dict[str, str], out: Path, args, writing: str) -> str | None:
    """test.txt's text as this machine's pages give it, or None (and a line) where out/test.txt differs: other
    pages here moved the cut, so what lies past it or inside it is not what the shipped files assume."""
    text = test_text(pages, args.heldout_percent, args.test_chars)
    if (out / "test.txt").read_text() != text:
        log.error("%s/test.txt is not what this machine's pages give; not writing %s", out, writing)
        return None
    return text


def write_val_heldout(pages: dict[str, str], out: Path, args) -> int:
    test = _checked_test_text(pages, out, args, "val_heldout.txt")
    if test is None:
        return 1
    names, text = val_heldout_text(pages, args.heldout_percent, args.test_chars, args.val_page_chars, args.val_chars)
    if any(pages[n][:500] in test for n in names):  # a copy of a test page under another name
        log.error("a val_heldout page's start is in test.txt; not writing val_heldout.txt")
        return 1
    (out / "val_heldout.txt").write_text(text)
    log.info("val_heldout.txt: %d pages, %d characters: %s", len(names), len(text), " ".join(names))
    return 0


def write_test_nocopy(pages: dict[str, str], out: Path, args) -> int:
    if _checked_test_text(pages, out, args, "test_nocopy.txt") is None:
        return 1
    kept, dropped, text = nocopy_text(pages, args.heldout_percent, args.test_chars)
    (out / "test_nocopy.txt").write_text(text)
    log.info("test_nocopy.txt: %d pages, %d characters; dropped %d copies of training pages: %s", len(kept),
             len(text), len(dropped), " ".join(dropped))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
