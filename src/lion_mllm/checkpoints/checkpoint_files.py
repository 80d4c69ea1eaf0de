"""Weight files as PyTorch and Hugging Face write them, read without unpickling code and written as
(sharded) safetensors. Nothing here knows LION; every failure is a CheckpointError naming the file."""

from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import CheckpointError

__all__ = ["LazySafetensors", "WEIGHTS_INDEX", "folder_written_whole", "fsync_folder", "read_hf_weights",
           "read_safetensors", "read_torch_file", "save_state_sharded", "shareable_file_mode"]


def read_torch_file(path: Path) -> dict[str, torch.Tensor]:
    """A .pth/.bin state dict (`{'model': ...}` or bare), tensors only, memory-mapped."""
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, expected a PyTorch checkpoint file (.pth/.bin)")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            data = torch.load(path, map_location="cpu", weights_only=True)  # old (non-zip) format
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {error}") from None
    except Exception as error:  # weights_only refuses pickled code: say so, never fall back to full unpickling
        raise CheckpointError(f"{path}: refused to load (it holds more than tensors): {error}") from None
    if isinstance(data, dict) and "model" in data and isinstance(data["model"], dict):
        data = data["model"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors (or {{'model': state dict}})")
    return data


def read_safetensors(paths: list[Path], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in paths:
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as handle:
                for key in handle.keys():
                    out[key] = handle.get_tensor(key)
        except Exception as error:
            raise CheckpointError(f"{path}: not a readable safetensors file: {error}") from None
    return out


class LazySafetensors(Mapping):
    """The tensors of safetensors files, each read from its memory-mapped file only when accessed, so
    a loader can convert one tensor at a time instead of holding a whole checkpoint in memory."""

    def __init__(self, paths: list[Path], device: str | torch.device = "cpu"):
        self._device, self._where, self._handles = str(device), {}, {}
        for path in paths:
            try:
                handle = safe_open(str(path), framework="pt", device=self._device)
            except Exception as error:
                raise CheckpointError(f"{path}: not a readable safetensors file: {error}") from None
            self._handles[path] = handle
            self._where.update(dict.fromkeys(handle.keys(), path))

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._handles[self._where[key]].get_tensor(key)

    def file_of(self, key: str) -> Path:
        return self._where[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def read_hf_weights(directory: Path) -> tuple[Mapping[str, torch.Tensor], str]:
    """A Hugging Face model directory's weights (safetensors preferred, sharded or not)."""
    for index_name, reader in (("model.safetensors.index.json", "safetensors"),
                               ("pytorch_model.bin.index.json", "torch")):
        index = directory / index_name
        if index.is_file():
            shards = sorted({directory / f for f in json.loads(index.read_text())["weight_map"].values()})
            if reader == "safetensors":
                return LazySafetensors(shards), str(index)
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(read_torch_file(shard))
            return state, str(index)
    if (directory / "model.safetensors").is_file():
        return LazySafetensors([directory / "model.safetensors"]), str(directory / "model.safetensors")
    if (directory / "pytorch_model.bin").is_file():
        return read_torch_file(directory / "pytorch_model.bin"), str(directory / "pytorch_model.bin")
    raise CheckpointError(f"{directory}: no model.safetensors or pytorch_model.bin (is this a FlanT5 directory?)")


WEIGHTS_INDEX = "model.safetensors.index.json"


def shareable_file_mode(path: Path) -> None:
    """safetensors writes 0600; a bundle is meant to be shared like any other file (0644 under umask 022)."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def save_state_sharded(state: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int = 2 << 30) -> None:
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.detach().contiguous().cpu()
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / file), metadata={"format": "pt"})
        shareable_file_mode(directory / file)
        weight_map.update({name: file for name in shard})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
             "weight_map": weight_map}
    (directory / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2) + "\n")


# Siblings of a folder being written: `.NAME.partial-PID-RANDOM` (the new folder, until it is complete) and
# `.NAME.replaced-PID-RANDOM` (the folder it replaces, between the two renames).
_PARTIAL, _REPLACED = ".partial-", ".replaced-"


def fsync_folder(path: Path) -> None:
    """Flush a folder's entries (the names created or renamed in it) to disk, where the OS allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as handle:
                os.fsync(handle.fileno())
        fsync_folder(Path(folder))


def _writer_pid(sibling: Path, mark: str) -> int | None:
    try:
        return int(sibling.name.rsplit(mark, 1)[1].split("-", 1)[0])
    except (IndexError, ValueError):
        return None


def _is_running(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _clean_after_dead_writers(target: Path) -> None:
    """Leftovers of earlier writers of `target` that died: their unfinished folders are removed, and a
    folder set aside by a replace that died between its two renames is put back if nothing took its place."""
    if not target.parent.is_dir():
        return
    name = glob.escape(target.name)
    for sibling in sorted(target.parent.glob(f".{name}{_REPLACED}*")):
        if _is_running(_writer_pid(sibling, _REPLACED)):
            continue
        if target.exists():
            shutil.rmtree(sibling, ignore_errors=True)
        else:
            os.rename(sibling, target)  # the previous complete folder, back where it was
    for sibling in target.parent.glob(f".{name}{_PARTIAL}*"):
        if not _is_running(_writer_pid(sibling, _PARTIAL)):
            shutil.rmtree(sibling, ignore_errors=True)


@contextmanager
def folder_written_whole(target: str | os.PathLike[str], *, replace: bool = False) -> Iterator[Path]:
    """A new, empty folder beside `target` to write into; when the block ends without an error it is
    flushed to disk and renamed to `target`. An error (or a killed process) leaves `target` as it was:
    the block's folder is removed (or, after a kill, removed by the next writer of `target`).

    `target` may be absent or an empty folder; a non-empty one is replaced whole only with `replace`
    (it is renamed aside, the new folder renamed into its place, then the old one removed), otherwise it
    is a FileExistsError. The new folder is a sibling of `target` so that the rename never crosses
    filesystems."""
    target = Path(target)
    _clean_after_dead_writers(target)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target}: exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not replace:
        raise FileExistsError(f"{target}: exists and is not empty")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.parent / f".{target.name}{_PARTIAL}{os.getpid()}-{secrets.token_hex(4)}"
    partial.mkdir()
    try:
        yield partial
        _fsync_tree(partial)
        if target.is_dir() and any(target.iterdir()):
            aside = target.parent / f".{target.name}{_REPLACED}{os.getpid()}-{secrets.token_hex(4)}"
            os.rename(target, aside)
            try:
                os.rename(partial, target)
            except BaseException:
                os.rename(aside, target)
                raise
            shutil.rmtree(aside, ignore_errors=True)  # if it stays, the next writer removes it
        else:
            os.rename(partial, target)  # onto an empty folder too: rename(2) replaces it
        fsync_folder(target.parent)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
