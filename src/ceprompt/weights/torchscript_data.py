"""Reading the weights of a TorchScript archive (OpenAI's ``ViT-B-16.pt`` and the like) as data.

``torch.jit.load`` would run the archive's code (``__setstate__`` methods and the like), and a
crafted archive uses that to write files anywhere. Here the archive is only a zip file: its
``data.pkl`` is unpickled by :class:`_WeightsUnpickler`, which rebuilds tensors from the zip's
storage records and turns every TorchScript class into an inert attribute bag. Any other Python
object in the pickle is refused. Nothing in the archive's ``code/`` folder is ever read.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.errors import CheckpointError

# Storage type names that TorchScript pickles use, and the dtype each one holds.
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
_MANGLE = re.compile(r"\.___torch_mangle_\d+")
# Refuse archives whose pickle is implausibly large for module attributes (a CLIP's is < 1 MB).
_MAX_PICKLE_BYTES = 64 << 20


@dataclass
class ArchiveObject:
    """A TorchScript object from the archive: its class name and attributes, nothing executable."""

    class_name: str
    attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def short_name(self) -> str:
        return self.class_name.rsplit(".", 1)[-1]


class _Storage:
    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


def _bag_class(qualname: str) -> type:
    """A class whose instances record their pickled state instead of running any code."""

    def setstate(self: Any, state: Any) -> None:
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"unexpected state of type {type(state).__name__} for {qualname}")
        self.attributes = dict(state)

    def new(cls: type, *args: Any) -> Any:
        obj = object.__new__(cls)
        obj.class_name, obj.attributes = _MANGLE.sub("", qualname), {}
        return obj

    return type("ArchiveObject", (ArchiveObject,), {"__setstate__": setstate, "__new__": new})


class _WeightsUnpickler(pickle.Unpickler):
    """Tensors, ordered dicts and TorchScript attribute bags; nothing else."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, where: str) -> None:
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix, self.where = archive, prefix, where
        self.storages: dict[str, torch.Tensor] = {}
        self.bags: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return self._rebuild_tensor
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _Storage(_STORAGE_DTYPES[name])
        if module.startswith("__torch__"):
            qualname = f"{module}.{name}"
            return self.bags.setdefault(qualname, _bag_class(qualname))
        raise pickle.UnpicklingError(f"refused {module}.{name}: only tensors and module attributes are read")

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _Storage)):
            raise pickle.UnpicklingError(f"unexpected storage record {str(pid)[:80]}")
        _, storage, key, _location, numel = pid
        if not isinstance(key, str) or not key.isdigit() or not isinstance(numel, int) or numel < 0:
            raise pickle.UnpicklingError(f"malformed storage record {str(pid)[:80]}")
        if key not in self.storages:
            name = f"{self.prefix}data/{key}"
            try:
                info = self.archive.getinfo(name)
            except KeyError:
                raise pickle.UnpicklingError(f"storage {name} is missing from the archive") from None
            itemsize = torch.empty((), dtype=storage.dtype).element_size()
            if info.file_size != numel * itemsize:
                raise pickle.UnpicklingError(f"storage {name} holds {info.file_size} bytes, "
                                             f"expected {numel} x {itemsize}")
            raw = bytearray(self.archive.read(name))
            self.storages[key] = torch.frombuffer(raw, dtype=storage.dtype) if raw else torch.empty(0, dtype=storage.dtype)
        return self.storages[key]

    @staticmethod
    def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> torch.Tensor:
        if not isinstance(storage, torch.Tensor):
            raise pickle.UnpicklingError("a tensor without storage")
        dims = (offset, *size, *stride)
        if not all(isinstance(v, int) and v >= 0 for v in dims) or len(size) != len(stride):
            raise pickle.UnpicklingError(f"malformed tensor geometry size={size} stride={stride} offset={offset}")
        if all(s > 0 for s in size):
            last = offset + sum((s - 1) * st for s, st in zip(size, stride))
            if last >= storage.numel():
                raise pickle.UnpicklingError(f"tensor of size {tuple(size)} reaches past its storage")
        return storage.as_strided(tuple(size), tuple(stride), offset).clone()


def _pickle_name(path: str, names: list[str]) -> str:
    candidates = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(candidates) != 1:
        raise CheckpointError(f"{path}: not a TorchScript archive (expected exactly one <name>/data.pkl)")
    return candidates[0]


# torch writes every entry of its zip files uncompressed. A compressed entry is someone else's: allowed only when
# small, so that declared sizes cannot turn a small file into gigabytes before anything is checked.
MAX_COMPRESSED_ENTRY = 64 << 20
MAX_COMPRESSED_TOTAL = 64 << 20  # all compressed entries of one file together


def check_zip_entries(archive: zipfile.ZipFile, path: str) -> None:
    """Refuse a zip whose entries declare more than the file could hold, summed over all entries against one
    budget before anything is inflated: compressed entries over :data:`MAX_COMPRESSED_TOTAL` together (torch
    stores tensors uncompressed), and stored entries beyond the file's own size together (entries of a valid
    zip do not overlap; a crafted one can point many entries at the same bytes)."""
    file_size = os.path.getsize(path)
    stored = compressed = 0
    for info in archive.infolist():
        if info.compress_type == zipfile.ZIP_STORED:
            stored += info.file_size
            if stored > file_size:
                raise CheckpointError(f"{path}: its entries declare {stored:,} stored bytes (at {info.filename}) in "
                                      f"a file of {file_size:,}")
        else:
            compressed += info.file_size
            if compressed > MAX_COMPRESSED_TOTAL:
                raise CheckpointError(f"{path}: its compressed entries declare {compressed:,} bytes together (at "
                                      f"{info.filename}, {info.compress_size:,} bytes compressed); torch's files "
                                      "store tensors uncompressed, and no more than 64 MiB compressed is inflated")


def read_archive(path: str) -> ArchiveObject:
    """The root object of a TorchScript archive, unpickled as data only."""
    try:
        with zipfile.ZipFile(path) as archive:
            check_zip_entries(archive, path)
            name = _pickle_name(path, archive.namelist())
            if archive.getinfo(name).file_size > _MAX_PICKLE_BYTES:
                raise CheckpointError(f"{path}: {name} is too large to be a module's attributes")
            data = archive.read(name)
            root = _WeightsUnpickler(data, archive, name[: -len("data.pkl")], path).load()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise CheckpointError(f"{path}: truncated or corrupt TorchScript archive ({exc})") from None
    except (pickle.UnpicklingError, RuntimeError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, RecursionError, MemoryError) as exc:
        raise CheckpointError(f"{path}: refused to read the TorchScript archive ({str(exc)[:200]}); ceprompt "
                              "reads only tensors from such files and never runs their code") from None
    if not isinstance(root, ArchiveObject):
        raise CheckpointError(f"{path}: the archive's root is a {type(root).__name__}, not a module")
    return root


def archive_tensors(root: ArchiveObject) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(every tensor attribute by dotted name, class name of every sub-object by dotted name)."""
    tensors: dict[str, torch.Tensor] = {}
    classes: dict[str, str] = {"": root.short_name}
    stack: list[tuple[str, ArchiveObject]] = [("", root)]
    seen: set[int] = set()
    while stack:
        prefix, obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        for key, value in obj.attributes.items():
            name = f"{prefix}{key}"
            if isinstance(value, torch.Tensor):
                tensors[name] = value
            elif isinstance(value, ArchiveObject):
                classes[name] = value.short_name
                stack.append((name + ".", value))
    return tensors, classes
