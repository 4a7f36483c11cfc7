"""One finetune run with the scale options: --report_to wandb offline (what CI runs), --optim
paged_adamw_8bit (8-bit moments), --gradient_checkpointing selective, --loss chunked."""

import json

import pytest
import torch

from gptqlora.cli import main


@pytest.fixture
def data_file(tmp_path):
    from gptqlora.data.synthetic import string_records

    p = tmp_path / "train.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in string_records(16, seed=2)))
    return p


def test_wandb_offline_and_paged_adamw_8bit(tiny_run, data_file, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    pytest.importorskip("bitsandbytes")
    import gptqlora.train.trainer as t
    from transformers import TrainerCallback

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    seen = {}

    class Record(TrainerCallback):
        def on_train_end(self, args, state, control, optimizer=None, **kw):
            inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
            seen["optimizer"] = f"{type(inner).__module__}.{type(inner).__name__}"
            seen["paged"] = inner.param_groups[0].get("is_paged", getattr(inner, "is_paged", None))
            seen["state_dtypes"] = {str(v.dtype) for s in inner.state.values() for v in s.values()
                                    if torch.is_tensor(v) and v.numel() > 1}

    init = t.GPTQLoraTrainer.__init__
    monkeypatch.setattr(t.GPTQLoraTrainer, "__init__",
                        lambda self, *a, **k: (init(self, *a, **k), self.add_callback(Record()))[0])
    rc = main(["finetune", "--quant_checkpoint", str(tiny_run / "base"), "--data", str(data_file),
               "--output_dir", str(tmp_path / "run"), "--max_steps", "3", "--micro_batch_size", "4",
               "--batch_size", "4", "--cutoff_len", "256", "--logging_steps", "1", "--lora_r", "32",
               "--report_to", "wandb", "--run_name", "ci-offline", "--optim", "paged_adamw_8bit",
               "--gradient_checkpointing", "selective", "--checkpoint_fraction", "0.5", "--loss", "chunked"])
    run = wandb.run  # the Trainer's wandb callback leaves it open
    summary, name, offline = dict(run.summary), run.name, run.offline
    wandb.finish()
    # The run file is written by wandb's service process; finish() can return before the service has
    # flushed it (CI once saw only the 7-byte header). teardown() waits for the service to shut down.
    wandb.teardown()
    assert rc == 0
    # transformers' paged_adamw_8bit: bitsandbytes' AdamW with optim_bits=8, is_paged (no paging on a CPU)
    assert seen["optimizer"].startswith("bitsandbytes.optim") and "torch.uint8" in seen["state_dtypes"]
    assert offline and name == "ci-offline"
    assert "train/loss" in summary and summary["train/global_step"] == 3
    (log,) = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))  # what `wandb sync` uploads
    data = log.read_bytes()
    assert len(data) > 1000 and b"train/loss" in data  # the logged history is in it, not only a header
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["result"]["checkpointing"]["mode"] == "selective"
    assert info["result"]["checkpointing"]["blocks_recomputed"] == 1  # of the tiny base's 2
    assert info["args"]["TrainArguments"]["loss"] == "chunked"

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_paged_adamw_8bit_pages_on_a_gpu():
    bnb = pytest.importorskip("bitsandbytes")
    p = torch.nn.Parameter(torch.randn(64, 128, device="cuda"))
    opt = bnb.optim.PagedAdamW8bit([p], lr=1e-3)
    p.grad = torch.randn_like(p)
    opt.step()
    state = opt.state[p]
    assert state["state1"].dtype == torch.uint8 and getattr(state["state1"], "is_paged", False)
