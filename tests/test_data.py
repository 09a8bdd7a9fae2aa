"""Tests for dbench.data: the synthetic set, the CIFAR reader and the device loader."""
from __future__ import annotations

import builtins
import errno
import hashlib
import os
import pickle
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision

import cifar_archive  # tests/ is on sys.path under pytest's default import mode
from dbench.data import DataSplits, DeviceLoader, channel_stats, cifar, synthetic
from dbench.data.loader import PAD, augment, draw_augmentation, epoch_generator
from dbench.errors import DbenchError
from dbench.registry import DATASETS

CPU = torch.device("cpu")


# --------------------------------------------------------------------------- registry


def test_registered_specs():
    assert {"synthetic", "cifar10", "cifar100"} <= set(DATASETS.names())
    expected = {"synthetic": (10, False), "cifar10": (10, True), "cifar100": (100, True)}
    for name, (classes, needs_dir) in expected.items():
        spec = DATASETS.get(name)
        assert spec.name == name
        assert spec.num_classes == classes
        assert spec.needs_data_dir is needs_dir
        assert spec.description and "\n" not in spec.description


# --------------------------------------------------------------------------- synthetic


@pytest.fixture(scope="module")
def synth() -> DataSplits:
    return DATASETS.get("synthetic").load(None, False)


def test_synthetic_shapes_and_dtypes(synth):
    assert synth.name == "synthetic" and synth.num_classes == 10
    assert synth.train_x.shape == (10_000, 3, 32, 32) and synth.train_x.dtype == torch.uint8
    assert synth.test_x.shape == (2_000, 3, 32, 32) and synth.test_x.dtype == torch.uint8
    assert synth.train_y.shape == (10_000,) and synth.train_y.dtype == torch.int64
    assert synth.test_y.shape == (2_000,) and synth.test_y.dtype == torch.int64
    assert synth.train_x.is_contiguous() and synth.test_x.is_contiguous()
    # The images use the range without saturating much.
    assert 0.02 < synth.std[0] < 0.3
    assert (synth.train_x == 0).float().mean() < 0.01 and (synth.train_x == 255).float().mean() < 0.01


def test_synthetic_is_deterministic(synth):
    again = synthetic.generate()
    for field in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(synth, field), getattr(again, field)), field
    assert synth.mean == again.mean and synth.std == again.std


def test_synthetic_small_is_the_same_recipe_at_a_fifth_of_the_size(synth):
    small = DATASETS.get("synthetic-small").load(None, False)
    assert small.name == "synthetic-small" and small.num_classes == 10
    assert small.train_x.shape == (2_000, 3, 32, 32) and small.test_x.shape == (400, 3, 32, 32)
    assert small.train_x.dtype == torch.uint8 and small.train_y.dtype == torch.int64
    assert torch.bincount(small.test_y, minlength=10).tolist() == [40] * 10  # balanced, clean test labels
    again = synthetic.generate("synthetic-small")
    assert all(torch.equal(getattr(small, f), getattr(again, f)) for f in ("train_x", "train_y", "test_x", "test_y"))
    # the same distribution (the same class templates), not the same images
    assert not torch.equal(small.train_x, synth.train_x[:2_000])
    assert all(abs(a - b) < 0.01 for a, b in zip(small.mean + small.std, synth.mean + synth.std))


SYNTHETIC_SHA256 = "21aa4b15ae7bf9f5f200374ad77f7904e1331e0681bf0dd3920c20fb6bb038dd"


def test_synthetic_fingerprint(synth):
    # Pins the exact bytes of the data set: results are only comparable across
    # machines and versions if this holds. If it fails after a deliberate change
    # to the generator, update the value (and say so: old results are stale).
    digest = hashlib.sha256()
    for t in (synth.train_x, synth.train_y, synth.test_x, synth.test_y):
        digest.update(t.numpy().tobytes())
    assert digest.hexdigest() == SYNTHETIC_SHA256


def test_synthetic_class_balance(synth):
    train_counts = torch.bincount(synth.train_y, minlength=10)
    test_counts = torch.bincount(synth.test_y, minlength=10)
    assert train_counts.min() >= 900 and train_counts.max() <= 1100  # balanced up to label noise
    assert torch.equal(test_counts, torch.full((10,), 200))  # test labels are clean


def test_synthetic_mean_std_from_data(synth):
    x = synth.train_x.double() / 255
    assert np.allclose(synth.mean, x.mean(dim=(0, 2, 3)).tolist(), atol=1e-9)
    assert np.allclose(synth.std, x.std(dim=(0, 2, 3), unbiased=False).tolist(), atol=1e-9)


def test_synthetic_not_trivially_separable(synth):
    # A nearest-class-mean classifier on raw pixels: the task must be learnable
    # from more than chance but far from solved by a linear-ish rule.
    x_train = synth.train_x.flatten(1).float()
    x_test = synth.test_x.flatten(1).float()
    means = torch.stack([x_train[synth.train_y == c].mean(0) for c in range(10)])
    accuracy = (torch.cdist(x_test, means).argmin(1) == synth.test_y).float().mean().item()
    assert 0.14 < accuracy < 0.5, accuracy


# --------------------------------------------------------------------------- channel_stats


def test_channel_stats_matches_direct_computation():
    x = torch.randint(0, 256, (7, 3, 5, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    mean, std = channel_stats(x)
    xf = x.double() / 255
    assert np.allclose(mean, xf.mean(dim=(0, 2, 3)).tolist(), atol=1e-12)
    assert np.allclose(std, xf.std(dim=(0, 2, 3), unbiased=False).tolist(), atol=1e-12)


# --------------------------------------------------------------------------- loader

MEAN = (0.4, 0.5, 0.6)
STD = (0.2, 0.25, 0.3)


def _toy(n: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.arange(n)  # label = index, so batches reveal the order
    return x, y


def _loader(x, y, batch_size=4, train=True, seed=0, device=CPU) -> DeviceLoader:
    return DeviceLoader(x, y, batch_size, device, mean=MEAN, std=STD, train=train, seed=seed)


def _normalize_reference(x_uint8: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x_uint8.float() / 255 - mean) / std


@pytest.mark.parametrize("train", [True, False])
def test_loader_batches_and_partial_last(train):
    x, y = _toy(10)
    loader = _loader(x, y, batch_size=4, train=train)
    assert len(loader) == 3 and loader.num_samples == 10
    batches = list(loader.epoch(0))
    assert [b[0].shape[0] for b in batches] == [4, 4, 2]
    for images, labels in batches:
        assert images.dtype == torch.float32 and images.shape[1:] == (3, 32, 32)
        assert labels.dtype == torch.int64
    # Every sample exactly once per epoch.
    assert sorted(torch.cat([b[1] for b in batches]).tolist()) == list(range(10))


def test_loader_len_exact_multiple():
    x, y = _toy(8)
    assert len(_loader(x, y, batch_size=4)) == 2
    assert len(_loader(x, y, batch_size=100)) == 1


def test_loader_rejects_bad_batch_size():
    x, y = _toy(4)
    with pytest.raises(DbenchError, match="batch size"):
        _loader(x, y, batch_size=0)


def test_eval_loader_in_order_unaugmented():
    x, y = _toy(10)
    loader = _loader(x, y, batch_size=4, train=False)
    images = torch.cat([b[0] for b in loader.epoch(0)])
    labels = torch.cat([b[1] for b in loader.epoch(5)])
    assert torch.equal(labels, y)
    assert torch.allclose(images, _normalize_reference(x), atol=1e-5)
    assert torch.equal(images, torch.cat([b[0] for b in loader.epoch(3)]))  # epoch does not matter


def _collect(loader: DeviceLoader, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(loader.epoch(epoch))
    return torch.cat([b[0] for b in batches]).cpu(), torch.cat([b[1] for b in batches]).cpu()


def test_train_epochs_depend_only_on_seed_and_epoch():
    x, y = _toy(10)
    first = _loader(x, y)
    for e in range(3):
        _collect(first, e)
    late = _collect(first, 3)
    fresh = _collect(_loader(x, y), 3)  # epoch 3 without running 0..2 (a resumed run)
    assert torch.equal(late[0], fresh[0]) and torch.equal(late[1], fresh[1])
    e0, e1 = _collect(first, 0), _collect(first, 1)
    assert not torch.equal(e0[1], e1[1])  # a new permutation
    assert not torch.equal(e0[0], e1[0])
    other_seed = _collect(_loader(x, y, seed=1), 0)
    assert not torch.equal(e0[0], other_seed[0])


def test_epoch_generator_distinguishes_seed_epoch_pairs():
    draws = {tuple(torch.rand(4, generator=epoch_generator(s, e)).tolist()) for s in range(3) for e in range(3)}
    assert len(draws) == 9  # in particular (0, 1) and (1, 0) differ


def _reference_augment(image: np.ndarray, dy: int, dx: int, flip: bool) -> np.ndarray:
    """Straightforward per-image CIFAR augmentation on a (3, 32, 32) array."""
    padded = np.pad(image, ((0, 0), (PAD, PAD), (PAD, PAD)))
    crop = padded[:, dy:dy + 32, dx:dx + 32]
    return crop[:, :, ::-1] if flip else crop


def test_train_augmentation_matches_reference():
    x, y = _toy(10)
    loader = _loader(x, y, batch_size=4, seed=7)
    images, labels = _collect(loader, 2)
    order, dy, dx, flip = loader.epoch_plan(2)
    assert torch.equal(labels, y[order])
    expected = np.stack([
        _reference_augment(x[i].numpy(), int(dy[k]), int(dx[k]), bool(flip[k]))
        for k, i in enumerate(order.tolist())
    ])
    assert torch.allclose(images, _normalize_reference(torch.from_numpy(expected)), atol=1e-5)


def test_augment_special_cases():
    x, _ = _toy(3)
    n = x.shape[0]
    centre = torch.full((n,), PAD)
    no = torch.zeros(n, dtype=torch.bool)
    assert torch.equal(augment(x, centre, centre, no), x)
    assert torch.equal(augment(x, centre, centre, ~no), x.flip(-1))
    # Top-left offset: the image moves down-right, zeros enter at the top and left.
    shifted = augment(x, torch.zeros(n, dtype=torch.int64), torch.zeros(n, dtype=torch.int64), no)
    assert torch.equal(shifted[:, :, PAD:, PAD:], x[:, :, :-PAD, :-PAD])
    assert shifted[:, :, :PAD].eq(0).all() and shifted[:, :, :, :PAD].eq(0).all()


def test_draw_augmentation_ranges():
    dy, dx, flip = draw_augmentation(torch.Generator().manual_seed(0), 20_000)
    for d in (dy, dx):
        assert d.min() == 0 and d.max() == 2 * PAD
        assert torch.bincount(d).min() > 1800  # ~uniform over the 9 values (20000/9 = 2222 expected)
    assert 0.48 < flip.float().mean() < 0.52


@pytest.mark.gpu  # skipped without CUDA (tests/conftest.py)
def test_cuda_loader_matches_cpu():
    x, y = _toy(10)
    cpu = _collect(_loader(x, y, seed=3), 1)
    gpu_loader = _loader(x, y, seed=3, device=torch.device("cuda"))
    images, labels = next(iter(gpu_loader.epoch(1)))
    assert images.device.type == "cuda" and labels.device.type == "cuda"
    gpu = _collect(gpu_loader, 1)
    assert torch.equal(cpu[1], gpu[1])
    assert torch.allclose(cpu[0], gpu[0], atol=1e-5)


# --------------------------------------------------------------------------- CIFAR reader


def _use_sums(monkeypatch, cls, sums: dict[str, str]) -> None:
    """Give torchvision's md5 list for ``cls`` (the one dbench checks too) the sums of generated files:
    ``sums`` is {path relative to the data directory: md5}, for some or all of the archive's files."""
    def md5(name, old):
        return sums.get(f"{cls.base_folder}/{name}", old)

    monkeypatch.setattr(cls, "train_list", [[f, md5(f, m)] for f, m in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[f, md5(f, m)] for f, m in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5(cls.meta["filename"], cls.meta["md5"])})


@pytest.fixture
def cifar10_dir(tmp_path, monkeypatch) -> Path:
    _use_sums(monkeypatch, torchvision.datasets.CIFAR10, cifar_archive.write_cifar10(tmp_path))
    return tmp_path


@pytest.fixture
def cifar100_dir(tmp_path, monkeypatch) -> Path:
    _use_sums(monkeypatch, torchvision.datasets.CIFAR100, cifar_archive.write_cifar100(tmp_path))
    return tmp_path


def test_the_files_checked_are_torchvisions():
    tv = torchvision.datasets
    files = cifar.expected_files(cifar.CIFAR10)
    assert list(files) == [f"cifar-10-batches-py/{f}" for f in
                           ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                            "test_batch", "batches.meta")]
    assert files["cifar-10-batches-py/test_batch"] == tv.CIFAR10.test_list[0][1]
    assert cifar.expected_files(cifar.CIFAR100) == {
        "cifar-100-python/train": tv.CIFAR100.train_list[0][1], "cifar-100-python/test": tv.CIFAR100.test_list[0][1],
        "cifar-100-python/meta": tv.CIFAR100.meta["md5"]}


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _raw(path: Path) -> dict:
    with path.open("rb") as f:
        return pickle.load(f, encoding="latin1")


def test_generated_archive_has_python2_format(cifar10_dir):
    # Loaded the two ways the real files load: str keys with latin1, bytes keys with bytes.
    path = cifar10_dir / "cifar-10-batches-py" / "data_batch_1"
    assert set(_raw(path)) == {"batch_label", "labels", "data", "filenames"}
    with path.open("rb") as f:
        assert set(pickle.load(f, encoding="bytes")) == {b"batch_label", b"labels", b"data", b"filenames"}


def test_read_cifar10(cifar10_dir):
    splits = DATASETS.get("cifar10").load(cifar10_dir, False)
    assert splits.name == "cifar10" and splits.num_classes == 10
    assert splits.train_x.shape == (20, 3, 32, 32) and splits.test_x.shape == (10, 3, 32, 32)
    folder = cifar10_dir / "cifar-10-batches-py"
    batches = [_raw(folder / f"data_batch_{i}") for i in range(1, 6)]
    data = np.concatenate([b["data"] for b in batches])
    labels = sum((b["labels"] for b in batches), [])
    # The files' rows exactly, as uint8 (N, 3, 32, 32) and int64 labels.
    assert splits.train_x.dtype == torch.uint8 and splits.train_x.is_contiguous()
    assert torch.equal(splits.train_x, torch.from_numpy(data).view(-1, 3, 32, 32))
    assert splits.train_y.dtype == torch.int64 and splits.train_y.tolist() == labels
    assert torch.equal(splits.test_x, torch.from_numpy(_raw(folder / "test_batch")["data"]).view(-1, 3, 32, 32))
    assert splits.test_y.tolist() == _raw(folder / "test_batch")["labels"]
    # Channel-major rows: the first 1024 bytes are the red plane.
    assert torch.equal(splits.train_x[0, 0].flatten(), torch.from_numpy(data[0, :1024]))
    assert np.allclose(splits.mean, (splits.train_x.double() / 255).mean(dim=(0, 2, 3)).tolist())


def test_read_cifar100(cifar100_dir):
    splits = DATASETS.get("cifar100").load(cifar100_dir, False)
    assert splits.num_classes == 100
    assert splits.train_x.shape == (20, 3, 32, 32) and splits.test_x.shape == (10, 3, 32, 32)
    raw = _raw(cifar100_dir / "cifar-100-python" / "train")
    assert splits.train_y.tolist() == raw["fine_labels"]
    assert torch.equal(splits.train_x, torch.from_numpy(raw["data"]).view(-1, 3, 32, 32))


def test_what_torchvision_reads_is_what_dbench_holds(cifar10_dir):
    theirs = torchvision.datasets.CIFAR10(root=str(cifar10_dir), train=True, download=False)
    ours = cifar.read_cifar(cifar.CIFAR10, cifar10_dir)
    assert np.array_equal(theirs.data, ours.train_x.permute(0, 2, 3, 1).numpy())  # theirs is HWC
    assert theirs.targets == ours.train_y.tolist()
    assert theirs.classes == cifar_archive.CIFAR10_NAMES


def _error(data_dir, name="cifar10", download=False) -> str:
    with pytest.raises(DbenchError) as info:
        DATASETS.get(name).load(data_dir, download)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_cifar_needs_data_dir():
    assert "--data-dir" in _error(None)
    assert "cifar-100-python" in _error(None, "cifar100")


def test_missing_data_directory(tmp_path):
    missing = tmp_path / "nope"
    message = _error(missing)
    assert str(missing) in message and "--data-dir" in message and "cifar-10-batches-py" in message


def test_missing_archive_folder(tmp_path):
    message = _error(tmp_path)
    assert "cifar-10-batches-py" in message and str(tmp_path) in message and "cifar-10-python.tar.gz" in message


def test_missing_file(cifar10_dir):
    path = cifar10_dir / "cifar-10-batches-py" / "data_batch_3"
    path.unlink()
    message = _error(cifar10_dir)
    assert str(path) in message and "missing" in message
    with pytest.raises(DbenchError, match="missing CIFAR-10 file"):  # the check before a run is written, too
        DATASETS.get("cifar10").present(cifar10_dir, False)


def test_present_takes_no_checksum(cifar10_dir, monkeypatch):
    from torchvision.datasets import utils

    monkeypatch.setattr(utils, "calculate_md5", lambda *a, **k: pytest.fail("present() took a checksum"))
    DATASETS.get("cifar10").present(cifar10_dir, False)


def test_checksum_mismatch(cifar10_dir):
    path = cifar10_dir / "cifar-10-batches-py" / "test_batch"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    message = _error(cifar10_dir)
    assert str(path) in message and "checksum mismatch" in message
    assert dict(torchvision.datasets.CIFAR10.test_list)["test_batch"] in message and _md5(bytes(data)) in message


def test_a_file_changed_after_the_check_is_named(cifar10_dir, monkeypatch):
    """Damaged between dbench's check and torchvision's (another run extracting into the same folder):
    torchvision's RuntimeError names no file; dbench's check, run again, does."""
    path = cifar10_dir / "cifar-10-batches-py" / "test_batch"
    checked = cifar._check_files

    def check_then_damage(*args, **kwargs):
        checked(*args, **kwargs)
        path.write_bytes(path.read_bytes()[:-1])

    monkeypatch.setattr(cifar, "_check_files", check_then_damage)
    message = _error(cifar10_dir)
    assert str(path) in message and "checksum mismatch" in message


def test_torchvision_failing_its_own_check_alone_is_one_line(cifar10_dir, monkeypatch):
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: False)
    message = _error(cifar10_dir)
    assert "changed while being read" in message and "Dataset not found or corrupted" in message


def _replace(data_dir: Path, relative: str, obj: dict, monkeypatch, cls=torchvision.datasets.CIFAR10) -> Path:
    """Replace a file with ``obj`` pickled, and give torchvision its md5: what torchvision then meets reading it."""
    path = data_dir / relative
    _use_sums(monkeypatch, cls, {relative: cifar_archive.rewrite(path, obj)})
    return path


def test_truncated_file(cifar10_dir, monkeypatch):
    # With a matching checksum, so that torchvision itself meets the damage.
    path = cifar10_dir / "cifar-10-batches-py" / "data_batch_2"
    data = path.read_bytes()[:1000]
    path.write_bytes(data)
    _use_sums(monkeypatch, torchvision.datasets.CIFAR10, {"cifar-10-batches-py/data_batch_2": _md5(data)})
    message = _error(cifar10_dir)
    assert message.startswith(f"cannot read the CIFAR-10 train files in {path.parent}: ") and "truncated" in message


def test_not_a_pickle(cifar10_dir, monkeypatch):
    path = cifar10_dir / "cifar-10-batches-py" / "batches.meta"
    path.write_bytes(b"<html>404 not found</html>\n")
    _use_sums(monkeypatch, torchvision.datasets.CIFAR10, {"cifar-10-batches-py/batches.meta": _md5(path.read_bytes())})
    message = _error(cifar10_dir)
    assert message.startswith(f"cannot read the CIFAR-10 train files in {path.parent}: ")


@pytest.mark.parametrize("relative, obj, expected", [
    ("cifar-10-batches-py/data_batch_3", {"labels": [0]}, "KeyError: 'data'"),
    ("cifar-100-python/train", {"fine_labels": [0] * 4, "data": np.zeros((4, 3071), np.uint8)}, "(3,32,32)"),
    ("cifar-100-python/meta", {"coarse_label_names": []}, "KeyError: 'fine_label_names'"),
], ids=["no-data-entry", "rows-not-3072", "no-class-names"])
def test_what_torchvision_cannot_read_is_named(tmp_path, monkeypatch, relative, obj, expected):
    """What torchvision raises inside one file (its exceptions name none) is one line naming the folder."""
    if relative.startswith("cifar-10-"):
        _use_sums(monkeypatch, torchvision.datasets.CIFAR10, cifar_archive.write_cifar10(tmp_path))
        cls, name = torchvision.datasets.CIFAR10, "cifar10"
    else:
        _use_sums(monkeypatch, torchvision.datasets.CIFAR100, cifar_archive.write_cifar100(tmp_path))
        cls, name = torchvision.datasets.CIFAR100, "cifar100"
    path = _replace(tmp_path, relative, obj, monkeypatch, cls)
    message = _error(tmp_path, name)
    assert message.startswith(f"cannot read the {cls.__name__.replace('CIFAR', 'CIFAR-')} ") \
        and str(path.parent) in message and expected in message


def test_files_that_do_not_fit_together_name_the_folder(cifar10_dir, monkeypatch):
    # numpy, not torchvision, raises while putting the batches together: no one file is to blame.
    _replace(cifar10_dir, "cifar-10-batches-py/data_batch_1",
             {"labels": [0] * 4, "data": np.zeros((4, 3071), np.uint8)}, monkeypatch)
    message = _error(cifar10_dir)
    assert message.startswith(f"cannot read the CIFAR-10 train files in {cifar10_dir / 'cifar-10-batches-py'}: "
                              f"ValueError")


def _refuse(monkeypatch, target: Path, method: str, allowed: int = 0) -> None:
    """``target.<method>()`` (or, for "open", the builtin ``open(target)`` torchvision calls) raises
    PermissionError as an unreadable file does, after ``allowed`` calls that work (as root, chmod 000 does not
    stop a read: the reader's own error path is exercised this way)."""
    real = getattr(builtins if method == "open" else Path, method)
    calls = []

    def refusing(self, *args, **kwargs):
        if isinstance(self, (str, Path)) and str(self) == str(target):
            calls.append(1)
            if len(calls) > allowed:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(builtins if method == "open" else Path, method, refusing)


@pytest.mark.parametrize("allowed,step", [(0, "dbench's checksum"), (1, "torchvision's checksum"),
                                          (2, "torchvision unpickling it")])
def test_unreadable_file_is_one_line_error(cifar10_dir, monkeypatch, allowed, step):
    """A file that is there but cannot be read, at each of the three times it is opened."""
    path = cifar10_dir / "cifar-10-batches-py" / "data_batch_3"
    _refuse(monkeypatch, path, "open", allowed)
    message = _error(cifar10_dir)
    assert message.startswith(f"cannot read {path}: Permission denied"), (step, message)
    assert "readable" in message


def test_unsearchable_folder_is_one_line_error(cifar10_dir, monkeypatch):
    path = cifar10_dir / "cifar-10-batches-py" / "test_batch"
    _refuse(monkeypatch, path, "is_file")
    assert _error(cifar10_dir).startswith(f"cannot read {path}: Permission denied")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode (the monkeypatched tests cover it)")
def test_unreadable_file_on_disk_is_one_line_error(cifar10_dir):
    path = cifar10_dir / "cifar-10-batches-py" / "batches.meta"
    path.chmod(0)
    try:
        assert _error(cifar10_dir).startswith(f"cannot read {path}: Permission denied")
    finally:
        path.chmod(0o644)


def test_download_failure_is_one_line_error(tmp_path, monkeypatch):
    def offline(self):
        raise URLError(OSError(-3, "Temporary failure in name resolution\nmore"))

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", offline)
    message = _error(tmp_path / "new", download=True)
    assert "download" in message and "www.cs.toronto.edu" in message and "name resolution" in message


def test_download_of_a_corrupt_archive_is_one_line_error(tmp_path, monkeypatch):
    def corrupt(self):
        raise RuntimeError("File not found or corrupted.")

    monkeypatch.setattr(torchvision.datasets.CIFAR100, "download", corrupt)
    message = _error(tmp_path / "new", "cifar100", download=True)
    assert "gave a corrupt archive" in message and "cifar-100-python.tar.gz" in message


def test_download_then_read(tmp_path, monkeypatch):
    # Stand-in for torchvision fetching the archive: it writes the same layout.
    calls = []

    def fetch(self):
        calls.append((self.root, self.train))
        _use_sums(monkeypatch, torchvision.datasets.CIFAR100, cifar_archive.write_cifar100(Path(self.root)))

    monkeypatch.setattr(torchvision.datasets.CIFAR100, "download", fetch)
    splits = DATASETS.get("cifar100").load(tmp_path / "fresh", True)
    assert calls == [(str(tmp_path / "fresh"), False)]
    assert splits.train_x.shape == (20, 3, 32, 32)


def test_the_synthetic_cache_returns_what_generating_returns(synth, tmp_path, monkeypatch):
    monkeypatch.setenv("DBENCH_CACHE", str(tmp_path))
    first = synthetic.load_cached()  # generates and writes the file
    files = list(tmp_path.iterdir())
    assert [f.name for f in files] == [synthetic.cache_path().name]  # no temporary file left beside it
    second = synthetic.load_cached()  # reads it
    for got in (first, second):
        for field in ("train_x", "train_y", "test_x", "test_y"):
            assert torch.equal(getattr(got, field), getattr(synth, field)), field
        assert got.mean == synth.mean and got.std == synth.std


def test_a_damaged_cache_file_is_generated_again(synth, tmp_path, monkeypatch):
    monkeypatch.setenv("DBENCH_CACHE", str(tmp_path))
    path = synthetic.cache_path()
    saved = {"train_x": synth.train_x.clone(), "train_y": synth.train_y, "test_x": synth.test_x,
             "test_y": synth.test_y, "mean": list(synth.mean), "std": list(synth.std), "sha256": "0" * 64}
    saved["train_x"][0, 0, 0, 0] ^= 1  # a flipped bit, and a checksum that does not match
    torch.save(saved, path)
    assert torch.equal(synthetic.load_cached().train_x, synth.train_x)
    path.write_bytes(b"not a torch file")
    assert torch.equal(synthetic.load_cached().train_x, synth.train_x)
    assert torch.equal(torch.load(path, weights_only=True)["train_x"], synth.train_x)  # written again, whole


def test_the_cache_can_be_turned_off_or_unwritable(synth, tmp_path, monkeypatch):
    monkeypatch.setenv("DBENCH_CACHE", "off")
    assert synthetic.cache_path() is None
    assert torch.equal(synthetic.load_cached().test_x, synth.test_x)
    blocked = tmp_path / "file"
    blocked.write_text("a file where the cache folder would be")
    monkeypatch.setenv("DBENCH_CACHE", str(blocked / "cache"))
    assert torch.equal(synthetic.load_cached().test_x, synth.test_x)


def test_the_cache_file_name_follows_the_recipe(monkeypatch, tmp_path):
    monkeypatch.setenv("DBENCH_CACHE", str(tmp_path))
    name = synthetic.cache_path().name
    monkeypatch.setattr(synthetic.torch, "__version__", "0.0-another")
    assert synthetic.cache_path().name != name  # another torch may draw other numbers: never its file
