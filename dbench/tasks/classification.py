"""Classification: one label per sample (images), judged by the best epoch's test error.

The default task: a run recorded before config.json had a "task" is one.
"""
from __future__ import annotations

from dbench.registry import TASKS
from dbench.task import Criterion, Measure, Quality, Target, Task

KIND = "classification"


class AccuracyTarget(Target):
    def problem(self, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:  # NaN fails too
            return f"{value} is not a test accuracy in (0, 1]: give e.g. 0.9 for 90%"
        return None

    def reference_value(self, reference_runs):
        # the mean best accuracy is 1 - the mean best error (the error in %, as the verdict averages it)
        return 1 - reference_runs["best_test_error"].mean() * 100 / 100


class Classification(Task):
    kind = KIND
    default = True
    plural = "Classifications"
    runs_title = "Classification runs"
    quality = Quality(column="best_test_error", name="best test error %", scale=100, digits=2, short="error",
                      delta="Δ error vs {reference} (pp)", axis="best test error (%), mean over seeds",
                      words="best test error", better="as accurate", terminal="error %",
                      terminal_delta="Δ vs {reference}")
    target = AccuracyTarget(
        keyword="target_acc", column="target_acc", epoch_column="test_acc", higher_is_better=True, factor=0.99,
        metavar="ACC", help="Time to accuracy: training seconds until the test accuracy reaches ACC, in (0, 1] "
                            "[default: 0.99 × model-parallel bp's mean best accuracy in each comparison].",
        name="test accuracy", unit="%", scale=100, digits=2, reference_name="mean best test accuracy",
        given_name="accuracy", shown="target acc %")
    # dbench check: absolute, in accuracy units (0.03 = 3 points). The runs are deterministic on one machine;
    # the margin absorbs other CPUs' float rounding.
    criterion = Criterion(key="best_test_acc", name="best test accuracy", tolerance_key="accuracy",
                          tolerance=0.03, higher_is_better=True)
    curves = (Measure("train_loss", "training loss"), Measure("test_error", "test error (%)", scale=100))
    runs_columns = (Measure("best_test_error", "best test error %", scale=100),)
    generalization_title = "Best test error (%)"
    generalization_extras = (Measure("final_test_error", "final test error %", scale=100),)
    verdict_title = "What each method buys and costs, per model, data set and K"

    def best_epoch(self, done):
        return max(done, key=lambda r: r["test_acc"])

    def summary_line(self, summary):
        return (f"Best test error {100 * summary['best_test_error']:.2f}% (epoch {summary['best_epoch']}); "
                f"final test accuracy {100 * summary['final_test_acc']:.2f}%, final train loss "
                f"{summary['final_train_loss']:.4f}.")

    def best_text(self, summary):
        best = summary.get("best_test_error")
        return "" if best is None else f"best test error {100 * best:.2f}%"

    def verdict_caption(self, reference, target, not_reached, dash):
        return (f"best test error %: the best epoch's test error, mean ± sample standard deviation over seeds. "
                f"Δ error vs {reference} (pp): the method's mean minus {reference}'s in the same comparison, in "
                f"percentage points (negative: more accurate). target acc %: {target}. time to target (s): "
                "training seconds (evaluation left out) up to the end of the first epoch whose test accuracy "
                "reaches the target, mean over the seeds that reached it (k of n seeds where not all did); "
                f"{not_reached}: no seed did. ")

    def generalization_caption(self, csv):
        return "Each run's best epoch, as in the FR paper's Table 2."


CLASSIFICATION = TASKS.register(KIND)(Classification())
