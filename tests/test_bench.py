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
