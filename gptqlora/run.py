"""The run folder: everything `merge`, `export`, `chat` and `generate` need, so they take only its path.

    RUN/
      run.json           the record (schema 2): base checkpoint, training data, data kinds, prompt template,
                         resolved arguments, quantization config, versions, result
      tokenizer files    a copy of the tokenizer
      .gptqlora.json     the marker: made by gptqlora (what --overwrite may replace; `gptqlora.paths`)
      adapter/           the final adapter (standard PEFT LoRA; our own settings in gptqlora_adapter.json)
      base/              the quantized base, when the run quantized it (or changed its codes)
      data/              copies of the training files, so a moved run still calibrates `merge --to gptq`
      checkpoints/       checkpoint-N/ (adapter + optimizer state), the last K
      train_log.jsonl    loss and eval records
      eval.json          task accuracy before/after (when measured)

`Run` knows every path in it; it is the only code that reads or writes run.json.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from gptqlora import paths
from gptqlora.checkpoint.io import SIDE_FILES
from gptqlora.devices import default_dtype, resolve_device
from gptqlora.paths import check_output

SCHEMA = 2
COPY_LIMIT = 512 * 2**20  # training files up to this size in all are copied in; larger ones are recorded by path
OWN_BASE = "base"
# what a run folder may hold (besides what its marker lists): a later --overwrite may remove these
RUN_ENTRIES = ("run.json", "adapter", OWN_BASE, "data", "checkpoints", "train_log.jsonl", "eval.json",
               *SIDE_FILES)


class RunError(ValueError):
    """A run folder that is incomplete or does not fit what it is used with."""


@dataclass
class RunInfo:
    """What run.json holds."""

    base: str  # "base": the run's own (RUN/base); else the absolute path of the checkpoint it trained on
    template: dict  # the prompt template (PromptTemplate.to_dict)
    data: list[dict] = field(default_factory=list)  # [{"source": absolute path, "copy": "data/NAME" | None}]
    data_kinds: list[str] = field(default_factory=list)  # alpaca / cot / chat
    base_model: str | None = None  # the fp16 model (quantized into RUN/base, or the SVD init's source)
    demo: bool = False
    args: dict = field(default_factory=dict)  # resolved arguments, by argument group
    versions: dict = field(default_factory=dict)
    quant_config: dict | None = None
    result: dict | None = None
    schema: int = SCHEMA

    @classmethod
    def from_json(cls, raw: dict, where: str) -> "RunInfo":
        if raw.get("schema", 1) == 1:
            raw = _upgrade_v1(raw)
        if raw["schema"] != SCHEMA:
            raise RunError(f"{where}: run.json schema {raw['schema']} is newer than this gptqlora reads ({SCHEMA})")
        names = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in raw.items() if k in names})
        except TypeError as e:
            raise RunError(f"{where}: not a complete run.json ({e})") from None


def _upgrade_v1(raw: dict) -> dict:
    """Runs written before run.json had a schema: data paths as typed, data kinds maybe missing."""
    data = [{"source": str(p), "copy": None} for p in raw.get("data") or []]
    kinds = raw.get("data_kinds")
    if kinds is None:
        kinds = sniff_data_kinds([d["source"] for d in data])
    return {**raw, "data": data, "data_kinds": kinds, "schema": SCHEMA}


def sniff_data_kinds(paths: Sequence[str | Path]) -> list[str]:
    """Record kinds of data files from each file's first record (unreadable files are left out)."""
    from gptqlora.data.records import detect_kind

    kinds = set()
    for p in paths:
        try:
            with open(p, encoding="utf-8") as f:
                head = f.read(1 << 16).lstrip()
            rec = json.JSONDecoder().raw_decode(head[1:].lstrip())[0] if head.startswith("[") else \
                json.loads(head.split("\n", 1)[0])
        except (OSError, ValueError):
            continue
        kind = detect_kind(rec) if isinstance(rec, dict) else None
        if kind:
            kinds.add(kind)
    return sorted(kinds)


def default_run_dir() -> Path:
    """runs/<time>: where a run goes without --output_dir (chosen once, on the main process)."""
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


class Run:
    """A run folder. `Run.create` starts one (finetune); `Run.open` reads one (everything else)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._info: RunInfo | None = None
        self._final: Path | None = None  # where a started run goes once its start succeeded

    # -- paths -------------------------------------------------------------------------------------------
    @property
    def info_file(self) -> Path:
        return self.root / "run.json"

    @property
    def adapter_dir(self) -> Path:
        return self.root / "adapter"

    @property
    def own_base_dir(self) -> Path:
        return self.root / OWN_BASE

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def train_log(self) -> Path:
        return self.root / "train_log.jsonl"

    @property
    def eval_file(self) -> Path:
        return self.root / "eval.json"

    @staticmethod
    def is_run(path: str | Path) -> bool:
        return (Path(path) / "run.json").is_file()

    # -- creating ----------------------------------------------------------------------------------------
    @classmethod
    def start(cls, root: str | Path, overwrite: bool = False, resume: bool = False,
              inputs: Mapping[str, str | Path | None] | None = None) -> "Run":
        """A run about to start, checked against the data-safety rules (`gptqlora.paths`) with the
        command's `inputs`: with `resume`, the existing run at `root`; else a new one, built in a temporary
        sibling until `publish` (so a failed start leaves nothing behind; `discard` removes it)."""
        root = Path(root)
        resuming = cls.check(root, overwrite, resume, inputs)
        if resuming:
            return cls(root)
        run = cls(paths.stage(root, "run"))
        run._final = root
        return run

    @classmethod
    def check(cls, root: str | Path, overwrite: bool = False, resume: bool = False,
              inputs: Mapping[str, str | Path | None] | None = None) -> bool:
        """The rules of `start`, checked without writing anything; whether an existing run is resumed."""
        root = Path(root)
        resuming = resume and cls.is_run(root)
        if cls.is_run(root) and not resuming and paths.read_marker(root) is None:
            raise paths.PathError(f"--output_dir {root}: holds a run written by an older gptqlora (no "
                                  f"{paths.MARKER}), which --overwrite does not remove; continue it with "
                                  f"--resume_from_checkpoint true, remove it yourself, or choose another "
                                  f"--output_dir")
        hint = (f"--output_dir {root}: already holds a run; pass --resume_from_checkpoint true to continue it, "
                f"--overwrite to replace it, or choose another --output_dir")
        check_output(root, "--output_dir", inputs, overwrite=overwrite, kind="run", expected=RUN_ENTRIES,
                     exists_hint=hint, reuse=resuming)
        return resuming

    @classmethod
    def create(cls, root: str | Path, overwrite: bool = False, resume: bool = False) -> "Run":
        """A new (or, with `resume`, the existing) run folder, in place at once (for the Python API)."""
        run = cls.start(root, overwrite, resume)
        run.publish()
        return run

    @property
    def staged(self) -> bool:
        return self._final is not None

    def publish(self) -> None:
        """Put a started run in place (its start succeeded); a no-op for a resumed run."""
        if self._final is not None:
            self.root = paths.publish(self.root, self._final, "run")
            self._final = None

    def discard(self) -> None:
        """Remove a run whose start failed (never a published one)."""
        if self._final is not None:
            paths.discard(self.root)

    def record(self, base: str | Path, data: Sequence[str | Path], data_kinds: Sequence[str], template: Any,
               **extra: Any) -> RunInfo:
        """Write run.json for a run starting now, copying the training files in (up to COPY_LIMIT)."""
        base = Path(base)
        base_entry = OWN_BASE if base.resolve() == self.own_base_dir.resolve() else str(base.resolve())
        self._info = RunInfo(base=base_entry, template=template.to_dict(), data=self._keep_data(data),
                             data_kinds=sorted(data_kinds), **extra)
        self.save_info()
        return self._info

    def _keep_data(self, files: Sequence[str | Path]) -> list[dict]:
        paths = [Path(f).resolve() for f in files]
        if sum(p.stat().st_size for p in paths) > COPY_LIMIT:
            return [{"source": str(p), "copy": None} for p in paths]
        names = [p.name for p in paths]
        if len(set(names)) < len(names):
            names = [f"{i}-{n}" for i, n in enumerate(names)]
        self.data_dir.mkdir(exist_ok=True)
        out = []
        for p, name in zip(paths, names):
            if p.parent != self.data_dir.resolve():
                shutil.copy2(p, self.data_dir / name)
            out.append({"source": str(p), "copy": f"data/{name}"})
        return out

    def save_info(self) -> None:
        self.info_file.write_text(json.dumps(asdict(self.info), indent=2, default=str))

    def update(self, **values: Any) -> None:
        for k, v in values.items():
            setattr(self.info, k, v)
        self.save_info()

    def save_tokenizer(self, tokenizer: Any) -> None:
        tokenizer.save_pretrained(self.root)

    def save_adapter(self, peft_model: Any) -> None:
        """The final adapter (atomically); the base too when training changed its codes (SVD alternations)."""
        from gptqlora.checkpoint.io import atomic_output_dir

        base = peft_model.get_base_model()
        own = getattr(base, "base_codes_modified", False) or self._info is None or self.info.base == OWN_BASE
        with atomic_output_dir(self.adapter_dir, overwrite=True, checked=True) as tmp:
            peft_model.save_pretrained(tmp)
            self._point_adapter_at_base(tmp, own)
        if getattr(base, "base_codes_modified", False):
            from gptqlora.checkpoint.checkpoint import save_quantized

            save_quantized(base, self.own_base_dir, overwrite=True, checked=True)
            self.update(base=OWN_BASE)

    def _point_adapter_at_base(self, adapter_dir: Path, own: bool) -> None:
        """base_model_name_or_path in a form that survives moving the run: the run's own base relative to the
        adapter folder ("../base"); a checkpoint outside the run by its absolute path."""
        path = adapter_dir / "adapter_config.json"
        if not path.is_file():
            return
        raw = json.loads(path.read_text())
        raw["base_model_name_or_path"] = f"../{OWN_BASE}" if own else self.info.base
        path.write_text(json.dumps(raw, indent=2, sort_keys=True))

    def write_eval(self, evals: dict[str, dict]) -> None:
        self.eval_file.write_text(json.dumps(
            {k: {kk: vv for kk, vv in v.items() if kk != "responses"} for k, v in evals.items()}, indent=2))

    # -- reading -----------------------------------------------------------------------------------------
    @classmethod
    def open(cls, root: str | Path) -> "Run":
        run = cls(root)
        run.info  # noqa: B018  (fails now, naming the folder, if it is not a run)
        return run

    @property
    def info(self) -> RunInfo:
        if self._info is None:
            if not self.info_file.is_file():
                raise RunError(f"{self.root}: no run.json; not a gptqlora run folder (made by `gptqlora finetune`)")
            try:
                raw = json.loads(self.info_file.read_text())
            except json.JSONDecodeError as e:
                raise RunError(f"{self.info_file}: not valid JSON ({e})") from None
            self._info = RunInfo.from_json(raw, str(self.info_file))
        return self._info

    def base_dir(self) -> Path:
        """The quantized base: the run's own (RUN/base), or the checkpoint it trained on."""
        p = Path(self.info.base)
        p = p if p.is_absolute() else self.root / p
        if not p.is_dir():
            raise RunError(f"{self.root}: its base checkpoint {p} is missing (moved or deleted?)")
        return p

    def adapter(self) -> Path:
        if not (self.adapter_dir / "adapter_config.json").is_file():
            raise RunError(f"{self.root}: no trained adapter in {self.adapter_dir} (the run did not finish; resume "
                           f"it with `gptqlora finetune --output_dir {self.root} --resume_from_checkpoint true`)")
        return self.adapter_dir

    def data_files(self) -> list[Path]:
        """The training files: the copies in the run, else where they were when the run started."""
        out = []
        for d in self.info.data:
            copy = self.root / d["copy"] if d.get("copy") else None
            if copy is not None and copy.is_file():
                out.append(copy)
            elif Path(d["source"]).is_file():
                out.append(Path(d["source"]))
            else:
                raise RunError(f"{self.root}: its training data {d['source']} is gone and the run holds no copy; "
                               f"pass a calibration file (--calibration)")
        return out

    @property
    def chat_data(self) -> bool:
        """Whether the run trained on chat records only (then chat and generate use the chat template)."""
        return self.info.data_kinds == ["chat"]

    @property
    def cutoff_len(self) -> int | None:
        return (self.info.args.get("DataArguments") or {}).get("cutoff_len")

    def template(self):
        from gptqlora.data.templates import PromptTemplate

        return PromptTemplate.from_dict(self.info.template)

    def tokenizer(self):
        from transformers import AutoTokenizer

        if not any((self.root / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
            raise RunError(f"{self.root}: the run's tokenizer files are missing (tokenizer.json or "
                           f"tokenizer.model); copy them back from its base model folder")
        try:
            return AutoTokenizer.from_pretrained(self.root, local_files_only=True)
        except (OSError, ValueError) as e:
            raise RunError(f"{self.root}: cannot load the run's tokenizer ({str(e).splitlines()[0]}); copy its "
                           f"tokenizer files back from the base model folder") from None

    def load(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
             adapter_name: str = "default"):
        """The run's quantized base with its trained adapter loaded."""
        from gptqlora.adapters.model import load_adapter
        from gptqlora.checkpoint.checkpoint import load_quantized

        adapter, base = self.adapter(), self.base_dir()
        device = resolve_device(device)
        model = load_quantized(base, device=device, dtype=dtype or default_dtype(device))
        return load_adapter(model, adapter, adapter_name=adapter_name)


def load_run(run_dir: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
             adapter_name: str = "default"):
    """The run's quantized base with its trained adapter loaded (what `chat` and `generate` use)."""
    return Run.open(run_dir).load(device, dtype, adapter_name)
