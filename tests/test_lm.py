"""The language-model workload: every method on gpt-nano learns synthetic-text (or its shortfall is pinned),
the engines agree bit for bit on a transformer, a text run records what its metrics mean, and bad text
input is one line."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.multiprocessing as mp

from conftest import interrupted_at_step, run_cli
from distributed_workers import equivalence_worker
from dbench import Trainer, objective
from dbench import run as runner
from dbench.config import RunConfig
from dbench.data.text import generate_synthetic, unigram_entropy_bits
from dbench.engine.launch import free_port
from dbench.method import MODEL_PARALLEL
from dbench.partition import partition, split_modules
from dbench.registry import DATASETS, METHODS, MODELS
from test_distributed import assert_same, local_reference

MODEL_PARALLEL_METHODS = sorted(name for name, cls in METHODS.items()  # those the local engine runs
                                if cls.parallelism == MODEL_PARALLEL and "local" in cls.engines)

# A short run: 120 steps of 16 sequences of 32 bytes (61k tokens, a sixth of an epoch), SGD at the lm suite's lr.
STEPS, BATCH, CONTEXT, LR = 120, 16, 32, 0.03
# "Learns": held-out loss at most this share of the unigram entropy, the loss of the best model that ignores
# context (2.99 nats). Measured at 150 steps: bp 2.18, gpipe/1f1b 2.18, dgl 2.19, dfa 2.25, bdfa 2.28,
# fdg 2.33, fr 2.33, ddg 2.34 nats (0.73-0.78 of it).
LEARNS_BELOW = 0.85
# Measured, and pinned so that a change shows: on gpt-nano DNI's synthetic gradients point the right way
# (cDNI's cosine with the true gradient rises to 0.7 in 200 steps) but carry a component shared by every
# token about five times the true gradient's, which drifts module 0's residual stream (its norm grows from
# 0.45 to 3-50) and stalls the top module at the unigram loss. benchmarks/LEARNING.md has the numbers.
STALLS = {"dni", "cdni"}
# Measured: 2BW applies every module's gradient one batch late, and with this test's SGD (momentum 0.9, lr 0.03)
# on gpt-nano that delay overshoots: the training loss, averaged over 20 steps, climbs from 4.96 to 5.76 nats by
# step 60 and is back to 3.25 at step 120 (1f1b's: 2.22), held-out 3.22 nats, above the unigram entropy. The same
# delayed loop written in plain torch gives the same losses, and without momentum it learns (3.1 nats over steps
# 30-39, against 4.9 with momentum 0.9): the method under these settings, not dbench (the paper trains with Adam).
OVERSHOOTS = {"2bw"}
# Measured, and pinned: gpt-nano has no reversible block, so PETRA keeps every block's input and recomputes each
# block at the current weights on its stored input (docs/ALGORITHMS.md, "PETRA": the input-buffer variant, the
# released code's DSP). At this lr its train loss jumps at step 80 (4.6 nats) and the held-out loss is 3.08 after
# 120 steps, above the unigram entropy; with the parameter buffer (the exact delayed gradient) it learns (2.57).
UNSTABLE = {"petra"}


@pytest.fixture(scope="module")
def synthetic_text():
    return DATASETS.get("synthetic-text").load(None, False)


def held_out_loss(trainer: Trainer, splits, batches: int = 4) -> float:
    test = splits.loader(train=False, batch_size=64, device="cpu", seed=0, context=CONTEXT)
    total, count = 0.0, 0
    for _, (x, y) in zip(range(batches), test.epoch(0)):
        total += objective.cross_entropy(trainer.predict(x), y, reduction="sum").item()
        count += y.numel()
    return total / count


@pytest.mark.parametrize("method", MODEL_PARALLEL_METHODS)
def test_each_method_at_k2_learns_gpt_nano_on_synthetic_text(method, synthetic_text, request):
    if method in STALLS:
        request.applymarker(pytest.mark.xfail(strict=True, reason="DNI's drift stalls it at the unigram loss"))
    if method in OVERSHOOTS:
        request.applymarker(pytest.mark.xfail(strict=True, reason="2BW's one-batch delay with momentum 0.9 "
                                                                  "overshoots in 120 steps"))
    if method in UNSTABLE:
        request.applymarker(pytest.mark.xfail(strict=True, reason="stored inputs at the current weights diverge"))
    torch.manual_seed(0)
    model = MODELS.get("gpt-nano")()
    # The pipelines with 2 micro-batches instead of 4K: the same exact gradient (test_pipeline.py), half the time.
    options = {"microbatches": 2} if "microbatches" in METHODS.get(method).Options.__dataclass_fields__ else None
    trainer = Trainer(split_modules(model.blocks, partition(model.blocks, 2, "blocks")), method, lr=LR,
                      weight_decay=0.0, num_classes=256, options=options)
    train = synthetic_text.loader(train=True, batch_size=BATCH, device="cpu", seed=0, context=CONTEXT)
    for _, (x, y) in zip(range(STEPS), train.epoch(0)):
        trainer.step(x, y)
    unigram = unigram_entropy_bits(synthetic_text.test) * math.log(2)  # nats per byte
    loss = held_out_loss(trainer, synthetic_text)
    assert math.isfinite(loss)
    assert loss < LEARNS_BELOW * unigram, f"{method}: held-out {loss:.3f} nats, unigram entropy {unigram:.3f}"


def test_distributed_equals_local_on_a_transformer_for_every_method(tmp_path):
    """Token inputs, per-token losses, DFA's per-position feedback, DNI's per-token synthesizers, DGL's
    per-token heads: losses, σ, predictions and the whole final state are bit-identical across engines."""
    out = tmp_path / "results.pt"
    mp.start_processes(equivalence_worker, args=(2, free_port(), MODEL_PARALLEL_METHODS, str(out), "text"),
                       nprocs=2, start_method="forkserver", join=True)
    got = torch.load(out, weights_only=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for method in MODEL_PARALLEL_METHODS:
            want = local_reference(method, 2, "text")
            assert_same(want, got[method], method)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def small_text(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(generate_synthetic()[:12_000])
    return path


def test_a_text_run_records_its_task_and_language_model_metrics(small_text, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli(["run", "--method", "ddp", "--gpus", "2", "--model", "gpt-nano", "--dataset", "text",
                            "--data-dir", str(small_text), "--context", "32", "--batch-size", "16", "--epochs", "1",
                            "--lr", str(LR), "--out", str(out), "--quiet"], monkeypatch, capsys)
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["task"] == {"kind": "language model", "vocab": 256, "context": 32, "unit": "byte"}
    # 12,000 bytes: 10,800 train -> (10,800 - 1) // 32 - 1 = 336 windows; 1,200 test -> 37 windows
    assert (config["train_samples"], config["test_samples"]) == (336, 37)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epoch = [r for r in rows if r["kind"] == "epoch"][-1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "complete"
    assert summary["best_test_bpb"] == pytest.approx(epoch["test_loss"] / math.log(2))
    assert 0 <= epoch["test_acc"] <= 1 and math.isfinite(epoch["test_loss"])


@pytest.mark.parametrize("method", ["fdg", "dni"])
def test_a_text_run_stopped_inside_an_epoch_resumes_to_the_numbers_of_an_unbroken_one(method, small_text, tmp_path,
                                                                                     monkeypatch):
    """Windows drawn from (seed, epoch) alone, the label queue (FDG) and the synthesizers (DNI) in the
    checkpoint: a stop inside the second epoch, resumed, ends with every number of an unbroken run."""
    from test_resume import numbers

    cfg = dict(method=method, model="gpt-nano", dataset="text", data_dir=str(small_text), context=32, gpus=2,
               epochs=2, batch_size=32, lr=LR, seed=4)  # 336 windows: 11 steps an epoch
    whole = runner.start(RunConfig(**cfg), tmp_path / "whole", quiet=True)
    cut = tmp_path / "cut"
    # stopped at step 5 of epoch 2, two steps after its checkpoint at step 3; the 8 steps left cover the
    # warm-up that a resumed epoch takes again (5 steps), so even the throughput's bookkeeping agrees
    with interrupted_at_step(monkeypatch, 11 + 5), \
            pytest.raises(runner.RunInterrupted, match=r"1 finished epoch\(s\) and 3 step\(s\) of epoch 2"):
        runner.start(RunConfig(**cfg, checkpoint_every=3), cut, quiet=True)
    runner.resume(cut, quiet=True)
    assert numbers(cut) == numbers(whole)


TEXT = ["--model", "gpt-nano", "--dataset", "text"]


@pytest.mark.parametrize("make, args, message", [
    (None, [*TEXT, "--data-dir", "{tmp}/missing.txt"], "missing.txt"),
    ("empty.txt", [*TEXT, "--data-dir", "{tmp}/empty.txt"], "empty"),
    ("latin1.txt", [*TEXT, "--data-dir", "{tmp}/latin1.txt"], "not UTF-8"),
    ("short.txt", [*TEXT, "--data-dir", "{tmp}/short.txt"],
     "--context 128 is too long for data set text: its test split holds 20 bytes"),
    ("corpus.txt", [*TEXT, "--data-dir", "{tmp}/corpus.txt", "--context", "129"],
     "bad --context 129: model 'gpt-nano' reads sequences of at most 128 tokens"),
    ("corpus.txt", [*TEXT, "--data-dir", "{tmp}/corpus.txt", "--download"],
     "--download does not apply to data set 'text'"),
    (None, ["--model", "gpt-nano", "--dataset", "synthetic"],
     "model 'gpt-nano' reads text data but data set 'synthetic' holds image data"),
    (None, ["--model", "cnn", "--dataset", "synthetic-text"],
     "model 'cnn' reads image data but data set 'synthetic-text' holds text data"),
    (None, ["--model", "cnn", "--context", "64"], "--context does not apply to model 'cnn'"),
    (None, ["--model", "gpt-nano", "--dataset", "synthetic-text", "--context", "0"], "bad --context 0"),
    (None, ["--model", "gpt-nano", "--dataset", "synthetic-text", "--method", "dgl", "--gpus", "2",
            "--opt", "depth=2"], "option(s) depth=2 of 'dgl' shape the conv head"),
    (None, ["--model", "gpt-nano", "--dataset", "text"], "--data-dir"),
])
def test_bad_text_input_is_one_line_exit_2_and_writes_nothing(make, args, message, tmp_path, monkeypatch, capsys):
    files = tmp_path / "files"
    files.mkdir()
    contents = {"empty.txt": b"", "latin1.txt": "caf\u00e9 au lait".encode("latin-1"), "short.txt": b"tiny text\n" * 20,
                "corpus.txt": generate_synthetic()[:4_000]}
    if make:
        (files / make).write_bytes(contents[make])
    work = tmp_path / "work"
    work.mkdir()
    code, out, err = run_cli(["run", *[a.replace("{tmp}", str(files)) for a in args]], monkeypatch, capsys, cwd=work)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0]
    assert "Traceback" not in err + out
    assert list(work.iterdir()) == []  # no run directory, no results/
