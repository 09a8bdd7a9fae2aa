"""Write small CIFAR archives in the exact on-disk format of the real ones (test helper).

The real ``cifar-10-batches-py`` / ``cifar-100-python`` files were pickled by
Python 2 (protocol 2). Every string in them is a Python 2 ``str``, stored with
the BINSTRING/SHORT_BINSTRING opcodes, which is why they must be loaded with
``encoding="latin1"`` (str keys, and the raw array bytes come back as a latin1
``str`` that numpy's unpickler accepts) or ``encoding="bytes"`` (bytes keys).
The numpy arrays reference ``numpy.core.multiarray._reconstruct``.

Python 3's pickler writes ``str`` as BINUNICODE and ``bytes`` through
``_codecs.encode``, which would *not* reproduce those properties, so this
module uses a small pickler subclass that writes Python 2 opcodes instead.
"""
from __future__ import annotations

import hashlib
import io
import pickle
import struct
from pathlib import Path

import numpy as np

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR100_FOLDER = "cifar-100-python"
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# numpy's array constructor, whatever module it lives in (numpy._core in numpy 2).
_RECONSTRUCT = np.zeros(1).__reduce_ex__(2)[0]


class Py2Pickler(pickle._Pickler):  # the pure-Python pickler, whose dispatch table can be extended
    """Pickle like Python 2's cPickle did for the CIFAR files: str and bytes as Python 2 ``str``."""

    dispatch = dict(pickle._Pickler.dispatch)

    def __init__(self, file: io.BufferedIOBase):
        super().__init__(file, protocol=2)

    def save_py2_str(self, obj: str | bytes) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + struct.pack("<B", len(data)) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = save_py2_str
    dispatch[bytes] = save_py2_str

    def save_global(self, obj, name=None):
        # numpy 2 names the array constructor numpy._core.multiarray._reconstruct;
        # the real files (and numpy 1) use numpy.core.multiarray.
        if obj is _RECONSTRUCT:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def py2_pickle_bytes(obj: object) -> bytes:
    buf = io.BytesIO()
    Py2Pickler(buf).dump(obj)
    return buf.getvalue()


def _write(path: Path, obj: object) -> str:
    data = py2_pickle_bytes(obj)
    path.write_bytes(data)
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def random_images(rng: np.random.Generator, n: int) -> np.ndarray:
    """n images as the real files store them: uint8 rows of 3072 = R plane, G plane, B plane (32x32 each)."""
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


def write_cifar10(root: Path, *, train: int = 20, test: int = 10, seed: int = 0) -> dict[str, str]:
    """Write ``root/cifar-10-batches-py`` with ``train`` images over 5 batches; return {relative path: md5}."""
    rng = np.random.default_rng(seed)
    folder = root / CIFAR10_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    checksums: dict[str, str] = {}
    per_batch = np.array_split(np.arange(train), 5)
    labels = (np.arange(train + test) % 10).tolist()  # every class present
    for i, idx in enumerate(per_batch, start=1):
        batch = {
            "batch_label": f"training batch {i} of 5",
            "labels": [labels[j] for j in idx],
            "data": random_images(rng, len(idx)),
            "filenames": [f"img_{j:05d}.png" for j in idx],
        }
        checksums[f"{CIFAR10_FOLDER}/data_batch_{i}"] = _write(folder / f"data_batch_{i}", batch)
    test_batch = {
        "batch_label": "testing batch 1 of 1",
        "labels": labels[train:],
        "data": random_images(rng, test),
        "filenames": [f"test_{j:05d}.png" for j in range(test)],
    }
    checksums[f"{CIFAR10_FOLDER}/test_batch"] = _write(folder / "test_batch", test_batch)
    meta = {"num_cases_per_batch": 10000, "label_names": CIFAR10_NAMES, "num_vis": 3072}
    checksums[f"{CIFAR10_FOLDER}/batches.meta"] = _write(folder / "batches.meta", meta)
    return checksums


def write_cifar100(root: Path, *, train: int = 20, test: int = 10, seed: int = 0) -> dict[str, str]:
    """Write ``root/cifar-100-python`` (train, test, meta); return {relative path: md5}."""
    rng = np.random.default_rng(seed)
    folder = root / CIFAR100_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    checksums: dict[str, str] = {}
    for split, n in (("train", train), ("test", test)):
        fine = rng.integers(0, 100, size=n).tolist()
        batch = {
            "filenames": [f"{split}_{j:05d}.png" for j in range(n)],
            "batch_label": f"{split}ing batch 1 of 1",
            "fine_labels": fine,
            "coarse_labels": [f // 5 for f in fine],
            "data": random_images(rng, n),
        }
        checksums[f"{CIFAR100_FOLDER}/{split}"] = _write(folder / split, batch)
    meta = {
        "fine_label_names": [f"fine_{i}" for i in range(100)],
        "coarse_label_names": [f"coarse_{i}" for i in range(20)],
    }
    checksums[f"{CIFAR100_FOLDER}/meta"] = _write(folder / "meta", meta)
    return checksums


def rewrite(path: Path, obj: object) -> str:
    """Replace one archive file with ``obj`` (same format); return its new md5."""
    return _write(path, obj)
