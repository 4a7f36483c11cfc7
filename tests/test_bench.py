"""The GPU benchmarks' CPU smoke modes run and print what they promise (the figures come from a GPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(args, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_scale_benchmark_smoke(tmp_path):
    out = _run([str(ROOT / "bench" / "scale.py"), "--device", "cpu", "--shape", "tiny", "--set", "smoke",
                "--batches", "2x32", "--steps", "1", "--out", str(tmp_path)], tmp_path)
    (rec,) = [json.loads(line) for line in (tmp_path / "scale.jsonl").read_text().splitlines()]
    assert rec["checkpointing"] == "selective 2/4" and rec["offload"] and rec["loss"] == "chunked"
    assert rec["tokens_per_s"] > 0 and rec["loss_finite"] and len(rec["losses"]) == 3
    assert set(rec["breakdown_gib"]) == {"weights", "optimizer", "grads", "blocks", "head+loss", "backward", "cache"}
    assert rec["breakdown_gib"]["optimizer"] > 0  # AdamW moments of the LoRA weights: 8 bytes each
    table = [ln for ln in out[out.index("| bits |"):].splitlines() if ln.startswith("|")]
    assert len(table) == 3 and "| 2 | 2x32 | selective 2/4 | chunked | offload |" in table[2]


def test_quant_stream_smoke_and_its_memory_cap(tmp_path):
    args = [str(ROOT / "bench" / "quant_stream.py"), "--device", "cpu", "--shape", "tiny", "--layers", "3",
            "--nsamples", "2", "--seqlen", "32", "--out", str(tmp_path / "w")]
    out = _run([*args, "--max_rss_gib", "6"], tmp_path)
    rec = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    assert rec["layers"] == 3 and len(rec["seconds_per_block"]) == 3 and rec["peak_rss_gib"] <= 6
    assert 0 < rec["quantized_gib"] < rec["fp_checkpoint_gib"] and rec["worst_block_rel_error"] < 0.5
    assert not (tmp_path / "w" / "fp").exists()  # cleaned up without --keep
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, *args, "--max_rss_gib", "0.05"], capture_output=True, text=True, env=env)
    assert r.returncode == 3 and "passed --max_rss_gib 0.05" in r.stderr


def test_gemv_sweep_stage_scan_starts_from_todays_choice(tmp_path):
    """--stages: every row times today's config (pick_config) and its staged variants, and says per stage
    count what was best; the configs written carry loop_stages for pick_config."""
    out = tmp_path / "stages.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gemv_sweep.py"), "--small", "--bits", "4", "--ms", "1",
                        "--stages", "1,3", "--budget-s", "60", "--shapes", "256x128", "--json", str(out)],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["default"].get("loop_stages", 1) == 1 and row["tried"] >= 4
    assert set(row["best_us_by_loop_stages"]) == {"1", "3"}
    assert min(row["best_us_by_loop_stages"].values()) == row["best_us"]
    assert "loop_stages" in json.loads(out.read_text())["configs"][row["key"]]


def test_gemv_sweep_smoke_writes_the_table_pick_config_reads(tmp_path, monkeypatch):
    out = tmp_path / "sweep.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gemv_sweep.py"), "--small", "--bits", "4", "--ms", "1",
                        "--budget-s", "30", "--json", str(out)], capture_output=True, text=True, cwd=tmp_path, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads(out.read_text())
    assert len(rec["rows"]) == 3 and all(row["tried"] >= 1 and row["best_us"] > 0 for row in rec["rows"])
    assert sum(row["tried"] for row in rec["rows"]) >= 5  # beyond the defaults, within the budget
    assert set(rec["configs"]) == {row["key"] for row in rec["rows"]}

    import torch

    from gptqlora.kernels import gemv

    monkeypatch.setenv(gemv.TUNED_ENV, str(out))
    monkeypatch.setattr(gemv, "_CONFIGS", {})
    gemv.tuned_table.cache_clear()
    try:
        row = rec["rows"][0]
        k, n = map(int, row["shape"].split("x"))
        g_idx = torch.arange(k, dtype=torch.int32) // 128
        plan = gemv.plan_gemv(torch.zeros(k // 8, n, dtype=torch.int32), g_idx, 4, 128)
        cfg = gemv.pick_config(1, k, n, 4, plan, sms=gemv._sm_count(torch.device("cpu")))
        assert {f: cfg[f] for f in gemv.TUNABLE} == rec["configs"][row["key"]]
    finally:
        monkeypatch.delenv(gemv.TUNED_ENV)
        gemv.tuned_table.cache_clear()


def test_host_ops_smoke(tmp_path):
    out = _run([str(ROOT / "bench" / "host_ops.py"), "--reps", "3", "--step-reps", "1"], tmp_path)
    rec = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    assert [r["dropout"] for r in rec["per_call"]] == [0.05, 0.0]
    for r in rec["per_call"]:
        # before the cast cache: 18.8-19.5 ops per forward (and as many in the recomputation), 30-33 per backward
        assert 0 < r["recompute_ops_per_call"] < 15 and 0 < r["fwd_ops_per_call"] < 18.5
        assert 0 < r["bwd_ops_per_call"] < {0.05: 29.0, 0.0: 31.8}[r["dropout"]]  # before: 30.0 / 32.8
        assert r["fwd_py_calls_per_call"] > 0 and r["fwd_us_per_call"] > 0
    assert all(r["ops_per_step"] > 0 for r in rec["per_step"])


def test_decode_smoke_with_a_spqr_model(tmp_path):
    """bench/decode.py --bits spqr3 (issue 17): a micro SpQR model with the r=8 adapter decodes greedily through
    graph_decode's loop beside bf16 (on CPU the torch path: the Triton one runs minutes in the interpreter)."""
    out = tmp_path / "decode.json"
    _run([str(ROOT / "bench" / "decode.py"), "--device", "cpu", "--shape", "micro", "--bits", "spqr3", "--batches", "1",
          "--skip", "layers", "--prompt", "4", "--new", "3", "--json", str(out)], tmp_path)
    rows = {(r["model"], r["harness"]): r for r in json.loads(out.read_text())["generation"]}
    assert set(rows) == {("bf16", "same harness"), ("bf16", "plain transformers"), ("spqr3+lora r8", "same harness")}
    spqr = rows["spqr3+lora r8", "same harness"]
    assert 3.6 < spqr["avg_bits"] < 4.1 and rows["bf16", "same harness"]["avg_bits"] == 16.0
    assert spqr["weight_gb"] > 0 and spqr["graph_breaks"] == 0


def test_decode_spqr_model_is_adapted_and_its_bytes_counted():
    """build("spqr3") puts a SpQRLinear under each of the seven projections' GPTQLoraLinear, and weight_bytes
    counts every SpQR tensor (with the dense parameters but the embedding)."""
    import torch

    from gptqlora.adapters.layer import GPTQLoraLinear
    from gptqlora.formats.spqr import SPQR_TENSORS
    from gptqlora.nn.spqr_linear import SpQRLinear

    mod = _bench_module("decode")
    model = mod.build("spqr3", "micro", torch.device("cpu"))
    layers = [m.base_layer for m in model.modules() if isinstance(m, GPTQLoraLinear)]
    assert len(layers) == 7 * 2 and all(isinstance(m, SpQRLinear) and m.bits == 3 and m.group_size == 16
                                         and m.stat_bits == 3 and m.stat_group_size == 16 for m in layers)
    assert all(0.005 < m.outlier_fraction < 0.015 for m in layers)
    packed = sum(getattr(m, n).numel() * getattr(m, n).element_size() for m in layers for n in SPQR_TENSORS)
    dense = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)
    assert mod.weight_bytes(model) == packed + dense
    assert abs(mod.average_bits(model) - sum(m.average_bits for m in layers) / len(layers)) < 0.1

def _bench_module(name: str, folder: str = "bench"):
    """<folder>/<name>.py as a module (bench/ and scripts/ are scripts, not packages)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / folder / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gemlite_peer_gets_the_same_weights_in_hqq_form():
    """bench/gemlite_peer.py hands GemLite HQQ's (W_q - zeros) * scales with rows in group order: that must be
    the GPTQ layer's W, for x permuted like the act-order copy's rows (GemLite itself needs a GPU)."""
    import torch

    from gptqlora.kernels.gemv import plan_gemv
    from gptqlora.kernels.reference import dequantize

    peer = _bench_module("gemlite_peer")
    for bits, group in ((4, 128), (2, 64)):
        p = peer.gemv_sweep.packed_layer(512, 96, bits, torch.device("cpu"), bits)
        plan = plan_gemv(p[0], p[3], bits, group, True)
        w_q, s, z = peer.hqq_weights(p, plan, bits, group, torch.float32)
        assert w_q.dtype == torch.uint8 and w_q.shape == (96, 512) and s.shape == z.shape == (96, 512 // group)
        w = (w_q.float() - z.repeat_interleave(group, 1)) * s.repeat_interleave(group, 1)  # (N, K), group order
        x = torch.randn(3, 512, generator=torch.Generator().manual_seed(bits))
        torch.testing.assert_close(x[:, plan.perm.long()] @ w.t(), x @ dequantize(*p, bits, torch.float32),
                                   rtol=1e-5, atol=1e-5)


def test_recovery_sweep_table_takes_rows_without_a_test_score(tmp_path):
    """--no-test rows (validation-only choices) print with empty test cells instead of crashing the table."""
    mod = _bench_module("recovery_sweep")
    base = dict(distill=True, init="default", lr=3e-3, loss_last10=2.3, untrained_last10=2.4, test_nll=None)
    rows = [dict(base, base="fp", rank=0, val_nll=3.50), dict(base, base="/tmp/q2", rank=0, val_nll=3.60),
            dict(base, base="/tmp/q2", rank=16, init="svd", val_nll=3.52)]
    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    last = mod.table(str(path)).strip().splitlines()[-1]
    assert "| 80.0% |  |  |" in last, last


def test_recovery_sweep_table_scores_each_validation_text_against_its_own_references(tmp_path):
    """--val-from heldout rows close their gap against the fp and untrained rows measured on the same text,
    not the train-tail ones of the same file (whose validation NLL is on other pages)."""
    mod = _bench_module("recovery_sweep")
    base = dict(distill=True, init="svd", lr=3e-3, loss_last10=2.3, untrained_last10=2.4, test_nll=None)
    rows = [dict(base, base="fp", rank=0, val_nll=3.50), dict(base, base="/tmp/q2", rank=0, val_nll=3.60),
            dict(base, base="fp", rank=0, val_nll=3.00, val_from="heldout"),
            dict(base, base="/tmp/q2", rank=0, val_nll=3.20, val_from="heldout"),
            dict(base, base="/tmp/q2", rank=16, val_nll=3.52),
            dict(base, base="/tmp/q2", rank=16, val_nll=3.05, val_from="heldout")]
    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tail, heldout = mod.table(str(path)).strip().splitlines()[-2:]
    assert "| train-tail | 3.5200 | 80.0% |" in tail and "| heldout | 3.0500 | 75.0% |" in heldout, (tail, heldout)


def test_val_heldout_pages_are_held_out_past_the_test_cut_and_not_training_copies():
    """scripts/train_text_llama.py --write-val-heldout: val_heldout.txt takes the held-out section-1 pages that
    start after test.txt's cut (the straddling page dropped), skips gcloud pages and copies of training pages,
    and caps each page and the whole."""
    mod = _bench_module("train_text_llama", "scripts")
    names = [f"man1/p{i}.1.gz" for i in range(200)]
    held = [n for n in names if mod.held_out(n, 50)]
    train = [n for n in names if not mod.held_out(n, 50)]
    pages = {n: f"{n} text " * 10 for n in names}  # 10 x (len(n) + 6) characters
    pages[held[6]] = pages[train[0]]  # a copy of a training page under another name
    pages["man1/gcloud_x.1.gz"] = "gcloud " * 20
    pages["man5/conf.5.gz"] = "conf " * 30
    held = [n for n in pages if mod.held_out(n, 50)]  # main()'s order
    assert "man1/gcloud_x.1.gz" in held and "man5/conf.5.gz" in held  # (the hash puts both in; else rename)
    cut = len(pages[held[0]]) + 2 + len(pages[held[1]]) + 2 + 5  # 5 characters into the third page
    got, text = mod.val_heldout_text(pages, 50, cut, 40, 10_000)
    assert got == [n for n in held[3:] if n != held[6] and n.startswith("man1/p")]
    assert text == "\n\n".join(pages[n][:40] for n in got)
    assert mod.val_heldout_text(pages, 50, cut, 40, 100)[1] == text[:100]


def test_test_nocopy_keeps_test_pages_that_are_not_training_copies_cut_as_test_txt():
    """scripts/train_text_llama.py --write-test-nocopy: test_nocopy.txt is test.txt's held-out pages, in order,
    less those whose full text equals a training page's, the last one cut where test.txt cuts it."""
    mod = _bench_module("train_text_llama", "scripts")
    names = [f"man1/p{i}.1.gz" for i in range(200)]
    held = [n for n in names if mod.held_out(n, 50)]
    train = [n for n in names if not mod.held_out(n, 50)]
    pages = {n: f"{n} text " * 10 for n in names}
    pages[held[1]] = pages[train[0]]  # a copy of a training page under another name
    pages[held[2]] = pages[train[1]][:-1]  # not a full copy: kept
    test_chars = sum(len(pages[n]) + 2 for n in held[:4]) + 7  # 7 characters into the fifth page
    test = "\n\n".join(pages[n] for n in held)[:test_chars]
    kept, dropped, text = mod.nocopy_text(pages, 50, test_chars)
    assert kept == [held[0], held[2], held[3], held[4]] and dropped == [held[1]]
    assert text == "\n\n".join([pages[held[0]], pages[held[2]], pages[held[3]], pages[held[4]][:7]])
    assert test.endswith(pages[held[4]][:7]) and all(part in test for part in text.split("\n\n"))
    kept, dropped, _ = mod.nocopy_text(pages, 50, test_chars - 7)  # the cut at the fifth page's start
    assert kept == [held[0], held[2], held[3]]


def _content_pages(mod):
    """Synthetic pages for --split content: 120 distinct texts (lines of their own), copies of some under other
    names (one with other case and line breaks), and a near-copy built from a training page's lines."""
    pages = {f"man1/p{i:03d}.1.gz": "\n".join(f"page {i} line {j}: " + "words of its own here " * 3 for j in range(8))
             for i in range(120)}
    names = list(pages)
    pages["man1/zz-copy-a.1.gz"] = pages[names[3]]
    pages["man1/zz-copy-b.1.gz"] = "  " + pages[names[5]].upper().replace("\n", "\n\n ")  # same content_key
    pages["man1/zz-copy-c.1.gz"] = pages[names[7]]
    return pages


def test_content_split_puts_every_copy_of_a_text_on_one_side_and_scores_it_once():
    """--split content: a page's side is the hash of its content_key (lower-cased, whitespace collapsed), so
    no held-out page has a training page's text under another name; repeats of a held-out text are scored
    once; the name split (the default) is unchanged."""
    mod = _bench_module("train_text_llama", "scripts")
    pages = _content_pages(mod)
    assert mod.content_key(pages["man1/zz-copy-b.1.gz"]) == mod.content_key(pages["man1/p005.1.gz"])
    assert mod.heldout_names(pages, 50) == [n for n in pages if mod.held_out(n, 50)]  # the default: by name
    assert mod.split_stats(pages, 50)["heldout_copies_of_train"] > 0  # the name split mixes the copies
    held = mod.heldout_names(pages, 50, "content", near_copy=1)
    train = mod.train_names(pages, 50, "content")
    keys = lambda ns: [mod.content_key(pages[n]) for n in ns]  # noqa: E731
    assert not set(keys(held)) & set(keys(train)) and len(set(keys(held))) == len(held)
    assert set(held) | set(train) | {"man1/zz-copy-a.1.gz", "man1/zz-copy-b.1.gz", "man1/zz-copy-c.1.gz"} == set(pages)
    for copy, orig in (("a", 3), ("b", 5), ("c", 7)):  # each copy sits on its original's side, or is a repeat
        c, o = f"man1/zz-copy-{copy}.1.gz", f"man1/p{orig:03d}.1.gz"
        assert (c in train) == (o in train) and c not in held
    stats = mod.split_stats(pages, 50, "content", near_copy=1)
    assert stats["heldout_copies_of_train"] == 0 and stats["duplicate_pages"] == 3
    assert stats["heldout"] == len(held) and stats["heldout_copies_dropped"] == sum(
        mod.held_out(mod.content_key(pages[f"man1/p{i:03d}.1.gz"]), 50) for i in (3, 5, 7))
    test = mod.test_text(pages, 50, 10**6, "content", near_copy=1)
    assert not any(pages[n] in test for n in train)


def test_content_split_drops_held_out_near_copies_of_training_lines():
    """copied_share: the share of a page's (long) line text found among the training pages' lines; held-out
    pages above --near-copy are not scored (neither trained on), the rest are."""
    mod = _bench_module("train_text_llama", "scripts")
    pages = _content_pages(mod)
    train = mod.train_names(pages, 50, "content")
    lines = mod.line_keys(pages[n] for n in train)
    src = pages[train[0]].splitlines()
    near = "\n".join(src[:6] + ["a line of this page alone, long enough to count as text " * 2] * 2)
    assert 0.6 < mod.copied_share(near, lines) < 0.9 and mod.copied_share("short\nlines", lines) == 0.0
    i = 0
    while not mod.held_out(mod.content_key(near + f"\n{i}"), 50):  # a variant the hash holds out
        i += 1
    pages["man1/zz-near.1.gz"] = near + f"\n{i}"
    assert "man1/zz-near.1.gz" in mod.heldout_names(pages, 50, "content", near_copy=1)
    assert "man1/zz-near.1.gz" not in mod.heldout_names(pages, 50, "content", near_copy=0.5)
    assert mod.split_stats(pages, 50, "content", near_copy=0.5)["heldout_near_copies_dropped"] == 1


def test_val_heldout_with_the_content_split_is_disjoint_from_test_and_train():
    """--write-val-heldout --split content: the validation pages lie past test.txt's cut, and none has the
    content_key of a test page or of a training page."""
    mod = _bench_module("train_text_llama", "scripts")
    pages = _content_pages(mod)
    pages["man1/zz-copy-d.1.gz"] = pages[mod.heldout_names(pages, 50, "content")[0]]  # a copy of a test page
    held = mod.heldout_names(pages, 50, "content")
    cut = sum(len(pages[n]) + 2 for n in held[:5]) + 3
    names, text = mod.val_heldout_text(pages, 50, cut, 10_000, 10**6, "content")
    test = mod.test_text(pages, 50, cut, "content")
    train_keys = {mod.content_key(pages[n]) for n in mod.train_names(pages, 50, "content")}
    assert names == held[6:] and text == "\n\n".join(pages[n] for n in names)
    assert not any(mod.content_key(pages[n]) in train_keys or pages[n][:200] in test for n in names)


def test_train_text_llama_content_split_smoke(tmp_path):
    """main() --split content on a synthetic man tree: test.txt holds no training page's text, the README and
    training_stats say so, and --write-val-heldout writes a validation text disjoint from both."""
    import gzip

    mod = _bench_module("train_text_llama", "scripts")
    pages = _content_pages(mod)
    (tmp_path / "man" / "man1").mkdir(parents=True)
    for n, t in pages.items():
        troff = "\n".join(".PP\n" + line for line in t.splitlines())
        (tmp_path / "man" / n).write_bytes(gzip.compress(troff.encode()))
    out = tmp_path / "m"
    common = ["--out", str(out), "--man-root", str(tmp_path / "man"), "--heldout-percent", "50", "--split", "content",
              "--test-chars", "3000", "--threads", "1"]
    assert mod.main(common + ["--minutes", "0.01", "--max-steps", "1", "--vocab", "300", "--seqlen", "32",
                              "--batch", "2", "--train-chars", "3000"]) == 0
    stats = json.loads((out / "training_stats.json").read_text())
    assert stats["split"]["heldout_copies_of_train"] == 0 and stats["args"]["split"] == "content"
    assert "normalised text" in (out / "README.md").read_text()
    read = mod.read_pages(tmp_path / "man", None)
    train = mod.train_names(read, 50, "content")
    test = (out / "test.txt").read_text()
    assert test and not any(read[n] in test for n in train)
    assert mod.main(common + ["--write-val-heldout"]) == 0
    val = (out / "val_heldout.txt").read_text()
    assert val and not any(p in test or p in {read[n] for n in train} for p in val.split("\n\n"))
    # the name split's test.txt is another text: refused
    assert mod.main([*common[:-6], "--split", "name", "--test-chars", "3000", "--write-val-heldout"]) == 1


def test_recovery_sweep_model_option_reads_that_folder(tmp_path):
    """--model DIR: the fp base, train.txt, test.txt and val_heldout.txt come from DIR; the row records it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    ttl = _bench_module("train_text_llama", "scripts")
    mod = _bench_module("recovery_sweep")
    text = "\n\n".join(f"page {i}: the quick brown fox jumps over the lazy dog {i % 7} times" for i in range(300))
    tok = ttl.build_tokenizer([text], 300, 2048)
    d = tmp_path / "m"
    tok.save_pretrained(d)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(d)
    for f in ("train.txt", "test.txt", "val_heldout.txt"):
        (d / f).write_text(text)
    out = tmp_path / "s.jsonl"
    assert mod.main(["--model", str(d), "--base", "fp", "--rank", "0", "--steps", "2", "--batch", "2",
                     "--val-from", "heldout", "--out", str(out)]) == 0
    row = json.loads(out.read_text())
    assert row["model"] == str(d)
    from gptqlora.eval.perplexity import perplexity, text_ids

    assert abs(row["test_nll"] - perplexity(model.float(), text_ids(tok, text), 256, batch_size=8)["nll"]) < 1e-4
    assert abs(row["val_nll"] - row["test_nll"]) < 1e-4  # the same text in that folder


def test_recovery_sweep_generated_windows_keep_prefixes_match_uncached_sampling_and_cache(tmp_path):
    """--windows-from generated: each window keeps its real prefix, the continuation is what sampling without
    the KV cache gives for the same generator, the seed fixes it, and a second call reads the cache."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    mod = _bench_module("recovery_sweep")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / "m")
    x = torch.randint(0, 32, (5, 12))
    gen = mod.generated(model, x, 4, 7, tmp_path / "m", eos=2, batch=2, cache_dir=tmp_path / "c")
    assert gen.shape == x.shape and torch.equal(gen[:, :4], x[:, :4]) and not torch.equal(gen, x)
    g, rows = torch.Generator().manual_seed(7), []
    with torch.no_grad():
        for i in range(0, 5, 2):
            seq = x[i:i + 2, :4]
            while seq.shape[1] < 12:  # full forward every step, no cache
                p = torch.softmax(model(input_ids=seq).logits[:, -1].float(), -1)
                seq = torch.cat([seq, torch.multinomial(p, 1, generator=g)], 1)
            rows.append(seq)
    assert torch.equal(gen, torch.cat(rows))
    assert len(list((tmp_path / "c").iterdir())) == 1
    assert torch.equal(mod.generated(None, x, 4, 7, tmp_path / "m", eos=2, cache_dir=tmp_path / "c"), gen)  # cached
    other = mod.generated(model, x, 0, 7, tmp_path / "m", eos=2, cache_dir=tmp_path / "c")  # EOS start
    assert (other[:, 0] == 2).all() and len(list((tmp_path / "c").iterdir())) == 2


def test_decode_spqr_mix_model_holds_session_25s_recipe():
    """build("spqrmix"): q_proj and k_proj 3-bit SpQR in groups of 128, the other five 4-bit in groups of 64,
    ~0.01% outliers, under 4.0 bits on average (the 3.994-bit mix of docs/results.md section 3)."""
    import torch

    from gptqlora.adapters.layer import GPTQLoraLinear

    mod = _bench_module("decode")
    model = mod.build("spqrmix", "micro", torch.device("cpu"))
    named = {n.rsplit(".", 1)[-1]: m.base_layer for n, m in model.named_modules() if isinstance(m, GPTQLoraLinear)}
    assert {k: (m.bits, m.group_size) for k, m in named.items()} == {
        "q_proj": (3, 128), "k_proj": (3, 128), "v_proj": (4, 64), "o_proj": (4, 64), "gate_proj": (4, 64),
        "up_proj": (4, 64), "down_proj": (4, 64)}
    layers = [m.base_layer for m in model.modules() if isinstance(m, GPTQLoraLinear)]
    assert all(m.outlier_fraction < 1e-3 for m in layers)
    assert 3.8 < mod.average_bits(model) < 4.0
