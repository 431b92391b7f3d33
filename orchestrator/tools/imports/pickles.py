"""A pickle reader for network pickles that never runs code from the file.

NVlabs' network pickles (``stylegan2-ada-pytorch``, ``stylegan3``) hold their networks as
``torch_utils.persistence`` records: the pickle asks ``_reconstruct_persistent_obj(meta)`` to rebuild each
network, and ``meta`` carries the Python source of the module that defines it (``module_src``), which the
official loader executes. :class:`NetworkUnpickler` allows only the globals that rebuild data (tensors,
storages, containers, numbers) and turns each persistence record into a :class:`Record` (class name and
state) without looking at ``module_src``; any other global is refused before anything is called.
"""

from __future__ import annotations

import collections
import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core.config import ConfigError


class NetworkImportError(ConfigError):
    """A network file that cannot be imported (refused, unreadable, or not fitting ganforge's network)."""


@dataclass
class Record:
    """A persistent object of the pickle, as data: its class name and its ``__dict__`` state."""

    class_name: str
    state: dict

    def get(self, key: str, default: Any = None) -> Any:
        return self.state.get(key, default)


def _persistent_record(meta: dict) -> Record:
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("class_name"), str):
        raise pickle.UnpicklingError("a torch_utils.persistence record without a class name")
    state = meta.get("state")
    return Record(meta["class_name"], dict(state) if isinstance(state, dict) else {})


def _storage_from_bytes(data: bytes) -> Any:
    # torch pickles a storage as a nested torch.save archive; read it as plain data only.
    return torch.load(io.BytesIO(data), weights_only=True)


def _numpy_global(name: str) -> Any:
    """numpy's data-only rebuilders: scalars (``act_gain`` and similar attributes are numpy floats), dtypes
    and plain arrays."""
    import numpy as np

    multiarray = (np._core if hasattr(np, "_core") else np.core).multiarray  # noqa: SLF001 - numpy 1 and 2
    if name == "_reconstruct":
        return _ndarray_reconstruct
    return {"scalar": multiarray.scalar, "dtype": np.dtype, "ndarray": np.ndarray}[name]


def _ndarray_reconstruct(cls: Any, shape: Any, dtype: Any) -> Any:
    import numpy as np

    if cls is not np.ndarray:
        raise pickle.UnpicklingError(f"numpy reconstruction of {cls!r}, not of a plain array")
    return np.ndarray(shape, dtype=dtype)


#: The globals a network pickle needs, each mapped to what rebuilds it here.
ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,  # noqa: SLF001
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,  # noqa: SLF001
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,  # noqa: SLF001
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("dnnlib.util", "EasyDict"): dict,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent_record,
}
NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray", "numpy")
NUMPY_NAMES = ("scalar", "dtype", "_reconstruct", "ndarray")


class NetworkUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that rebuilds only data; ``find_class`` refuses every other global."""

    def __init__(self, file: Any, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED:
            return ALLOWED[(module, name)]
        if module in NUMPY_MODULES and name in NUMPY_NAMES:
            return _numpy_global(name)
        hint = ""
        if module.startswith("dnnlib.tflib"):
            hint = " (a TensorFlow-era pickle: convert it with the official legacy.py first)"
        raise NetworkImportError(
            f"refusing to load {self.source}: it asks for {module}.{name}, which a network pickle never needs"
            f"{hint}; ganforge never runs code from a pickle"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise NetworkImportError(f"refusing to load {self.source}: it uses persistent ids ({pid!r:.60}), not data")


def load_network_pickle(path: str | Path) -> Any:
    """The contents of a network pickle as data: dicts, lists, tensors and :class:`Record` s."""
    path = Path(path)
    if not path.is_file():
        raise NetworkImportError(f"{path} does not exist or is not a file")
    try:
        with open(path, "rb") as f:
            return NetworkUnpickler(f, str(path)).load()
    except NetworkImportError:
        raise
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported with its path
        raise NetworkImportError(f"cannot read {path} as a network pickle: {type(e).__name__}: {e}") from None
