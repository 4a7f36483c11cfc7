#!/usr/bin/env python
"""Train a small LLaMA on real English text found on a Debian machine: its manual pages.

The quality findings (bench/findings.py, docs/results.md) need a model trained on real text, with
held-out perplexity that means something. This script builds one on CPU in about a quarter of an hour:

1. reads the English manual pages in /usr/share/man/man{1,5,7,8} (gzip'd troff), strips the troff markup
   to plain text, and splits them by page: ~4% held out, by a hash of the page name (`--split name`, the
   shipped bench/assets/manpage-llama) or of its normalised text (`--split content`: every copy of one text,
   under whatever names, falls on one side; see `content_key`);
2. trains a byte-level BPE tokenizer (`--vocab` tokens) on the training pages;
3. trains a `LlamaForCausalLM` (4 blocks, hidden 128, FFN 384: about 1.1M parameters) on random
   `--seqlen`-token windows of the training text;
4. writes model + tokenizer, `test.txt` (held-out pages, the perplexity text), `train.txt` (a slice of the
   training text, the calibration and fine-tuning text of the findings) and a README with the numbers.

    python scripts/train_text_llama.py --out bench/assets/manpage-llama --minutes 14
    python scripts/train_text_llama.py --out bench/assets/manpage-llama-v2 --split content --minutes 14

`--split name` (the default) lets one text into both sides under two names (as.1 = x86_64-linux-gnu-as.1:
69.8% of the shipped test.txt's characters are training pages, docs/results.md, issue 18). `--split content`
hashes `content_key(text)` (lower-cased, whitespace collapsed) instead, keeps only the first page of each
held-out text (the copies under other names are dropped from the held-out list, and counted in the log), and
does not score a held-out page whose long lines are mostly (`--near-copy`, 0.5) training pages' lines
(`copied_share`: 665 of the 721 held-out gcloud_* pages, templates of one another, and 12 others here); it
asserts that no test.txt page's key is a training page's nor its copied share above `--near-copy`. The
`--write-*` options take the same `--split` (and `--near-copy`) as the model they write for.

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


SPLITS = ("name", "content")


def content_key(text: str) -> str:
    """What `--split content` hashes: the text lower-cased, every run of whitespace one space, stripped; so
    copies that differ only in case, line breaks or indentation share a key (and a side)."""
    return " ".join(text.lower().split())


NEAR_COPY = 0.5  # --split content: a held-out page more than this share copied from training lines is not scored
LINE_MIN = 40  # characters (after content_key) a line needs to count in copied_share


def line_keys(texts) -> set[str]:
    """content_key of every line of `texts` at least LINE_MIN characters long."""
    return {k for t in texts for line in t.splitlines() if len(k := content_key(line)) >= LINE_MIN}


def copied_share(text: str, train_lines: set[str]) -> float:
    """The share of `text`'s characters, in lines of at least LINE_MIN characters (after content_key), whose
    line is also a training page's line: near-copies (a template page, a page of the same family: the
    gcloud_* pages share most of their text) score high, a page of its own near 0."""
    tot = hit = 0
    for line in text.splitlines():
        k = content_key(line)
        if len(k) >= LINE_MIN:
            tot += len(k)
            hit += len(k) * (k in train_lines)
    return hit / tot if tot else 0.0


def _content_heldout(pages: dict[str, str], percent: int,
                     near_copy: float) -> tuple[list[str], list[str], list[str]]:
    """--split content: (held-out pages, held-out copies dropped as a repeat of an earlier held-out page's
    content_key, held-out pages dropped as near-copies: copied_share > near_copy)."""
    seen, first, dups = set(), [], []
    for n, t in pages.items():
        k = content_key(t)
        if held_out(k, percent):
            (dups if k in seen else first).append(n)
        seen.add(k)
    if near_copy >= 1:
        return first, dups, []
    lines = line_keys(pages[n] for n in train_names(pages, percent, "content"))
    near = [n for n in first if copied_share(pages[n], lines) > near_copy]
    drop = set(near)
    return [n for n in first if n not in drop], dups, near


def heldout_names(pages: dict[str, str], percent: int, split: str = "name",
                  near_copy: float = NEAR_COPY) -> list[str]:
    """The held-out (scored) pages, in `pages`' order. `name`: those whose name hashes under `percent`.
    `content`: those whose `content_key` hashes under it, only the first page of each key, and not those
    whose `copied_share` of training lines exceeds `near_copy` (1: keep them). The dropped pages are neither
    scored nor trained on (see `train_names`)."""
    if split == "name":
        return [n for n in pages if held_out(n, percent)]
    if split != "content":
        raise ValueError(f"split {split!r}: one of {SPLITS}")
    return _content_heldout(pages, percent, near_copy)[0]


def train_names(pages: dict[str, str], percent: int, split: str = "name") -> list[str]:
    """The training pages, in `pages`' order: those not held out (`content`: whose key is not held out; the
    training side keeps every copy of its texts, as the name split does)."""
    if split == "name":
        return [n for n in pages if not held_out(n, percent)]
    if split != "content":
        raise ValueError(f"split {split!r}: one of {SPLITS}")
    return [n for n, t in pages.items() if not held_out(content_key(t), percent)]


def split_stats(pages: dict[str, str], percent: int, split: str = "name", near_copy: float = NEAR_COPY) -> dict:
    """Counts for the log and README: pages, held-out (scored) pages, pages that share their content_key with
    an earlier page (`duplicate_pages`), held-out copies deduplicated and near-copies dropped (content split),
    and held-out pages whose key is a training page's (`heldout_copies_of_train`: 0 for the content split)."""
    if split == "content":
        held, dups, near = _content_heldout(pages, percent, near_copy)
    else:
        held, dups, near = heldout_names(pages, percent, split), [], []
    train_keys = {content_key(pages[n]) for n in train_names(pages, percent, split)}
    keys = [content_key(t) for t in pages.values()]
    return {"pages": len(pages), "heldout": len(held), "duplicate_pages": len(keys) - len(set(keys)),
            "heldout_copies_dropped": len(dups), "heldout_near_copies_dropped": len(near),
            "heldout_copies_of_train": sum(content_key(pages[n]) in train_keys for n in held)}


def test_text(pages: dict[str, str], percent: int, test_chars: int, split: str = "name",
              near_copy: float = NEAR_COPY) -> str:
    """test.txt: the held-out pages in order, joined by blank lines, cut at `test_chars`."""
    return "\n\n".join(pages[n] for n in heldout_names(pages, percent, split, near_copy))[:test_chars]


def _held_out_starts(pages: dict[str, str], percent: int, split: str = "name", near_copy: float = NEAR_COPY):
    """(name, start) of each held-out page in order, start its offset in test_text's join before the cut;
    and the set of the training pages' texts (to tell a held-out page that copies one under another name)."""
    train_texts = {pages[n] for n in train_names(pages, percent, split)}
    starts, pos = [], 0
    for n in heldout_names(pages, percent, split, near_copy):
        starts.append((n, pos))
        pos += len(pages[n]) + 2
    return starts, train_texts


def val_heldout_text(pages: dict[str, str], percent: int, test_chars: int, page_chars: int,
                     total_chars: int, split: str = "name", near_copy: float = NEAR_COPY) -> tuple[list[str], str]:
    """(page names, text) of a validation split disjoint from both train and test: the held-out pages (in
    main()'s order) that start after test.txt's cut (the page straddling the cut is dropped), kept only if
    they are classic section-1 pages like test.txt's (no gcloud_* pages: most of the held-out pages past the
    cut are gcloud's) and not a copy of a training page under another name (vi = vim, zcat = gzip, ...);
    each page's first `page_chars` characters (so no one page dominates), joined by blank lines, capped at
    `total_chars`. Nor a page whose `content_key` is a test page's or a training page's (the content split
    already keeps both out; with the name split this drops nothing the full-text test does not)."""
    starts, train_texts = _held_out_starts(pages, percent, split, near_copy)
    test_keys = {content_key(pages[n]) for n, start in starts if start < test_chars}
    train_keys = {content_key(t) for t in train_texts}
    names = [n for n, start in starts if start >= test_chars and n.startswith("man1/")
             and not n.startswith("man1/gcloud") and pages[n] not in train_texts
             and content_key(pages[n]) not in test_keys and content_key(pages[n]) not in train_keys]
    return names, "\n\n".join(pages[n][:page_chars] for n in names)[:total_chars]


def nocopy_text(pages: dict[str, str], percent: int, test_chars: int,
                split: str = "name", near_copy: float = NEAR_COPY) -> tuple[list[str], list[str], str]:
    """(kept page names, dropped page names, text): the held-out pages (in main()'s order) that test.txt's
    `test_chars` reach, less those whose full text equals a training page's (as.1 = x86_64-linux-gnu-as.1,
    ...), each cut where test.txt cuts it, joined by blank lines."""
    starts, train_texts = _held_out_starts(pages, percent, split, near_copy)
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
    p.add_argument("--split", default="name", choices=SPLITS,
                   help="held out by a hash of the page name (default: the shipped model) or of its normalised "
                        "text (content: copies under other names stay on one side)")
    p.add_argument("--near-copy", type=float, default=NEAR_COPY,
                   help="--split content: held-out pages with more than this share of their text in training lines "
                        "(copied_share) are not scored (1: score them)")
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
    tr_names = train_names(pages, args.heldout_percent, args.split)
    test_names = heldout_names(pages, args.heldout_percent, args.split, args.near_copy)
    log.info("%d pages (%d held out, split by %s), %.1f MB of text", len(pages), len(test_names), args.split,
             sum(map(len, pages.values())) / 1e6)
    sstats = split_stats(pages, args.heldout_percent, args.split, args.near_copy)
    log.info("split: %s", sstats)
    test = test_text(pages, args.heldout_percent, args.test_chars, args.split, args.near_copy)
    if args.split == "content":
        starts, _ = _held_out_starts(pages, args.heldout_percent, args.split, args.near_copy)
        train_keys = {content_key(pages[n]) for n in tr_names}
        reached = [n for n, start in starts if start < args.test_chars]
        assert not any(content_key(pages[n]) in train_keys for n in reached), "a test.txt page is a training page"
        assert len({content_key(pages[n]) for n in reached}) == len(reached), "a page twice in test.txt"
        lines = line_keys(pages[n] for n in tr_names)
        shares = [copied_share(pages[n], lines) for n in reached]
        assert max(shares) <= args.near_copy, "a test.txt page is a near-copy of training text"
        log.info("test.txt: %d pages, none a copy of a training page (%d held-out copies deduplicated, %d held-out "
                 "near-copies dropped; copied_share of the pages kept: mean %.3f, max %.3f): %s", len(reached),
                 sstats["heldout_copies_dropped"], sstats["heldout_near_copies_dropped"],
                 sum(shares) / len(shares), max(shares), " ".join(reached))
    tokenizer = build_tokenizer([pages[n] for n in tr_names], args.vocab, 2048)
    train_ids = encode(tokenizer, [pages[n] for n in tr_names])
    (out / "test.txt").write_text(test)
    shuffled = tr_names[:]
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
             "test_perplexity_fp32": round(ppl, 3), "split": sstats, "args": vars(args)}
    (out / "training_stats.json").write_text(json.dumps(stats, indent=2))
    how = ("a hash of their name" if args.split == "name" else
           f"a hash of their normalised text (`--split content`: {sstats['duplicate_pages']} pages share their "
           f"text with another page; {sstats['heldout_copies_dropped']} held-out repeats and "
           f"{sstats['heldout_near_copies_dropped']} held-out near-copies, more than {args.near_copy:.0%} of their "
           f"text in training lines, not scored; no scored page is a training page's text)")
    (out / "README.md").write_text(f"""# {out.name}

A {n_params / 1e6:.2f}M-parameter LLaMA (4 blocks, hidden 128, FFN 384, vocab {len(tokenizer)} byte-level BPE)
trained from scratch on the English manual pages of a Debian machine (sections 1, 5, 7, 8; troff stripped
to text) by `scripts/train_text_llama.py`, for the quality findings in `docs/results.md`.

- {len(pages)} pages, {len(test_names)} held out by {how}; {train_ids.numel():,} training tokens
- {step} steps of {args.batch} x {args.seqlen} tokens ({stats['tokens_seen']:,} tokens), {seconds / 60:.1f} min on
  {args.threads} CPU thread(s)
- held-out perplexity (test.txt, {test_ids.numel():,} tokens, windows of {args.seqlen}): {ppl:.2f} in fp32
- `test.txt`: held-out pages (perplexity); `train.txt`: a slice of the training pages (calibration and
  fine-tuning text). The text is from the pages' own packages (free-software documentation).
- `val_heldout.txt` (only after `--write-val-heldout`): held-out pages past test.txt's cut, the validation
  text of `bench/recovery_sweep.py --val-from heldout`.

Rebuild: `python {' '.join(['scripts/train_text_llama.py'] + [f'--{k.replace("_", "-")} {v}' for k, v in vars(args).items() if v is not None and k in ('out', 'split', 'minutes', 'threads', 'seed')])}`
(the pages present on a machine differ, so a rebuild gives a similar, not the same, model).
""")
    return 0


def _checked_test_text(pages: dict[str, str], out: Path, args, writing: str) -> str | None:
    """test.txt's text as this machine's pages give it, or None (and a line) where out/test.txt differs: other
    pages here moved the cut, so what lies past it or inside it is not what the shipped files assume."""
    text = test_text(pages, args.heldout_percent, args.test_chars, args.split, args.near_copy)
    if (out / "test.txt").read_text() != text:
        log.error("%s/test.txt is not what this machine's pages give; not writing %s", out, writing)
        return None
    return text


def write_val_heldout(pages: dict[str, str], out: Path, args) -> int:
    test = _checked_test_text(pages, out, args, "val_heldout.txt")
    if test is None:
        return 1
    names, text = val_heldout_text(pages, args.heldout_percent, args.test_chars, args.val_page_chars, args.val_chars,
                                   args.split, args.near_copy)
    if any(pages[n][:500] in test for n in names):  # a copy of a test page under another name
        log.error("a val_heldout page's start is in test.txt; not writing val_heldout.txt")
        return 1
    (out / "val_heldout.txt").write_text(text)
    log.info("val_heldout.txt: %d pages, %d characters: %s", len(names), len(text), " ".join(names))
    return 0


def write_test_nocopy(pages: dict[str, str], out: Path, args) -> int:
    if _checked_test_text(pages, out, args, "test_nocopy.txt") is None:
        return 1
    kept, dropped, text = nocopy_text(pages, args.heldout_percent, args.test_chars, args.split, args.near_copy)
    (out / "test_nocopy.txt").write_text(text)
    log.info("test_nocopy.txt: %d pages, %d characters; dropped %d copies of training pages: %s", len(kept),
             len(text), len(dropped), " ".join(dropped))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
