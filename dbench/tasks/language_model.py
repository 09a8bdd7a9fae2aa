"""A byte-level language model: every position predicts the next byte, judged by the test loss.

Its quality is the best (lowest) test loss in bits per byte: the mean cross-entropy per byte in nats / ln 2
(one token is one byte). config.json's "task" is {"kind": "language model", "vocab": 256, "context": T,
"unit": "byte"}; a sample is a sequence of T tokens, so tokens/s = samples/s × T.
"""
from __future__ import annotations

import math

from dbench.registry import TASKS
from dbench.task import Criterion, Measure, Quality, Target, Task

KIND = "language model"
LN2 = math.log(2)
BPB_DIGITS = 3  # 0.01 bits per byte is a difference between methods that matters


def bits_per_byte(loss_nats: float | None) -> float | None:
    """A byte-level model's cross-entropy per token (nats) in bits per byte: one token is one byte."""
    return None if loss_nats is None else loss_nats / LN2


class LossTarget(Target):
    def problem(self, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not (math.isfinite(value) and value > 0):
            return f"{value} is not a test loss in bits per byte: give a finite number above 0, e.g. 1.5"
        return None

    def reference_value(self, reference_runs):
        return reference_runs["best_test_bpb"].astype(float).mean()


class LanguageModel(Task):
    kind = KIND
    plural = "Language models"
    runs_title = "Language-model runs"
    suffix = "-lm"
    quality = Quality(column="best_test_bpb", name="best test bpb", digits=BPB_DIGITS, short="bpb",
                      delta="Δ bpb vs {reference}", axis="best test loss (bits per byte), mean over seeds",
                      words="best test loss in bits per byte", better="as low a loss", terminal="bpb")
    target = LossTarget(
        keyword="target_loss", column="target_bpb", epoch_column="test_bpb", higher_is_better=False, factor=1.01,
        metavar="BPB", help="Time to target loss, for language models: training seconds until the test loss falls "
                            "to BPB bits per byte, a finite number above 0 [default: 1.01 × model-parallel bp's "
                            "mean best test bits per byte in each comparison].",
        name="test loss", unit=" bits per byte", scale=1, digits=BPB_DIGITS,
        reference_name="mean best test bits per byte", given_name="test loss", shown="target bpb")
    # dbench check: absolute, in bits per byte (a higher loss is worse). As with accuracy, the runs are
    # deterministic on one machine and the margin absorbs other CPUs' float rounding. 0.05 bpb is a factor
    # 2^0.05 ≈ 1.035 in per-byte perplexity, so a change that costs a method 3.5% of perplexity per byte is
    # caught, and it is under 1% of the 8 bits per byte of an untrained model (uniform over 256 bytes), the
    # scale a smoke run's losses are on.
    criterion = Criterion(key="best_test_bpb", name="best test bits per byte", tolerance_key="bits_per_byte",
                          tolerance=0.05, higher_is_better=False)
    curves = (Measure("train_bpb", "training loss (bits per byte)"), Measure("test_bpb", "test loss (bits per byte)"))
    curves_caption = (" A byte-level language model: training and test loss in bits per byte, the mean "
                      "cross-entropy per byte in nats / ln 2 (lower is better).")
    runs_columns = (Measure("best_test_bpb", "best test bpb", digits=BPB_DIGITS),
                    Measure("best_test_acc", "next-token acc %", scale=100))
    generalization_title = "Best test loss (bits per byte): language models"
    generalization_intro = (" Language models (byte-level text): the best (lowest) test loss in bits per byte "
                            "instead, in a table of their own.")
    generalization_extras = (Measure("best_test_acc", "next-token accuracy %", scale=100, key="best_next_token_acc"),
                             Measure("final_test_bpb", "final test bpb", digits=BPB_DIGITS))
    verdict_title = "What each method buys and costs, per model, data set and K: language models"
    verdict_intro = ("For a language model (byte-level text) quality is the test loss in bits per byte (the mean "
                     "cross-entropy per byte / ln 2, lower is better) instead of the error, and the time is until "
                     "the test loss first falls to a target: its own table (verdict-lm).")
    verdict_extras = (Measure("best_test_acc", "next-token accuracy %", scale=100),)
    run_columns = ("context", "best_test_loss", "best_test_bpb", "final_test_bpb", "final_train_bpb", "tokens_per_s")
    epoch_columns = ("train_bpb", "test_bpb")
    rates = (("tokens_per_s", "tokens/s", "samples/s of a language model counts sequences, tokens/s its bytes; "),)

    def best_epoch(self, done):
        # the lowest test loss; a non-finite loss only where every epoch has one
        finite = [r for r in done if r.get("test_loss") is not None and math.isfinite(r["test_loss"])]
        return min(finite, key=lambda r: r["test_loss"]) if finite else done[0]

    def summary_fields(self, best, last, samples_per_s, spec):
        fields = {"best_test_loss": best["test_loss"], "best_test_bpb": bits_per_byte(best["test_loss"]),
                  "final_test_bpb": bits_per_byte(last["test_loss"]),
                  "final_train_bpb": bits_per_byte(last["train_loss"])}
        context = spec.get("context")
        if samples_per_s is not None and isinstance(context, int) and context > 0:
            fields["tokens_per_s"] = samples_per_s * context  # samples are sequences of T tokens
        return fields

    def summary_line(self, summary):
        return (f"Best test loss {summary['best_test_bpb']:.3f} bits per byte ({summary['best_test_loss']:.4f} nats "
                f"per byte; next-token accuracy {100 * summary['best_test_acc']:.2f}%) (epoch "
                f"{summary['best_epoch']}); final test loss {summary['final_test_bpb']:.3f} bits per byte, final "
                f"train loss {summary['final_train_bpb']:.3f} bits per byte (bits per byte = loss in nats / ln 2).")

    def rate_text(self, summary, spec):
        rate = summary.get("samples_per_s")
        context = spec.get("context")
        tokens = f" ({rate * context:.0f} tokens/s)" if rate is not None and isinstance(context, int) else ""
        return f"{'–' if rate is None else f'{rate:.0f}'} sequences/s{tokens}"

    def best_text(self, summary):
        bpb = summary.get("best_test_bpb")
        return "" if bpb is None else f"best test loss {bpb:.3f} bits per byte"

    def run_fields(self, summary, spec):
        return {"context": spec.get("context"),
                **{key: summary.get(key) for key in ("best_test_loss", "best_test_bpb", "final_test_bpb",
                                                     "final_train_bpb", "tokens_per_s")}}

    def epoch_fields(self, row):
        return {"train_bpb": bits_per_byte(row.get("train_loss")), "test_bpb": bits_per_byte(row.get("test_loss"))}

    def verdict_caption(self, reference, target, not_reached, dash):
        return (f"best test bpb: the best epoch's (lowest) test loss in bits per byte (the mean cross-entropy per "
                f"byte in nats / ln 2; a byte-level language model), mean ± sample standard deviation over seeds. "
                f"Δ bpb vs {reference}: the method's mean minus {reference}'s in the same comparison, in bits per "
                f"byte (negative: a better model). target bpb: {target}. time to target (s): training seconds "
                "(evaluation left out) up to the end of the first epoch whose test loss is at or below the target, "
                f"mean over the seeds that reached it (k of n seeds where not all did); {not_reached}: no seed did. ")

    def generalization_caption(self, csv):
        return ("Each run's best epoch: its lowest test loss, in bits per byte (the mean cross-entropy per byte in "
                f"nats / ln 2; lower is better); {csv} also has the next-token accuracy at that epoch "
                "(best_next_token_acc_mean, %).")


LANGUAGE_MODEL = TASKS.register(KIND)(LanguageModel())
