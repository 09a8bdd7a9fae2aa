"""CIFAR-10 and CIFAR-100 from the standard "python version" archives.

The layout is the one torchvision's ``CIFAR10``/``CIFAR100`` classes read and
write, so a folder prepared for torchvision works here and vice versa::

    <data_dir>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
    <data_dir>/cifar-100-python/{train, test, meta}

Each file is a pickle written by Python 2: a dict with ``data`` (N x 3072
uint8, each row the R, G, B planes of a 32x32 image) and ``labels`` (CIFAR-10)
or ``fine_labels`` (CIFAR-100). Files are checked against torchvision's
published md5 sums *before* they are unpickled, so only the known files are
ever unpickled (unpickling runs code named in the file).

Downloading goes through torchvision (``download=True``), which fetches and
extracts the same layout; the files are then read by this module.
"""
from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dbench.data.base import DataSplits, DatasetSpec, channel_stats
from dbench.errors import DbenchError
from dbench.registry import DATASETS

# md5 of every file, keyed by path relative to the data directory. These are
# the sums torchvision publishes in ``torchvision.datasets.CIFAR10/CIFAR100``
# (train_list, test_list, meta); a test checks they still agree.
CHECKSUMS: dict[str, dict[str, str]] = {
    "cifar10": {
        "cifar-10-batches-py/data_batch_1": "c99cafc152244af753f735de768cd75f",
        "cifar-10-batches-py/data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
        "cifar-10-batches-py/data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
        "cifar-10-batches-py/data_batch_4": "634d18415352ddfa80567beed471001a",
        "cifar-10-batches-py/data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
        "cifar-10-batches-py/test_batch": "40351d587109b95175f43aff81a1287e",
        "cifar-10-batches-py/batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
    },
    "cifar100": {
        "cifar-100-python/train": "16019d7e3df5f24257cddd939b257f8d",
        "cifar-100-python/test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
        "cifar-100-python/meta": "7973b15100ade9c7d40fb424638fde48",
    },
}

# What unpickling a damaged file can raise (see the pickle module docs), plus
# what numpy raises when the array payload inside is cut short.
_UNPICKLE_ERRORS = (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError,
                    KeyError, ValueError, TypeError, UnicodeDecodeError)


@dataclass(frozen=True)
class _Layout:
    name: str  # registry name, also the key into CHECKSUMS
    title: str  # for messages
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str  # in the meta file: the class names
    num_classes: int
    url: str  # where torchvision downloads from; named in download errors


CIFAR10 = _Layout(
    name="cifar10",
    title="CIFAR-10",
    folder="cifar-10-batches-py",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_files=("test_batch",),
    meta_file="batches.meta",
    label_key="labels",
    names_key="label_names",
    num_classes=10,
    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
)

CIFAR100 = _Layout(
    name="cifar100",
    title="CIFAR-100",
    folder="cifar-100-python",
    train_files=("train",),
    test_files=("test",),
    meta_file="meta",
    label_key="fine_labels",
    names_key="fine_label_names",
    num_classes=100,
    url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
)


def _one_line(text: object) -> str:
    # Exception texts (network, pickle) can span lines; the CLI prints one.
    return " ".join(str(text).split())


def _unreadable(path: Path, error: OSError) -> DbenchError:
    # A file that is there but cannot be read (permissions, an I/O error): say which, and what would help.
    return DbenchError(f"cannot read {path}: {_one_line(error.strerror or error)}; make it readable by this user "
                       f"(or delete it and use --download)")


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as e:
        raise _unreadable(path, e) from e
    return digest.hexdigest()


def _is(path: Path, kind: str) -> bool:
    """Whether ``path`` is a directory (``kind`` "dir") or a file; a folder on the way that cannot be searched
    (permissions) is a one-line error rather than a traceback (pathlib raises it, not False)."""
    try:
        return path.is_dir() if kind == "dir" else path.is_file()
    except OSError as e:
        raise _unreadable(path, e) from e


def _check_files(layout: _Layout, data_dir: Path, checksums: bool = True) -> None:
    """Directory, folder, every file present, every md5 right (``checksums``); else a one-line DbenchError."""
    hint = f"pass --data-dir pointing to a folder that holds {layout.folder}/, or --download"
    if not _is(data_dir, "dir"):
        what = "not a directory" if data_dir.exists() else "missing data directory"
        raise DbenchError(f"{what} {data_dir}: {hint}")
    folder = data_dir / layout.folder
    if not _is(folder, "dir"):
        raise DbenchError(
            f"no {layout.folder}/ in data directory {data_dir}: expected the extracted {layout.title} "
            f"python archive ({layout.url.rsplit('/', 1)[1]}) there; {hint}"
        )
    for relative, expected in CHECKSUMS[layout.name].items():
        path = data_dir / relative
        if not _is(path, "file"):
            raise DbenchError(
                f"missing {layout.title} file {path}: the archive is incomplete; re-extract it or use --download"
            )
        actual = _md5(path) if checksums else expected
        if actual != expected:
            raise DbenchError(
                f"checksum mismatch for {path}: md5 {actual}, expected {expected} "
                f"(corrupt or modified {layout.title} file; delete {folder} and use --download)"
            )


def _unpickle(path: Path) -> dict[str, object]:
    """Load one archive file as a dict with str keys."""
    try:
        with path.open("rb") as f:
            # latin1, as torchvision does: the files were pickled by Python 2, whose
            # str keys then load as str and whose raw array bytes load in numpy.
            obj = pickle.load(f, encoding="latin1")
    except OSError as e:  # not among the unpickling errors: the file itself cannot be read
        raise _unreadable(path, e) from e
    except _UNPICKLE_ERRORS as e:
        raise DbenchError(
            f"cannot unpickle {path}: {type(e).__name__}: {_one_line(e)}; expected a CIFAR python-version file"
        ) from e
    if not isinstance(obj, dict):
        raise DbenchError(f"bad CIFAR file {path}: holds a {type(obj).__name__}, expected a dict")
    # Files re-pickled under Python 3 may carry bytes keys; accept them too.
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _read_batch(layout: _Layout, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    entry = _unpickle(path)
    for key in ("data", layout.label_key):
        if key not in entry:
            raise DbenchError(f"bad CIFAR file {path}: no {key!r} entry; keys are {sorted(map(str, entry))}")
    data = entry["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        found = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DbenchError(f"bad CIFAR file {path}: 'data' is {found}, expected a uint8 array of shape (N, 3072)")
    labels = np.asarray(entry[layout.label_key])
    if labels.shape != (data.shape[0],) or labels.dtype.kind not in "iu":
        raise DbenchError(
            f"bad CIFAR file {path}: {layout.label_key!r} has shape {labels.shape} and dtype {labels.dtype}, "
            f"expected {data.shape[0]} integers"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= layout.num_classes):
        raise DbenchError(
            f"bad CIFAR file {path}: labels range over [{labels.min()}, {labels.max()}], "
            f"expected [0, {layout.num_classes - 1}]"
        )
    # Rows are the R, G, B planes of a 32x32 image in turn, i.e. already (3, 32, 32) in C order.
    images = torch.from_numpy(np.ascontiguousarray(data)).view(-1, 3, 32, 32)
    return images, torch.from_numpy(labels.astype(np.int64))


def _read_split(layout: _Layout, data_dir: Path, files: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [_read_batch(layout, data_dir / layout.folder / name) for name in files]
    x = torch.cat([p[0] for p in parts]).contiguous()
    y = torch.cat([p[1] for p in parts])
    return x, y


def _check_meta(layout: _Layout, data_dir: Path) -> None:
    path = data_dir / layout.folder / layout.meta_file
    meta = _unpickle(path)
    names = meta.get(layout.names_key)
    if not isinstance(names, list) or len(names) != layout.num_classes:
        raise DbenchError(
            f"bad CIFAR meta file {path}: {layout.names_key!r} should list {layout.num_classes} class names"
        )


def read_cifar(layout: _Layout, data_dir: Path) -> DataSplits:
    """Validate and read an extracted archive under ``data_dir``."""
    _check_files(layout, data_dir)
    _check_meta(layout, data_dir)
    train_x, train_y = _read_split(layout, data_dir, layout.train_files)
    test_x, test_y = _read_split(layout, data_dir, layout.test_files)
    mean, std = channel_stats(train_x)
    return DataSplits(
        name=layout.name,
        num_classes=layout.num_classes,
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        mean=mean,
        std=std,
    )


def _download(layout: _Layout, data_dir: Path) -> None:
    """Fetch and extract the archive into ``data_dir`` through torchvision (skipped if already intact)."""
    from urllib.error import URLError

    import torchvision

    dataset_class = torchvision.datasets.CIFAR10 if layout is CIFAR10 else torchvision.datasets.CIFAR100
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        # train=False: torchvision then loads only the (small) test split into
        # memory after downloading; its integrity check still covers every file.
        dataset_class(root=str(data_dir), train=False, download=True)
    except URLError as e:  # before OSError: URLError is a subclass of it
        raise DbenchError(
            f"download of {layout.title} from {layout.url} failed: {_one_line(e.reason)}; check the network, "
            f"or fetch and extract it into {data_dir} by hand"
        ) from e
    except OSError as e:
        raise DbenchError(f"download of {layout.title} from {layout.url} into {data_dir} failed: {_one_line(e)}") from e
    except RuntimeError as e:
        # torchvision raises RuntimeError when the fetched archive fails its checksum.
        raise DbenchError(
            f"download of {layout.title} from {layout.url} gave a corrupt archive: {_one_line(e)}"
        ) from e


def _loader(layout: _Layout):
    def load(data_dir: Path | None, download: bool) -> DataSplits:
        if data_dir is None:
            raise DbenchError(
                f"{layout.name} needs a data directory: pass --data-dir pointing to a folder that holds "
                f"{layout.folder}/ (add --download to fetch it there)"
            )
        data_dir = Path(data_dir).expanduser()
        if download:
            _download(layout, data_dir)
        return read_cifar(layout, data_dir)

    return load


def _present(layout: _Layout):
    def present(data_dir: Path | None, download: bool) -> None:
        """Before any run is written: the folder and every file there (their checksums are checked on loading)."""
        if data_dir is not None and not download:
            _check_files(layout, Path(data_dir).expanduser(), checksums=False)

    return present


for _layout, _description in (
    (CIFAR10, "CIFAR-10 32x32 photos, 50k train / 10k test (needs --data-dir or --download)"),
    (CIFAR100, "CIFAR-100 32x32 photos, 50k train / 10k test (needs --data-dir or --download)"),
):
    DATASETS.register(_layout.name)(
        DatasetSpec(
            name=_layout.name,
            num_classes=_layout.num_classes,
            description=_description,
            needs_data_dir=True,
            load=_loader(_layout),
            present=_present(_layout),
        )
    )
