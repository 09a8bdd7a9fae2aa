"""Byte-level text data sets for language models, and their on-device loader.

Tokens are bytes: the vocabulary is the 256 byte values (``VOCAB``) and there is
no tokenizer, so any text trains as it is stored and a loss is in nats (or bits)
per byte. A text data set is two uint8 byte strings, ``train`` and ``test``
(:class:`TextSplits`); a sample is a window of ``context + 1`` consecutive bytes,
whose first ``context`` bytes are the input and whose last ``context`` bytes are
the targets (the next byte at every position). :class:`TextLoader` serves them
with the interface of :class:`dbench.data.loader.DeviceLoader`.

Two data sets are registered:

``text``
    The bytes of ``--data-dir``: either one UTF-8 file, or a folder whose
    ``*.txt`` files (those directly in it, not in subfolders) are concatenated
    in order of their names (Python string order), byte for byte, with nothing
    inserted between them: end each file with a newline if one should separate
    it from the next. Every file must be valid UTF-8 (checked, so that a binary
    or Latin-1 file is not trained on by mistake), but the tokens are the raw
    bytes: a multi-byte character is several tokens. The first 90% of the
    bytes (``9 * n // 10``) are the training split, the rest (the last 10%,
    rounded up) the test split; the cut may fall inside a multi-byte
    character, which is harmless for byte tokens. Nothing is downloaded.

``synthetic-text``
    Built in, generated (``generate_synthetic``), the text counterpart of the
    ``synthetic`` image set: language-like, with structure a small transformer
    learns quickly. Same 90/10 split.

**Synthetic-text recipe.** All draws are integers from one CPU
``torch.Generator`` seeded with ``SYNTHETIC_SEED`` (``torch.randint`` below
2**24, then reduced modulo small counts in Python), consumed in a fixed order;
no floating point is involved, so the bytes are the same on every machine.

1. **Words.** ``NUM_WORDS`` (256) distinct lowercase pseudo-words of 1-3
   consonant-vowel syllables (consonants ``bdfgklmnprstvz``, vowels ``aeiou``),
   a third of them with a closing consonant: ``fu``, ``lifego``, ``sodomo``,
   ``dalidas``. With a few hundred words, a word's first two or three letters
   mostly determine the rest of its spelling.
2. **Names.** ``NUM_NAMES`` (32) distinct capitalised names of 2-3 syllables
   (``Mekife``, ``Linopa``), none equal to a word.
3. **Word chain.** Each word has ``len(SUCCESSOR_WEIGHTS)`` (4) distinct
   successors drawn uniformly, followed with weights 8:4:2:1 (1.64 bits per
   step): a sparse first-order Markov chain over words.
4. **Sentences.** ``SYNTHETIC_SENTENCES`` (8,000) of them, each: an opener
   (one of the first ``OPENERS`` (16) words, capitalised), a name drawn
   uniformly, 2-5 words continuing the chain from the opener, the marker word
   ``su``, *the same name again*, 1-4 more chain words, then ``". "``. E.g.
   ``Komufu Mekife fu lifego sur noku sodomo su Mekife dalidas guno.`` The
   name after ``su`` can only be predicted by looking back to the sentence's
   second word, 15-48 bytes earlier (29 on average): a task for attention (an
   induction-head copy), worth 5 bits per sentence.

Measured statistics (torch 2.14, generation ~0.05 s on a 2-core CPU):
443,960 bytes (399,564 train, 44,396 test), all ASCII, 55.5 bytes per
sentence on average. Unigram entropy 4.31
bits per byte (the loss of a model that ignores context: 2.99 nats). The
generator's entropy rate, the best loss any model can reach, is 0.41 bits per
byte (0.29 nats): the sum of the entropies of its choices per sentence over the
bytes per sentence (the text determines the choices, so nothing is lost).
Held-out cross-entropy of count-based byte n-gram models fitted on the
training split (add-0.01 smoothing), on the test split: bigram 3.13, trigram
2.19, 4-gram 1.25, 5-gram 0.95 bits per byte; a model that learns spellings
and the word chain goes well below the unigram entropy, and one that copies
names goes below what any n-gram of short order can reach. Check with a small
transformer (a stand-alone pre-LN encoder with a causal mask, not dbench's
model: 2 layers, width 128, 4 heads, learned positions, context 64, batch 32,
AdamW lr 3e-3, one CPU thread): test cross-entropy 2.25 bits per byte after
one epoch (196 steps, 20 s), 1.05 after 500 steps and 0.91 after 700 (90 s).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Iterator

import numpy as np
import torch
from torch import Tensor

from dbench.data.base import DatasetSpec
from dbench.data.loader import epoch_generator
from dbench.errors import DbenchError
from dbench.registry import DATASETS
from dbench.tasks.language_model import LANGUAGE_MODEL

VOCAB = 256  # byte-level tokens: no tokenizer
TEXT_NAME = "text"
SYNTHETIC_NAME = "synthetic-text"


def train_bytes(n: int) -> int:
    """How many of ``n`` bytes go to the training split: the first 90%, rounded down (the test split is the rest)."""
    return 9 * n // 10


def _uint8(data: bytes) -> Tensor:
    # numpy copes with an empty buffer (torch.frombuffer does not); the copy makes the tensor writable.
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy())


def unigram_entropy_bits(tokens: Tensor) -> float:
    """Entropy, in bits per byte, of the byte frequencies of a uint8 tensor (0.0 for an empty one)."""
    if tokens.dtype != torch.uint8:
        raise ValueError(f"expected a uint8 tensor, got {tokens.dtype}")
    counts = torch.bincount(tokens.reshape(-1).cpu().long(), minlength=VOCAB).to(torch.float64)
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * p.log2()).sum())


# --------------------------------------------------------------------------- splits


@dataclass(frozen=True)
class TextSplits:
    name: str
    train: Tensor  # uint8, 1-D, contiguous CPU: the bytes
    test: Tensor
    source: str  # one line: where the text came from

    kind: ClassVar[str] = "text"  # what the samples are; a model declares the same word
    num_classes: ClassVar[int] = VOCAB  # the next-byte prediction has one class per byte value

    def __post_init__(self) -> None:
        # A wrongly built split is a bug in dbench, not a user error (ValueError, as in DataSplits).
        for split in ("train", "test"):
            t = getattr(self, split)
            if not isinstance(t, Tensor) or t.dtype != torch.uint8 or t.dim() != 1:
                found = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"{self.name} {split} must be a uint8 1-D tensor of bytes, got {found}")
            if t.device.type != "cpu" or not t.is_contiguous():
                raise ValueError(f"{self.name} {split} must be a contiguous CPU tensor")
        if "\n" in self.source:
            raise ValueError(f"{self.name} source must be one line, got {self.source!r}")

    def check_context(self, context: int | None) -> None:
        """A one-line DbenchError unless both splits hold at least one sequence: ``context + 1`` bytes
        (``context`` inputs and ``context`` next-byte targets)."""
        if context is None:
            raise ValueError("a text data set needs a context length (the planner passes an int)")
        if isinstance(context, bool) or not isinstance(context, int) or context < 1:
            raise DbenchError(f"--context must be a positive integer (bytes per sequence), got {context!r}")
        sizes = {"training": self.train.numel(), "test": self.test.numel()}
        short = [(n, split) for split, n in sizes.items() if n < context + 1]
        if not short:
            return
        n, split = min(short)
        largest = min(sizes.values()) - 1
        fits = (f"the largest --context that fits is {largest}" if largest >= 1
                else "no --context fits (a sequence needs at least 2 bytes)")
        raise DbenchError(
            f"--context {context} is too long for data set {self.name}: its {split} split holds {n} bytes, "
            f"and one sequence needs context + 1 = {context + 1}; {fits} (or use more text)"
        )

    def task(self, context: int | None) -> dict:
        """What a model trained on these splits does, for config.json."""
        return {"kind": LANGUAGE_MODEL.kind, "vocab": VOCAB, "context": context, "unit": "byte"}

    def loader(self, *, train: bool, batch_size: int, device: torch.device, seed: int,
               context: int | None = None) -> TextLoader:
        """The training or test loader of these splits on ``device``; ``context`` is required."""
        self.check_context(context)
        assert context is not None  # check_context refuses None
        return TextLoader(self.train if train else self.test, batch_size, device, context=context,
                          train=train, seed=seed)


# --------------------------------------------------------------------------- loader


class TextLoader:
    """Windows of ``context + 1`` bytes of one split, on ``device``: the interface of ``DeviceLoader``.

    The split lives on the device as uint8; a batch of windows is gathered with
    one indexing op and returned as int64 ``(x, y)`` of shape ``(B, context)``,
    ``y[:, t]`` the byte after ``x[:, t]``. Windows start ``context`` bytes
    apart, so the inputs of a pass never overlap (a window's last target is the
    next window's first input). With ``n`` bytes in the split there are
    ``W = (n - 1) // context`` such windows from offset 0.

    **Evaluation** (``train=False``): the ``W`` windows starting at
    ``0, context, 2*context, ...``, in that order, every time. The at most
    ``context - 1`` bytes after them are not scored.

    **Training**: every epoch has ``num_samples = max(W - 1, 1)`` windows. Its
    draws come from ``epoch_generator(seed, epoch)`` alone, so that an epoch is
    the same whether or not the epochs before it ran (an exact resume): first
    an offset, uniform in ``[0, min(context - 1, n - 1 - num_samples * context)]``
    (with ``W >= 2`` that is ``[0, context - 1]``: window boundaries land on
    every phase, and giving up one window leaves room for any offset), then a
    uniformly random permutation of the ``num_samples`` windows starting at
    ``offset + k * context``. ``epoch_plan(epoch)`` returns ``(offset, order)``:
    the i-th window of the epoch starts at ``offset + order[i] * context``.
    """

    def __init__(self, data: Tensor, batch_size: int, device: torch.device, *, context: int, train: bool,
                 seed: int):
        if batch_size < 1:
            raise DbenchError(f"batch size must be a positive integer, got {batch_size}")
        if data.dtype != torch.uint8 or data.dim() != 1:
            raise ValueError(f"expected a uint8 1-D tensor of bytes, got {data.dtype} {tuple(data.shape)}")
        if isinstance(context, bool) or not isinstance(context, int) or context < 1:
            raise ValueError(f"context must be a positive integer, got {context!r}")
        if data.numel() < context + 1:
            raise ValueError(f"{data.numel()} bytes hold no window of context + 1 = {context + 1} bytes")
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.train = train
        self.seed = seed
        self.context = context
        self.data = data.to(self.device).contiguous()
        self._windows = (data.numel() - 1) // context  # W: windows from offset 0
        self._span = torch.arange(context + 1, device=self.device)  # a window's byte positions

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)  # ceil: the last partial batch is kept

    @property
    def num_samples(self) -> int:
        """Sequences in one pass of the split (the same every epoch)."""
        return max(self._windows - 1, 1) if self.train else self._windows

    def _draw(self, g: torch.Generator) -> tuple[int, Tensor]:
        """A training pass's offset and window order, drawn from ``g`` in that order."""
        k = self.num_samples
        highest = min(self.context - 1, self.data.numel() - 1 - k * self.context)
        offset = int(torch.randint(0, highest + 1, (1,), generator=g))
        return offset, torch.randperm(k, generator=g)

    def epoch_plan(self, epoch: int) -> tuple[int, Tensor]:
        """``(offset, order)`` of one epoch, order on the CPU: the i-th window starts at
        ``offset + order[i] * context``. Evaluation: ``(0, arange(num_samples))`` for every epoch."""
        if not self.train:
            return 0, torch.arange(self.num_samples)
        return self._draw(epoch_generator(self.seed, epoch))

    def _starts(self, offset: int, order: Tensor) -> Tensor:
        return (offset + order * self.context).to(self.device)

    def _gather(self, starts: Tensor) -> tuple[Tensor, Tensor]:
        windows = self.data[starts[:, None] + self._span].long()  # (B, context + 1): one gather
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def _targets(self, starts: Tensor) -> Tensor:
        return self.data[starts[:, None] + self._span[1:]].long()

    def fixed_batches(self, count: int, seed: int) -> list[tuple[Tensor, Tensor]]:
        """``count`` batches of distinct, non-overlapping sequences drawn once from ``seed``: the σ probe's set.

        A training loader draws an offset and an order as an epoch does (from a
        generator seeded with ``seed``) and takes the first windows of that
        order; an evaluation loader takes a random subset of its fixed windows.
        """
        n = min(self.num_samples, count * self.batch_size)
        g = torch.Generator().manual_seed(seed)
        if self.train:
            offset, order = self._draw(g)
        else:
            offset, order = 0, torch.randperm(self.num_samples, generator=g)
        x, y = self._gather(self._starts(offset, order[:n]))
        return list(zip(x.split(self.batch_size), y.split(self.batch_size)))

    def epoch(self, epoch: int, images: bool = True, start: int = 0) -> Iterator[tuple[Tensor | None, Tensor]]:
        """The batches of one epoch, from batch ``start`` on (a run resumed inside an epoch: batch i is the
        same whatever came before). ``images=False`` yields ``(None, y)`` of the same batches, for the
        processes of modules above the first, which need the targets only. An evaluation pass always
        starts at its first batch."""
        if not self.train and start:
            raise ValueError("an evaluation pass always starts at its first batch")
        starts = self._starts(*self.epoch_plan(epoch))
        for batch in starts.split(self.batch_size)[start:]:
            if images:
                yield self._gather(batch)
            else:
                yield None, self._targets(batch)


# --------------------------------------------------------------------------- the `text` data set


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


_ACCEPTED = "pass --data-dir pointing to a UTF-8 text file or to a folder of .txt files"


def _unreadable(path: Path, error: OSError) -> DbenchError:
    return DbenchError(f"cannot read {path}: {_one_line(error.strerror or error)}; make it readable by this user "
                       f"or {_ACCEPTED}")


def _check_utf8(path: Path, data: bytes) -> None:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DbenchError(
            f"{path} is not UTF-8 text: byte 0x{data[e.start]:02x} at byte offset {e.start} is invalid "
            f"({e.reason}); the text data set reads UTF-8 files only (convert it, e.g. with iconv -t UTF-8)"
        ) from e


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise _unreadable(path, e) from e


def read_text(path: Path) -> tuple[bytes, str]:
    """The bytes of ``path`` (a UTF-8 file, or a folder of .txt files concatenated by name) and a one-line
    description of where they came from; a one-line DbenchError for bad input."""
    path = Path(path)
    try:
        is_dir, is_file, exists = path.is_dir(), path.is_file(), path.exists()
    except OSError as e:  # a folder on the way that cannot be searched
        raise _unreadable(path, e) from e
    if is_file:
        data = _read(path)
        _check_utf8(path, data)
        if not data:
            raise DbenchError(f"empty text file {path} (0 bytes): {_ACCEPTED} that holds some text")
        return data, f"{path} ({len(data)} bytes)"
    if is_dir:
        try:
            files = sorted((p for p in path.iterdir() if p.name.endswith(".txt") and p.is_file()),
                           key=lambda p: p.name)
        except OSError as e:
            raise _unreadable(path, e) from e
        if not files:
            raise DbenchError(f"no .txt file in folder {path}: {_ACCEPTED} (files directly in the folder, "
                              f"named *.txt)")
        parts = []
        for file in files:
            data = _read(file)
            _check_utf8(file, data)
            parts.append(data)
        data = b"".join(parts)
        if not data:
            raise DbenchError(f"empty text in folder {path}: its {len(files)} .txt file(s) hold 0 bytes; "
                              f"{_ACCEPTED} that holds some text")
        return data, f"{path} ({len(files)} .txt files, {len(data)} bytes)"
    if exists:
        raise DbenchError(f"{path} is neither a file nor a folder: {_ACCEPTED}")
    raise DbenchError(f"missing text data path {path}: {_ACCEPTED}")


def split_text(name: str, data: bytes, source: str) -> TextSplits:
    """The first 90% of ``data`` (``train_bytes``) for training, the rest for testing."""
    cut = train_bytes(len(data))
    return TextSplits(name=name, train=_uint8(data[:cut]), test=_uint8(data[cut:]), source=source)


def _load_text(data_dir: Path | None, download: bool) -> TextSplits:
    if data_dir is None:
        raise DbenchError(f"data set {TEXT_NAME} needs --data-dir: a UTF-8 text file or a folder of .txt files")
    data, source = read_text(Path(data_dir))
    return split_text(TEXT_NAME, data, source)


TEXT_SPEC = DATASETS.register(TEXT_NAME)(
    DatasetSpec(
        name=TEXT_NAME,
        num_classes=VOCAB,
        description="byte-level text from --data-dir (a UTF-8 file or a folder of .txt files), last 10% held out",
        needs_data_dir=True,
        load=_load_text,
        kind="text",
        can_download=False,
    )
)


# --------------------------------------------------------------------------- the `synthetic-text` data set

SYNTHETIC_SEED = 20240611  # fixed: the data set is part of the benchmark definition
CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"
NUM_WORDS = 256
NUM_NAMES = 32
OPENERS = 16  # a sentence opens with one of the first OPENERS words
SUCCESSOR_WEIGHTS = (8, 4, 2, 1)  # each word's successors, most likely first
MARKER = "su"  # always followed by the sentence's name, again
BODY_BEFORE = (2, 5)  # chain words between the name and the marker, inclusive range
BODY_AFTER = (1, 4)  # chain words after the repeated name
SYNTHETIC_SENTENCES = 8_000


class _Ints:
    """Integers from a torch generator, drawn in blocks: ``below(n)`` is uniform-ish on ``[0, n)``.

    Values below 2**24 reduced modulo ``n`` (n <= 256 here: the bias is below
    2e-5 and, more to the point, the result is exact integer arithmetic).
    """

    BLOCK = 1 << 16

    def __init__(self, seed: int):
        self._g = torch.Generator(device="cpu").manual_seed(seed)
        self._buf: list[int] = []
        self._i = 0

    def below(self, n: int) -> int:
        if self._i == len(self._buf):
            self._buf = torch.randint(0, 1 << 24, (self.BLOCK,), generator=self._g).tolist()
            self._i = 0
        value = self._buf[self._i]
        self._i += 1
        return value % n

    def between(self, bounds: tuple[int, int]) -> int:
        lo, hi = bounds
        return lo + self.below(hi - lo + 1)


def _spell(r: _Ints, syllables: tuple[int, int]) -> str:
    word = "".join(CONSONANTS[r.below(len(CONSONANTS))] + VOWELS[r.below(len(VOWELS))]
                   for _ in range(r.between(syllables)))
    if r.below(3) == 0:
        word += CONSONANTS[r.below(len(CONSONANTS))]
    return word


def _distinct(r: _Ints, n: int, syllables: tuple[int, int], taken: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        word = _spell(r, syllables)
        if word not in taken:
            taken.add(word)
            out.append(word)
    return out


def _successors(r: _Ints) -> list[list[int]]:
    table = []
    for _ in range(NUM_WORDS):
        picked: list[int] = []
        while len(picked) < len(SUCCESSOR_WEIGHTS):
            w = r.below(NUM_WORDS)
            if w not in picked:
                picked.append(w)
        table.append(picked)
    return table


def synthetic_entropy_rate_bits() -> float:
    """The generator's expected entropy per byte (bits): choice entropy per sentence / expected bytes per sentence,
    estimated on the generated text (its choices are recoverable from it, so this is the text's entropy rate)."""
    data = generate_synthetic()
    total = sum(SUCCESSOR_WEIGHTS)
    chain = -sum(w / total * math.log2(w / total) for w in SUCCESSOR_WEIGHTS)
    mean_words = (sum(BODY_BEFORE) + sum(BODY_AFTER)) / 2
    per_sentence = (math.log2(OPENERS) + math.log2(NUM_NAMES) + math.log2(BODY_BEFORE[1] - BODY_BEFORE[0] + 1)
                    + math.log2(BODY_AFTER[1] - BODY_AFTER[0] + 1) + chain * mean_words)
    return per_sentence * SYNTHETIC_SENTENCES / len(data)


@functools.lru_cache(maxsize=1)
def generate_synthetic() -> bytes:
    """The synthetic-text bytes (see the module docstring). Deterministic; cached in the process (bytes are
    immutable; ``generate_synthetic.__wrapped__()`` generates afresh)."""
    r = _Ints(SYNTHETIC_SEED)
    taken = {MARKER}
    words = _distinct(r, NUM_WORDS, (1, 3), taken)
    names = [name.capitalize() for name in _distinct(r, NUM_NAMES, (2, 3), taken)]
    successors = _successors(r)
    cumulative = [sum(SUCCESSOR_WEIGHTS[:i + 1]) for i in range(len(SUCCESSOR_WEIGHTS))]

    def step(w: int) -> int:
        u = r.below(cumulative[-1])
        return successors[w][next(i for i, c in enumerate(cumulative) if u < c)]

    sentences = []
    for _ in range(SYNTHETIC_SENTENCES):
        w = r.below(OPENERS)
        name = names[r.below(NUM_NAMES)]
        before, after = r.between(BODY_BEFORE), r.between(BODY_AFTER)
        tokens = [words[w].capitalize(), name]
        for _ in range(before):
            w = step(w)
            tokens.append(words[w])
        tokens += [MARKER, name]
        for _ in range(after):
            w = step(w)
            tokens.append(words[w])
        sentences.append(" ".join(tokens) + ". ")
    return "".join(sentences).encode("ascii")


def _load_synthetic(data_dir: Path | None, download: bool) -> TextSplits:
    # Built in: data_dir and download do not apply and are ignored (the planner refuses them).
    return split_text(SYNTHETIC_NAME, generate_synthetic(),
                      f"generated by dbench.data.text (seed {SYNTHETIC_SEED}, {SYNTHETIC_SENTENCES} sentences)")


SYNTHETIC_SPEC = DATASETS.register(SYNTHETIC_NAME)(
    DatasetSpec(
        name=SYNTHETIC_NAME,
        num_classes=VOCAB,
        description="built-in byte-level text of pseudo-word sentences with a word chain and name copies, "
                    "444 KB (generated, no download)",
        needs_data_dir=False,
        load=_load_synthetic,
        kind="text",
        can_download=False,
    )
)
