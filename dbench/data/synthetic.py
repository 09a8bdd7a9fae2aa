"""A built-in, CIFAR-shaped synthetic data set (the suite's default).

Why: every run of the suite must work without downloads, yet the task has to be
hard enough that methods can be told apart: learnable by a small CNN in a
minute of CPU, not solved by a linear model, not solved to 100% quickly.

Generative recipe. Everything is drawn from one CPU ``torch.Generator`` with a
fixed seed (``SEED``), in a fixed order, so every call gives the same tensors.
"Signal units" below are mapped to pixels as ``uint8(round(128 + 64 * signal))``.

1. **Parts.** A pool of ``PARTS`` (8) Gabor patches: a sinusoidal grating
   (random orientation, spatial frequency in ``FREQ_RANGE`` cycles/pixel) under
   an isotropic Gaussian envelope (std in ``SIGMA_RANGE`` pixels), with a random
   unit-norm RGB colour.
2. **Classes.** Each of the 10 classes picks ``PARTS_PER_CLASS`` (3) distinct
   parts of the pool and a layout: a position for each part within
   ``LAYOUT_RADIUS`` pixels of the centre. Classes share parts, so a class is
   told apart only by its *combination and arrangement* of parts, which takes
   more than one layer of oriented filters.
3. **Template instances.** Rendering a class template draws, per instance: a
   translation of up to ``MAX_SHIFT`` pixels (raw pixel positions carry no
   class information; convolution and crop augmentation matter), a rotation of
   up to ``MAX_ROTATION`` and a scale in ``SCALE_RANGE`` of the whole layout
   (gratings rotate and scale with it), a Gaussian jitter of ``PART_JITTER``
   pixels per part, a colour perturbation ``COLOUR_JITTER``, a contrast in
   ``CONTRAST_RANGE`` and a per-part amplitude in ``PART_AMPLITUDE_RANGE``, and
   a uniformly random phase per grating (so any fixed linear filter on raw
   pixels averages out; detecting a part needs a nonlinearity such as ReLU
   after oriented filters).
4. **Samples.** Classes are balanced (``N/10`` per class, shuffled). An image
   of class ``c`` is the sum of: an instance of the template of ``c``; an
   instance of the template of another random class (the *distractor*),
   weighted by ``DISTRACTOR_RANGE``, so that with the contrasts above it is
   occasionally the stronger one and the sample is genuinely ambiguous; a
   background: a weak per-class tint (``CLASS_TINT_STD``, a colour cue a
   linear model can partly use, as in CIFAR) plus a random colour
   (``BACKGROUND_STD``) and linear gradient (``GRADIENT_STD``); and i.i.d.
   uniform pixel noise of std ``NOISE_STD``.
5. **Labels.** A fraction ``LABEL_NOISE`` of the *training* labels is replaced
   by a random class. Test labels are clean.

Bit-identical everywhere: per-sample parameters and patches are computed in
float64 (transcendentals then differ across CPUs by at most an ulp, far below
the uint8 rounding step), the noise comes from ``torch.rand`` (exact multiples
of 2**-24 built from the generator's integers, unlike ``randn``, whose
vectorized log/cos can differ by CPU type), and the final float32 sum and
rounding use only IEEE add/multiply. Gabor patches are separable, so each
image is a small batched matrix product; generation takes ~0.8 s on 2 cores.

Calibration (2-core CPU, torch 2.15). First, with a distractor weight up to
0.7 and noise std 0.35: a CNN of four conv3x3-BN-ReLU layers (widths
32/64/128/128) reached 55-70% test accuracy after 60 s (~145 steps) and about
93% after 600 steps, too easy for a default run of several epochs. The
distractor range was then raised to (0, 0.9) and the noise to 0.5 (the values
below): ``dbench run`` with its defaults (the registered ``cnn``, 6 epochs,
cosine lr from 0.05, 470 steps) reached 75.9% test accuracy in 33 s, and
nearest class mean on raw pixels 20.5% (chance is 10%).
"""
from __future__ import annotations

import functools
import hashlib
import io
import math
import os
import pickle
from pathlib import Path

import torch

from dbench.data.base import DataSplits, DatasetSpec, channel_stats
from dbench.errors import DbenchError
from dbench.files import atomic_write_bytes
from dbench.registry import DATASETS

NAME = "synthetic"
NUM_CLASSES = 10
NUM_TRAIN = 10_000
NUM_TEST = 2_000
# The same recipe at a fifth of the size: a whole run in seconds, for the tests' end-to-end runs and quick
# tries of a setting. Not a benchmark: 2,000 samples are too few for methods to be told apart reliably.
SMALL_NAME = "synthetic-small"
SMALL_TRAIN = 2_000
SMALL_TEST = 400
SIZES = {NAME: (NUM_TRAIN, NUM_TEST), SMALL_NAME: (SMALL_TRAIN, SMALL_TEST)}  # (train, test) of each set
SEED = 20240607  # fixed: the data set is part of the benchmark definition
SIZE = 32

PARTS = 8  # Gabor "parts" shared by all classes
PARTS_PER_CLASS = 3
FREQ_RANGE = (0.07, 0.22)  # cycles per pixel
SIGMA_RANGE = (4.0, 6.5)  # Gaussian envelope std, pixels
LAYOUT_RADIUS = 7.0  # max offset of a part from the template centre, pixels, each axis
MAX_SHIFT = 5.0  # max translation of a template, pixels, each axis
MAX_ROTATION = math.radians(15)  # max rotation of a template
SCALE_RANGE = (0.85, 1.15)  # size of a template
PART_JITTER = 1.0  # std of each part's position jitter, pixels
COLOUR_JITTER = 0.3  # std of the per-template colour perturbation (colours have norm 1)
CONTRAST_RANGE = (0.6, 1.0)  # per template
PART_AMPLITUDE_RANGE = (0.7, 1.0)  # per part, on top of the template contrast
DISTRACTOR_RANGE = (0.0, 0.9)  # distractor weight relative to the true template
CLASS_TINT_STD = 0.1  # std of the per-class background tint, signal units
BACKGROUND_STD = 0.25  # std of the random background colour, signal units
GRADIENT_STD = 0.01  # std of the background gradient, signal units per pixel
NOISE_STD = 0.5  # std of the (uniform) pixel noise, signal units
LABEL_NOISE = 0.05  # training labels only
CHUNK = 2_000  # samples rendered at once, to bound peak memory
CACHE_ENV = "DBENCH_CACHE"


def _uniform(g: torch.Generator, shape: tuple[int, ...], lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=g, dtype=torch.float64)


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True)


def _draw_templates(g: torch.Generator) -> dict[str, torch.Tensor]:
    """The fixed part pool and, per class, which parts it uses and where."""
    # Each class picks PARTS_PER_CLASS distinct parts of the pool; classes share
    # parts, so a class is told apart by its combination and layout of parts.
    class_parts = torch.stack([torch.randperm(PARTS, generator=g)[:PARTS_PER_CLASS] for _ in range(NUM_CLASSES)])
    return {
        "theta": _uniform(g, (PARTS,), 0.0, math.pi),
        "freq": _uniform(g, (PARTS,), *FREQ_RANGE),
        "sigma": _uniform(g, (PARTS,), *SIGMA_RANGE),
        # Unit-norm colours: parts differ in colour direction, not in energy.
        "colour": _unit(torch.randn(PARTS, 3, generator=g, dtype=torch.float64)),
        "class_parts": class_parts,
        "layout": _uniform(g, (NUM_CLASSES, PARTS_PER_CLASS, 2), -LAYOUT_RADIUS, LAYOUT_RADIUS),
        # A weak class-dependent tint of the background: like the colour
        # statistics of CIFAR classes, a cue that a linear model can use a bit.
        "tint": CLASS_TINT_STD * torch.randn(NUM_CLASSES, 3, generator=g, dtype=torch.float64),
    }


def _draw_patches(g: torch.Generator, t: dict[str, torch.Tensor], cls: torch.Tensor,
                  weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """One template instance per sample of class ``cls`` (n,), as its Gabor patches: each entry (n, K[, ...])."""
    n, k = cls.shape[0], PARTS_PER_CLASS
    part = t["class_parts"][cls]  # (n, K)
    rotation = _uniform(g, (n, 1), -MAX_ROTATION, MAX_ROTATION)
    scale = _uniform(g, (n, 1), *SCALE_RANGE)
    shift = _uniform(g, (n, 1, 2), -MAX_SHIFT, MAX_SHIFT)
    # Part centres: the class layout, rotated and scaled as a whole, jittered part by part, then shifted.
    cos, sin = torch.cos(rotation), torch.sin(rotation)
    ly, lx = t["layout"][cls].unbind(-1)  # (n, K) each
    cy = scale * (cos * ly + sin * lx)
    cx = scale * (cos * lx - sin * ly)
    centre = torch.stack([cy, cx], dim=-1) + PART_JITTER * torch.randn(n, k, 2, generator=g, dtype=torch.float64)
    centre = centre + shift
    colour = _unit(t["colour"][part] + COLOUR_JITTER * torch.randn(n, 1, 3, generator=g, dtype=torch.float64))
    amplitude = weight.unsqueeze(1) * _uniform(g, (n, 1), *CONTRAST_RANGE) * _uniform(g, (n, k), *PART_AMPLITUDE_RANGE)
    return {
        "theta": t["theta"][part] + rotation,
        "freq": t["freq"][part] / scale,
        "sigma": t["sigma"][part] * scale,
        "cy": centre[..., 0],
        "cx": centre[..., 1],
        "colour": colour,
        "amplitude": amplitude,
        "phase": _uniform(g, (n, k), 0.0, 2 * math.pi),
    }


def _draw_samples(g: torch.Generator, t: dict[str, torch.Tensor], n: int,
                  label_noise: float) -> dict[str, torch.Tensor]:
    """Per-sample parameters (small tensors); the pixels are rendered later, in chunks."""
    label = torch.arange(n) % NUM_CLASSES
    label = label[torch.randperm(n, generator=g)]
    # A distractor class different from the label: add 1..9 modulo 10.
    distractor = (label + torch.randint(1, NUM_CLASSES, (n,), generator=g)) % NUM_CLASSES
    replace = torch.rand(n, generator=g) < label_noise
    observed = torch.where(replace, torch.randint(0, NUM_CLASSES, (n,), generator=g), label)
    true = _draw_patches(g, t, label, torch.ones(n, dtype=torch.float64))
    other = _draw_patches(g, t, distractor, _uniform(g, (n,), *DISTRACTOR_RANGE))
    sample = {key: torch.cat([true[key], other[key]], dim=1) for key in true}
    sample["observed_label"] = observed
    sample["background"] = (t["tint"][label]
                            + BACKGROUND_STD * torch.randn(n, 3, generator=g, dtype=torch.float64))
    sample["gradient"] = GRADIENT_STD * torch.randn(n, 3, 2, generator=g, dtype=torch.float64)
    return sample


def _render_patches(s: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of the coloured Gabor patches of a chunk of samples: float64 (B, 3, H, W).

    A Gabor patch ``cos(kx*X + ky*Y + phase) * exp(-(X-cx)^2/2s^2) * exp(-(Y-cy)^2/2s^2)``
    is the real part of an outer product ``v(Y) u(X)`` of two complex vectors,
    so instead of evaluating cos/exp at every pixel (slow on a small CPU), the
    image is one batched matrix product over the patches:
    ``Re(v u) = Re(v) Re(u) - Im(v) Im(u)``.
    """
    coords = torch.arange(SIZE, dtype=torch.float64) - (SIZE - 1) / 2  # pixel centres, origin mid-image
    k = 2 * math.pi * s["freq"].unsqueeze(-1)  # (B, J, 1)
    sigma = s["sigma"].unsqueeze(-1)
    theta = s["theta"].unsqueeze(-1)
    y = coords - s["cy"].unsqueeze(-1)  # (B, J, SIZE): coordinates relative to each patch centre
    x = coords - s["cx"].unsqueeze(-1)
    arg_y = k * torch.sin(theta) * y + s["phase"].unsqueeze(-1)
    arg_x = k * torch.cos(theta) * x
    env_y = s["amplitude"].unsqueeze(-1) * torch.exp(-(y**2) / (2 * sigma**2))
    env_x = torch.exp(-(x**2) / (2 * sigma**2))
    v_re, v_im = env_y * torch.cos(arg_y), env_y * torch.sin(arg_y)  # (B, J, H)
    u_re, u_im = env_x * torch.cos(arg_x), env_x * torch.sin(arg_x)  # (B, J, W)
    colour = s["colour"].unsqueeze(-1)  # (B, J, 3, 1)
    # left[b, c, h, :] = [colour*Re(v), -colour*Im(v)] over the patches; right = [Re(u); Im(u)].
    left = torch.cat([colour * v_re.unsqueeze(2), -colour * v_im.unsqueeze(2)], dim=1)  # (B, 2J, 3, H)
    left = left.permute(0, 2, 3, 1).reshape(left.shape[0], 3 * SIZE, -1)  # (B, 3H, 2J)
    right = torch.cat([u_re, u_im], dim=1)  # (B, 2J, W)
    return torch.bmm(left, right).view(-1, 3, SIZE, SIZE)


def _render(s: dict[str, torch.Tensor], g: torch.Generator) -> torch.Tensor:
    n = s["observed_label"].shape[0]
    out = torch.empty(n, 3, SIZE, SIZE, dtype=torch.uint8)
    coords = torch.arange(SIZE, dtype=torch.float64) - (SIZE - 1) / 2
    for start in range(0, n, CHUNK):
        chunk = {key: value[start:start + CHUNK] for key, value in s.items()}
        grad = chunk["gradient"]
        background = (chunk["background"].view(-1, 3, 1, 1)
                      + grad[:, :, 0].view(-1, 3, 1, 1) * coords.view(1, 1, SIZE, 1)
                      + grad[:, :, 1].view(-1, 3, 1, 1) * coords.view(1, 1, 1, SIZE))
        clean = (_render_patches(chunk) + background).to(torch.float32)
        # Uniform noise with std NOISE_STD. torch.rand's float32 values are
        # exact multiples of 2**-24 built from the generator's integers, so
        # (unlike randn, whose vectorized log/cos differs by CPU type) they are
        # bit-identical on every machine. The rest of this float32 arithmetic
        # is plain IEEE add/multiply, also bit-identical.
        noise = torch.rand(clean.shape, generator=g) - 0.5
        signal = clean + noise * (NOISE_STD * math.sqrt(12.0))
        out[start:start + CHUNK] = (signal * 64.0 + 128.0).round_().clamp_(0, 255).to(torch.uint8)
    return out


def generate(name: str = NAME) -> DataSplits:
    """Build the synthetic data set ``name`` (``synthetic`` or ``synthetic-small``). Deterministic: same
    tensors on every call. Both draw the same class templates (the generator's first draws); their samples
    are drawn after, so the small set is another sample of the same distribution, not a prefix of the large."""
    num_train, num_test = SIZES[name]
    g = torch.Generator(device="cpu").manual_seed(SEED)
    templates = _draw_templates(g)
    # Train and test parameters are drawn in a fixed order from the one generator.
    # Test labels stay clean, so test accuracy measures the model, not the noise.
    train = _draw_samples(g, templates, num_train, LABEL_NOISE)
    test = _draw_samples(g, templates, num_test, 0.0)
    train_x = _render(train, g)
    test_x = _render(test, g)
    mean, std = channel_stats(train_x)
    return DataSplits(
        name=name,
        num_classes=NUM_CLASSES,
        train_x=train_x,
        train_y=train["observed_label"].contiguous(),
        test_x=test_x,
        test_y=test["observed_label"].contiguous(),
        mean=mean,
        std=std,
    )


def cache_path(name: str = NAME) -> Path | None:
    """Where ``load`` keeps the generated tensors between processes; None: not kept (``DBENCH_CACHE=off``).

    Generating takes about a second of CPU, and every process of a run needs the data (the planner and
    each module's worker), as does every run of a suite. The file name holds a hash of this module's
    source and of torch's version, so a change to the recipe (or to torch's generator) never reads an
    old file. ``DBENCH_CACHE`` names the folder (default ``~/.cache/dbench``).
    """
    folder = os.environ.get(CACHE_ENV, "")
    if folder.lower() == "off":
        return None
    root = Path(folder).expanduser() if folder else Path.home() / ".cache" / "dbench"
    recipe = hashlib.sha256(Path(__file__).read_bytes() + torch.__version__.encode()).hexdigest()[:16]
    return root / f"{name}-{recipe}.pt"


def load_cached(name: str = NAME) -> DataSplits:
    """``generate(name)``, read from the cache file when one was written, else generated and written there.

    The file is written whole to a temporary name and renamed into place, so a reader sees the whole
    file or none. The tensors are checked against the SHA-256 of their bytes stored beside them; a file
    that fails the check is generated and written again. A cache folder that cannot be written is no
    error: the data set is generated as it would be without a cache.
    """
    path = cache_path(name)
    if path is None:
        return generate(name)
    cached = _read_cache(path, name)
    if cached is not None:
        return cached
    splits = generate(name)
    tensors = [splits.train_x, splits.train_y, splits.test_x, splits.test_y]
    buffer = io.BytesIO()
    torch.save({"train_x": tensors[0], "train_y": tensors[1], "test_x": tensors[2], "test_y": tensors[3],
                "mean": list(splits.mean), "std": list(splits.std), "sha256": _digest(tensors)}, buffer)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, buffer.getvalue())
    except (OSError, DbenchError):
        pass  # a read-only or full cache folder: this process generated the data, and the next one will too
    return splits


def _read_cache(path: Path, name: str) -> DataSplits | None:
    """The cached data set, or None when there is no file or it fails its checksum (or cannot be read)."""
    if not path.exists():
        return None
    try:
        saved = torch.load(path, weights_only=True)
        tensors = [saved[k] for k in ("train_x", "train_y", "test_x", "test_y")]
    except (OSError, RuntimeError, EOFError, KeyError, TypeError, pickle.UnpicklingError):
        return None  # damaged: generated and written again
    if saved.get("sha256") != _digest(tensors):
        return None
    return DataSplits(name=name, num_classes=NUM_CLASSES, train_x=tensors[0], train_y=tensors[1],
                      test_x=tensors[2], test_y=tensors[3], mean=tuple(saved["mean"]), std=tuple(saved["std"]))


def _digest(tensors: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _load(name: str, data_dir: Path | None, download: bool) -> DataSplits:
    # Built in: data_dir and download do not apply and are ignored.
    return load_cached(name)


def _spec(name: str, description: str) -> DatasetSpec:
    return DATASETS.register(name)(DatasetSpec(name=name, num_classes=NUM_CLASSES, description=description,
                                               needs_data_dir=False, load=functools.partial(_load, name)))


SPEC = _spec(NAME, "built-in CIFAR-shaped images of Gabor-part layouts, 10k train / 2k test (generated, no download)")
SMALL_SPEC = _spec(SMALL_NAME, "the synthetic recipe at a fifth of the size, 2k train / 400 test: a run in seconds, "
                               "for tests and quick tries, too small to compare methods")
