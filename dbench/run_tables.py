"""summary.md: a run's per-module time, memory and σ as tables a reader can use without the code."""
from __future__ import annotations

from dbench import task as tasks
from dbench.summary import method_label

SUMMARY_MD = "summary.md"

MIB = 2**20

LEGEND = """\
What the columns mean:
- **compute**: seconds the module spent computing: forward, backward or replay, update, sending.
- **wait input** / **wait grad**: seconds it was blocked until an activation came from below /
  until its teaching signal came (the gradient from above, or DFA's output error).
  In the local engine only one module runs at a time, so these are the other modules' compute;
  the distributed engine shows the real overlap.
- **data**: its process's loader producing the next batch (the first module's reads and augments it;
  the others read its labels).
- **idle**: its step was done (or not handed out yet): bookkeeping, the other modules in the local engine.
- **σ probe**: the probe's extra plain-BP pass (not part of the method's cost).
  compute + comm + waits + data + idle + probe = the training wall-clock of the run.
- **peak memory (accounted)**: bytes of the tensors the module holds, at its largest moment,
  by category (parameters and buffers, gradients, optimizer state, the method's own state,
  queued messages, activations saved for backward). Measured CUDA peaks, where present, also hold
  the data set and temporaries.
- **σ**: <∇f, g_k> / ||∇f||² per module, ∇f the true gradient on a fixed probe set at the same weights,
  g_k the gradient the method applied (ALGORITHMS.md). 1 is plain BP; > 0 is a descent direction.
  **cos**: the cosine of the same two vectors. Means over the run's probes. The probe set's own
  sampling noise inflates ||∇f||², so plain σ reads low for every method, BP included;
  **σ corrected** divides by <∇_A, ∇_B> (two independent halves of the probe set) instead,
  pooled over the probes (Σ numerators / Σ denominators): centred on 1 for BP.
"""


def _num(value, fmt: str = "{:.3g}") -> str:
    return "–" if value is None else fmt.format(value)


def _mib(value) -> str:
    return "–" if value is None else f"{value / MIB:.2f}"


def module_name(record: dict) -> str:
    """``k``, or ``k (replica d)`` for a run with replicas (one record per device)."""
    return str(record["module"]) + (f" (replica {record['replica']})" if "replica" in record else "")


def modules_table(summary: dict) -> str:
    """Per-module time, peak memory and σ over the whole run (Markdown)."""
    modules = summary.get("modules")
    if not modules:
        return "(no per-module measurements yet)"
    cuda = any("cuda_peak_active_bytes" in m for m in modules)
    head = ["module", "device", "compute s", "comm s", "wait input s", "wait grad s", "data s", "idle s",
            "σ probe s",
            "peak MiB (accounted)"] + (["peak MiB (CUDA active)", "reserved MiB (CUDA)"] if cuda else []) + ["mean σ", "σ corrected", "mean cos"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in modules:
        cells = [module_name(m), m["device"], *(f"{m.get(f'{s}_s', 0.0):.2f}" for s in ("compute", "comm", "wait_input", "wait_grad", "data", "idle", "probe")),
                 _mib(m["accounted_peak_bytes"])]
        if cuda:
            cells += [_mib(m.get("cuda_peak_active_bytes")), _mib(m.get("cuda_peak_reserved_bytes"))]
        cells += [_num(m.get("mean_sigma")), _corrected(m), _num(m.get("mean_cosine"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _corrected(record: dict) -> str:
    """The pooled corrected σ with its 95% interval, and a warning when the probe set is too small to tell."""
    text = _num(record.get("sigma_corrected"))
    interval = record.get("sigma_corrected_ci")
    if interval:
        text += f" [{interval[0]:.2f}, {interval[1]:.2f}]"
    if record.get("sigma_too_noisy") and record.get("sigma_corrected") is not None:
        text += " (too noisy: more --sigma-batches)"
    return text


def memory_table(summary: dict) -> str:
    """Each module's accounted memory at its peak, by category, in MiB (Markdown)."""
    modules = summary.get("modules") or []
    categories: list[str] = []
    for m in modules:
        for c in m["accounted_bytes"]:
            if c not in categories:
                categories.append(c)
    head = ["module", *categories, "total"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in modules:
        cells = [module_name(m), *(_mib(m["accounted_bytes"].get(c, 0)) for c in categories), _mib(m["accounted_peak_bytes"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(config: dict, summary: dict) -> str:
    run = config["run"]
    title = f"# {method_label(config)} · {run['model']} · {run['dataset']} · K={run['gpus']} · seed {run['seed']}"
    out = [title, ""]
    status = f"Status: **{summary['status']}**, {summary['epochs_done']} of {summary['epochs']} epochs."
    if summary.get("error"):
        status += f" Error: {summary['error']}"
    out.append(status)
    # config.json's task; a summary that names another (written by hand, or older) is read as its own
    kind = tasks.of_summary(summary) if "task" in summary else tasks.of(config.get("task"))
    if summary.get("epochs_done"):
        out += [
            "",
            kind.summary_line(summary),
            f"Training {summary['train_seconds']:.1f} s, {kind.rate_text(summary, tasks.spec_of(config.get('task')))} "
            f"(the first {config.get('warmup_steps', 0)} steps of each epoch left out as warm-up, and the σ probes). "
            f"Network σ, mean over probes: {_num(summary.get('mean_sigma'))} "
            f"(corrected for the probe's noise: {_corrected(summary)}).",
            "",
            "Partition (blocks per module): "
            + ", ".join(f"{k}: [{a}, {b})" for k, (a, b) in enumerate(config["partition"]))
            + f"; devices: {', '.join(config['devices'])}.",
        ]
    if summary.get("modules"):
        out += ["", "## Per module, whole run", "", modules_table(summary), "",
                "## Memory at each module's peak, by category (MiB, accounted)", "", memory_table(summary), "", LEGEND]
    return "\n".join(out) + "\n"
