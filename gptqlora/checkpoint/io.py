"""Safetensors I/O: a validated reader over (sharded) checkpoints and an atomic, sharded writer.

Only safetensors are read: pickled `.bin`/`.pt` weights are refused, never unpickled.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from safetensors import SafetensorError, safe_open

from gptqlora.paths import check_output, output_dir

if TYPE_CHECKING:  # annotations only: parse_size checks --max-shard-size while the options parse, without torch
    import torch

INDEX_NAME = "model.safetensors.index.json"
PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")  # refused, never unpickled


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or does not match what it claims to be."""


class SafetensorsSource:
    """Read tensors by name from a model dir holding model.safetensors or an index with shards.

    Every file's header is checked when the source opens, so a truncated or corrupt file fails at once,
    naming the file, before any work starts. Tensors are read one at a time (memory-mapped).
    """

    def __init__(self, model_dir: str | Path) -> None:
        self.dir = Path(model_dir)
        if not self.dir.is_dir():
            raise CheckpointError(f"{self.dir}: no such directory")
        self.key_to_file: dict[str, Path] = {}
        for f in self._files():
            try:
                with safe_open(f, framework="pt") as h:
                    for k in h.keys():
                        self.key_to_file[k] = f
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{f}: corrupt or truncated safetensors file ({e}); "
                                      f"re-download or re-create it") from None
        if not self.key_to_file:
            raise CheckpointError(f"{self.dir}: the safetensors files hold no tensors")

    def _files(self) -> list[Path]:
        index = self.dir / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
            files = sorted({self.dir / v for v in weight_map.values()})
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{index} lists shards that are missing: {', '.join(missing)}")
            return files
        files = sorted(self.dir.glob("*.safetensors"))
        if files:
            return files
        pickled = [p.name for p in self.dir.iterdir() if p.suffix in PICKLED_SUFFIXES]
        if pickled:
            raise CheckpointError(f"{self.dir}: only pickled weights ({', '.join(sorted(pickled))}); gptqlora "
                                  f"reads safetensors only. Convert them with transformers: "
                                  f"from_pretrained(...).save_pretrained(dir, safe_serialization=True)")
        raise CheckpointError(f"{self.dir}: no *.safetensors weights found")

    def keys(self) -> list[str]:
        return list(self.key_to_file)

    def __contains__(self, key: str) -> bool:
        return key in self.key_to_file

    def get(self, key: str, device: str | torch.device = "cpu") -> torch.Tensor:
        f = self.key_to_file.get(key)
        if f is None:
            raise CheckpointError(f"{self.dir}: tensor '{key}' not found in the checkpoint")
        try:  # opened per read: a mapping kept open would keep every page read so far resident
            with safe_open(f, framework="pt") as h:
                t = h.get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{f}: cannot read tensor '{key}' ({e})") from None
        return t.to(device)

    def shape(self, key: str) -> tuple[int, ...]:
        """A tensor's shape from the file header, without reading its data."""
        f = self.key_to_file.get(key)
        if f is None:
            raise CheckpointError(f"{self.dir}: tensor '{key}' not found in the checkpoint")
        with safe_open(f, framework="pt") as h:
            return tuple(h.get_slice(key).get_shape())


def parse_size(size: int | str) -> int:
    """'2GB' / '500MB' / int bytes -> bytes."""
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    for unit, mult in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6),
                       ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


class ShardedWriter:
    """Write tensors into safetensors shards of at most `max_shard_size`, as they come (streaming).

    Shards are named model-0000i-of-0000n.safetensors with an index, or model.safetensors when one suffices.
    """

    def __init__(self, out_dir: str | Path, max_shard_size: int | str = "2GB") -> None:
        self.dir = Path(out_dir)
        self.limit = parse_size(max_shard_size)
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffer_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.buffer and self.buffer_bytes + nbytes > self.limit:
            self.flush()
        self.buffer[name] = tensor.detach().to("cpu").contiguous()
        self.buffer_bytes += nbytes
        self.total_bytes += nbytes

    def flush(self) -> None:
        if not self.buffer:
            return
        from safetensors.torch import save_file  # imports torch, which parse_size (an option type) must not

        path = self.dir / f"shard-{len(self.shards):05d}.tmp"
        save_file(self.buffer, str(path), metadata={"format": "pt"})
        self.shards.append((path, list(self.buffer)))
        self.buffer, self.buffer_bytes = {}, 0

    def close(self) -> list[str]:
        """Finish writing; returns the weight file names."""
        self.flush()
        n = len(self.shards)
        if n == 1:
            self.shards[0][0].rename(self.dir / "model.safetensors")
            return ["model.safetensors"]
        weight_map, names = {}, []
        for i, (path, keys) in enumerate(self.shards):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            path.rename(self.dir / name)
            names.append(name)
            weight_map.update({k: name for k in keys})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.dir / INDEX_NAME).write_text(json.dumps(index, indent=2))
        return names


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | Path, overwrite: bool = False, inputs: dict | None = None,
                      checked: bool = False) -> Iterator[Path]:
    """Yield a staging folder beside `out_dir`; on success it replaces `out_dir`, on error it is removed.

    Nothing is left half-written, and the rules of `gptqlora.paths` apply (checked here against `inputs`
    unless the caller `checked` them): --overwrite replaces only a folder gptqlora made."""
    if not checked:
        check_output(out_dir, "output folder", inputs, overwrite=overwrite, kind="model")
    with output_dir(out_dir, overwrite, kind="model", checked=True) as tmp:
        yield tmp


SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
              "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja",
              "chat_template.json", "generation_config.json")


def copy_side_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the tokenizer and generation config (small files a model dir needs besides weights/config)."""
    copied = []
    for name in SIDE_FILES:
        p = Path(src) / name
        if p.is_file():
            shutil.copy2(p, Path(dst) / name)
            copied.append(name)
    return copied
