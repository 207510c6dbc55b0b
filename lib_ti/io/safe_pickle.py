"""Loading ``.pt``/``.bin`` pickles without ever executing code from them.

Two layers, both with the same allow-list (what AUTOMATIC1111's ``modules/safe.py`` allows):

1. a scan that unpickles with inert stand-ins for every allowed global, so a file that names any
   other global is refused before torch sees it;
2. ``torch.load`` with a restricted ``pickle_module`` so the real load can only build those objects.

Works on torch 2.1 (no ``torch.serialization.add_safe_globals`` needed).
"""

from __future__ import annotations

import collections
import io
import pickle
import re
import types
import zipfile
from typing import Any

import numpy as np
import torch

from lib_ti.errors import EmbeddingFormatError, UnsafeFileError

_TORCH_STORAGES = (
    "FloatStorage",
    "HalfStorage",
    "BFloat16Storage",
    "DoubleStorage",
    "IntStorage",
    "LongStorage",
    "ByteStorage",
    "CharStorage",
    "ShortStorage",
    "BoolStorage",
)


def _numpy_multiarray() -> Any:
    core = getattr(np, "_core", None) or np.core
    return core.multiarray


def _allowed_global(module: str, name: str) -> Any:
    """Return the object for an allowed global, or ``None``."""
    if module == "collections" and name == "OrderedDict":
        return collections.OrderedDict
    if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_parameter"):
        return getattr(torch._utils, name)
    if module == "torch" and (name in _TORCH_STORAGES or name in ("float32", "float16", "bfloat16")):
        return getattr(torch, name)
    if module == "torch.nn.modules.container" and name == "ParameterDict":
        return torch.nn.ParameterDict
    if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in ("scalar", "_reconstruct"):
        return getattr(_numpy_multiarray(), name)
    if module == "numpy" and name in ("dtype", "ndarray"):
        return getattr(np, name)
    if module == "_codecs" and name == "encode":
        import _codecs

        return _codecs.encode
    if module in ("__builtin__", "builtins") and name == "set":
        return set
    return None


class _Inert:
    """Stand-in for every allowed global during the scan: accepts anything, does nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> _Inert:
        return _Inert()

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


class _ScanUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if _allowed_global(module, name) is None:
            msg = f"global '{module}.{name}'"
            raise UnsafeFileError(msg)
        return _Inert

    def persistent_load(self, pid: Any) -> Any:
        return _Inert()


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds only allow-listed globals."""

    def find_class(self, module: str, name: str) -> Any:
        obj = _allowed_global(module, name)
        if obj is None:
            msg = f"global '{module}.{name}'"
            raise UnsafeFileError(msg)
        return obj


def _restricted_load(file: Any, **kwargs: Any) -> Any:
    return RestrictedUnpickler(file, **kwargs).load()


# A module object usable as torch.load's ``pickle_module``.
restricted_pickle_module = types.ModuleType("lib_ti_restricted_pickle")
restricted_pickle_module.Unpickler = RestrictedUnpickler  # type: ignore[attr-defined]
restricted_pickle_module.load = _restricted_load  # type: ignore[attr-defined]
restricted_pickle_module.__name__ = "pickle"

# Every record name torch writes into a zip checkpoint.
_ZIP_NAME_RE = re.compile(
    r"^([^/]+)/((data/\d+)|version|byteorder|\.format_version|\.storage_alignment|\.data/serialization_id|data\.pkl)$"
)
_DATA_PKL_RE = re.compile(r"^([^/]+)/data\.pkl$")


#: What a corrupt or truncated file makes the unpickler raise.
_LOAD_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    zipfile.BadZipFile,
    ValueError,
    TypeError,
    IndexError,
    KeyError,
    AttributeError,
    UnicodeDecodeError,
    MemoryError,
    RuntimeError,
)


def scan(data: bytes, label: str) -> None:
    """Refuse ``data`` (a torch ``.pt`` file's bytes) unless every global it names is allowed."""
    try:
        if zipfile.is_zipfile(io.BytesIO(data)):
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                names = z.namelist()
                bad = [n for n in names if not _ZIP_NAME_RE.match(n)]
                if bad:
                    msg = f"{label}: unexpected record {bad[0]!r} inside the torch archive; refused"
                    raise UnsafeFileError(msg)
                pkls = [n for n in names if _DATA_PKL_RE.match(n)]
                if len(pkls) != 1:
                    msg = f"{label}: a torch archive needs exactly one data.pkl, found {len(pkls)}"
                    raise EmbeddingFormatError(msg)
                with z.open(pkls[0]) as f:
                    _ScanUnpickler(f).load()
        else:
            f = io.BytesIO(data)
            # The legacy (non-zip) format: magic number, protocol, sys info, the object, storage keys.
            for _ in range(5):
                _ScanUnpickler(f).load()
    except UnsafeFileError as e:
        if str(e).startswith("global"):
            msg = (
                f"{label}: refused, the pickle asks for {e}, which an embedding never needs (nothing was run)"
            )
            raise UnsafeFileError(msg) from None
        raise
    except EmbeddingFormatError:
        raise
    except _LOAD_ERRORS as e:
        msg = f"{label}: not a readable torch file (truncated or corrupt: {type(e).__name__}: {e})"
        raise EmbeddingFormatError(msg) from None


def load(data: bytes, label: str) -> Any:
    """Scan, then load a torch pickle from bytes onto the CPU with the restricted unpickler."""
    scan(data, label)
    try:
        # torch.serialization.load, not torch.load: the hosts replace ``torch.load`` with their own
        # checker, which takes only file names and returns None for anything else.
        return torch.serialization.load(
            io.BytesIO(data), map_location="cpu", pickle_module=restricted_pickle_module, weights_only=False
        )
    except UnsafeFileError as e:
        msg = f"{label}: refused, the pickle asks for {e} (nothing was run)"
        raise UnsafeFileError(msg) from None
    except _LOAD_ERRORS as e:
        msg = f"{label}: not a readable torch file ({type(e).__name__}: {e})"
        raise EmbeddingFormatError(msg) from None
