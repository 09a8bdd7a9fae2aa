"""CIFAR-10 and CIFAR-100, read through torchvision's ``CIFAR10``/``CIFAR100`` datasets.

The folder is the one torchvision downloads and reads::

    <data_dir>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
    <data_dir>/cifar-100-python/{train, test, meta}

torchvision owns the format: which files an archive holds and their md5 sums (the classes' ``base_folder``,
``train_list``, ``test_list`` and ``meta``, the one list dbench checks too), where it is downloaded from, and
how the Python 2 pickles are loaded and reshaped. dbench had its own copy of all of that; it wraps torchvision
instead, and keeps only what torchvision does not give someone running a benchmark:

* Errors that name the file. torchvision checks every file's md5 before it unpickles any (so only the published
  files are ever unpickled: unpickling runs code named in the file), but for a missing or corrupt file it raises
  ``RuntimeError("Dataset not found or corrupted...")`` naming none, and what it raises while reading names
  nothing either. So dbench first walks the same list itself -- the data directory, the folder, each file there,
  each md5 (torchvision's ``calculate_md5``) -- and says in one line which one is wrong and what would help;
  then torchvision reads. What torchvision still raises (a file unreadable, or changed since dbench's check; a
  failed download; a file it cannot unpickle) becomes one line naming the file, or the split's folder where
  torchvision's exception names none. The price is hashing the files
  three times (dbench's md5, then torchvision's for each split): about a second more to load CIFAR-10.
* ``_present``: the cheap check a suite makes before any run is written (the files are there; no md5).
* dbench's in-memory form: uint8 (N, 3, 32, 32) tensors and int64 labels (torchvision holds (N, 32, 32, 3)
  numpy arrays and a list), with the per-channel mean and std.
* torchvision is imported only when a CIFAR set is used: it takes a second or more.

The content of the files is pinned by their md5, so dbench no longer checks the shapes and labels inside them;
should a wrong one get through anyway, the checks of a loaded split (``channel_stats``, :class:`DataSplits`)
refuse it, as a bug rather than a user error.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from dbench.data.base import DataSplits, DatasetSpec, channel_stats
from dbench.errors import DbenchError
from dbench.registry import DATASETS

# What unpickling a damaged file can raise (see the pickle module docs), plus what numpy raises when the array
# payload inside is cut short and what torchvision raises on an entry it expects and does not find.
_UNPICKLE_ERRORS = (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError,
                    KeyError, ValueError, TypeError)


@dataclass(frozen=True)
class _Layout:
    name: str  # registry name
    title: str  # for messages
    class_name: str  # in torchvision.datasets
    num_classes: int

    @property
    def dataset_class(self):
        import torchvision.datasets  # here: only a CIFAR run pays for the import

        return getattr(torchvision.datasets, self.class_name)

    @property
    def folder(self) -> str:
        return self.dataset_class.base_folder


CIFAR10 = _Layout(name="cifar10", title="CIFAR-10", class_name="CIFAR10", num_classes=10)
CIFAR100 = _Layout(name="cifar100", title="CIFAR-100", class_name="CIFAR100", num_classes=100)


def expected_files(layout: _Layout) -> dict[str, str]:
    """{path relative to the data directory: md5} for every file of the archive, from torchvision's class."""
    cls = layout.dataset_class
    listed = [*cls.train_list, *cls.test_list, [cls.meta["filename"], cls.meta["md5"]]]
    return {f"{cls.base_folder}/{name}": md5 for name, md5 in listed}


def _one_line(text: object) -> str:
    # Exception texts (network, pickle) can span lines; the CLI prints one.
    return " ".join(str(text).split())


def _unreadable(path: Path, error: OSError) -> DbenchError:
    # A file that is there but cannot be read (permissions, an I/O error): say which, and what would help.
    return DbenchError(f"cannot read {path}: {_one_line(error.strerror or error)}; make it readable by this user "
                       f"(or delete it and use --download)")


def _is(path: Path, kind: str) -> bool:
    """Whether ``path`` is a directory (``kind`` "dir") or a file; a folder on the way that cannot be searched
    (permissions) is a one-line error rather than a traceback (pathlib raises it, not False)."""
    try:
        return path.is_dir() if kind == "dir" else path.is_file()
    except OSError as e:
        raise _unreadable(path, e) from e


def _check_files(layout: _Layout, data_dir: Path, checksums: bool = True) -> None:
    """Directory, folder, every file present, every md5 right (``checksums``); else a one-line DbenchError."""
    from torchvision.datasets.utils import calculate_md5

    cls = layout.dataset_class
    hint = f"pass --data-dir pointing to a folder that holds {cls.base_folder}/, or --download"
    if not _is(data_dir, "dir"):
        what = "not a directory" if data_dir.exists() else "missing data directory"
        raise DbenchError(f"{what} {data_dir}: {hint}")
    folder = data_dir / cls.base_folder
    if not _is(folder, "dir"):
        raise DbenchError(
            f"no {cls.base_folder}/ in data directory {data_dir}: expected the extracted {layout.title} "
            f"python archive ({cls.filename}) there; {hint}"
        )
    for relative, expected in expected_files(layout).items():
        path = data_dir / relative
        if not _is(path, "file"):
            raise DbenchError(
                f"missing {layout.title} file {path}: the archive is incomplete; re-extract it or use --download"
            )
        try:
            actual = calculate_md5(path) if checksums else expected
        except OSError as e:
            raise _unreadable(path, e) from e
        if actual != expected:
            raise DbenchError(
                f"checksum mismatch for {path}: md5 {actual}, expected {expected} "
                f"(corrupt or modified {layout.title} file; delete {folder} and use --download)"
            )


def _read_split(layout: _Layout, data_dir: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One split through torchvision, as dbench holds it: uint8 (N, 3, 32, 32) and int64 labels."""
    folder = data_dir / layout.folder
    try:
        dataset = layout.dataset_class(root=str(data_dir), train=train, download=False)
    except OSError as e:  # not among the unpickling errors: a file itself cannot be read
        raise _unreadable(Path(e.filename) if e.filename else folder, e) from e
    except RuntimeError as e:
        # torchvision's own md5 check failed after dbench's passed: a file changed in between. Say which.
        _check_files(layout, data_dir)
        raise DbenchError(f"{layout.title} files in {folder} changed while being read ({_one_line(e)}); if another "
                          f"run is downloading into {data_dir}, let it finish and run again") from e
    except _UNPICKLE_ERRORS as e:
        # Only files whose md5 matched reach torchvision, so this is a file that matches a changed md5 list:
        # torchvision's exceptions name no file, and the split's folder is as near as dbench can say.
        split = "train" if train else "test"
        raise DbenchError(f"cannot read the {layout.title} {split} files in {folder}: {type(e).__name__}: "
                          f"{_one_line(e)}; expected CIFAR python-version files") from e
    # torchvision's (N, 32, 32, 3) is a view of the files' (N, 3, 32, 32) rows: permuted back, no copy.
    images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor(dataset.targets, dtype=torch.int64)


def read_cifar(layout: _Layout, data_dir: Path) -> DataSplits:
    """Check and read an extracted archive under ``data_dir``."""
    _check_files(layout, data_dir)
    train_x, train_y = _read_split(layout, data_dir, train=True)
    test_x, test_y = _read_split(layout, data_dir, train=False)
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

    cls = layout.dataset_class
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        # train=False: torchvision then loads only the (small) test split into
        # memory after downloading; its integrity check still covers every file.
        cls(root=str(data_dir), train=False, download=True)
    except URLError as e:  # before OSError: URLError is a subclass of it
        raise DbenchError(
            f"download of {layout.title} from {cls.url} failed: {_one_line(e.reason)}; check the network, "
            f"or fetch and extract it into {data_dir} by hand"
        ) from e
    except OSError as e:
        raise DbenchError(f"download of {layout.title} from {cls.url} into {data_dir} failed: {_one_line(e)}") from e
    except RuntimeError as e:
        # torchvision raises RuntimeError when the fetched archive fails its checksum.
        raise DbenchError(f"download of {layout.title} from {cls.url} gave a corrupt archive: {_one_line(e)}") from e


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
