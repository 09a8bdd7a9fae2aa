"""The command line: thin wrappers that parse flags and call dbench's functions."""
from __future__ import annotations

import dataclasses
import errno
import json
import sys
import typing
from pathlib import Path

import click

from dbench.config import RunConfig
from dbench.errors import DbenchError, RunInterrupted
from dbench import interrupts

def _int_list(ctx, param, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers (e.g. 150,225)") from None


def _str_list(ctx, param, value: str | None) -> list[str] | None:
    return None if value is None else [v.strip() for v in value.split(",")]


def _options(ctx, param, values: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for item in values:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE (e.g. --opt hidden=64)")
        out[key.strip().replace("-", "_")] = text.strip()
    return out


# How the command line writes a RunConfig value that is not a plain number, string or flag (config.setting).
_TEXTS = {"key=value": dict(multiple=True, callback=_options), "int list": dict(callback=_int_list),
          "str list": dict(callback=_str_list)}
_TYPES = {int: int, float: float, str: str}


def _setting_option(f: dataclasses.Field):
    """``dbench run``'s option for RunConfig field ``f``, from what the field declares (config.setting)."""
    meta = f.metadata
    flag = meta["flag"] or "--" + f.name.replace("_", "-")
    kind = typing.get_type_hints(RunConfig)[f.name]
    plain = next((k for k in typing.get_args(kind) or (kind,) if k is not type(None)), kind)
    help_text = meta["help"] + (f" [default: {meta['shown_default']}]" if meta["shown_default"] else "")
    kw: dict = dict(help=help_text, metavar=meta["metavar"])
    if meta["text"]:
        kw.update(_TEXTS[meta["text"]], default=None)
    elif plain is bool:
        kw.update(is_flag=True)
    else:
        kw.update(type=click.Choice(meta["choices"]) if meta["choices"] else _TYPES[plain], default=f.default,
                  show_default=f.default is not None and not meta["shown_default"])
    return click.option(flag, f.name, **kw)


def _setting_options(command):
    """Every RunConfig field as an option of ``command``, in the dataclass's order."""
    for f in reversed(dataclasses.fields(RunConfig)):
        command = _setting_option(f)(command)
    return command



@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dbench", message="dbench %(version)s")
def main() -> None:
    """dbench: compare decoupled backpropagation methods in time, memory and accuracy."""


@main.command()
@_setting_options
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Run directory [default: results/<method>-<model>-<dataset>-k<K>-s<seed>-<time>].")
@click.option("--resume", type=click.Path(path_type=Path), default=None, metavar="RUN_DIR",
              help="Continue an unfinished run from its last finished epoch (settings come from the run).")
@click.option("--quiet", is_flag=True, help="No progress bar: one plain line per epoch.")
@click.pass_context
def run(ctx: click.Context, resume: Path | None, quiet: bool, **flags) -> None:
    """Train one model with one method on K devices and record the run."""
    if resume is not None:
        # Every option but these two changes what a run computes: --resume takes them from the run instead.
        given = [p.opts[0] for p in ctx.command.params if p.name not in ("resume", "quiet")
                 and ctx.get_parameter_source(p.name) == click.core.ParameterSource.COMMANDLINE]
        if given:
            raise DbenchError(f"--resume takes every setting from {resume / 'config.json'}; drop {given[0]}")
        _start_fork_server(_recorded_engine(resume))
        from dbench import run as runner  # heavy imports (torch) only once the settings are known to be good

        path = runner.resume(resume, quiet=quiet)
    else:
        out = flags.pop("out")
        flags["milestones"] = flags["milestones"] or []  # given none: the schedule's own (RunConfig's default)
        cfg = RunConfig(**flags)
        cfg.validate()  # a bad number fails here, before torch is loaded (the plan validates it again)
        from dbench import catalog

        catalog.check_names(cfg.method, cfg.model, cfg.dataset)  # and an unknown name
        _start_fork_server(cfg.engine)
        from dbench import run as runner

        path = runner.start(cfg, out, quiet=quiet)
    from dbench import placement

    if placement.speaks():
        click.echo(f"run saved in {path}")


def _start_fork_server(engine: str) -> None:
    """A run given ``--engine distributed`` forks its module processes from a fork server, which imports
    torch and dbench (``dbench.engine.launch.context``). Started here, before this process imports them, the
    two imports overlap on two cores instead of running one after the other: about 3 s less per run on the
    2-core machine. Not under torchrun, where this process is one of the workers and starts none, nor for
    ``auto``, which is decided after the imports (the launcher starts the server then, as it needs it)."""
    from dbench import placement  # torch-free until a device is read

    if engine == "distributed" and not placement.under_torchrun():
        from dbench.engine import forkserver

        forkserver.start("dbench.run")  # the module of run.train_rank, what the workers run


def _recorded_engine(run_dir: Path) -> str | None:
    """The engine an unfinished run recorded, read without torch; None where the file cannot tell (resuming
    then says what is wrong with it)."""
    try:
        return json.loads((run_dir / "config.json").read_text()).get("engine")
    except (OSError, ValueError, AttributeError):
        return None


@main.command("list")
def list_() -> None:
    """Methods (with options), models (parameters, blocks) and data sets."""
    from dbench import catalog  # stored descriptions: no torch to import (see dbench/catalog.py)

    described = catalog.current()
    click.echo("methods (family; ideal speedup over model-parallel BP at K=2 and 4, from the cost model):")
    for name, m in sorted(described["methods"].items(), key=lambda item: (item[1]["table_order"], item[0])):
        ideal = ", ".join("–" if v is None else f"{v:.2f}×" for v in (m["ideal_speedup"]["2"], m["ideal_speedup"]["4"]))
        click.echo(f"  {name:<10} {m['summary']}")
        click.echo(f"  {'':<10}   ({m['family'] or 'no family given'}; ideal {ideal})")
        for option in m["options"]:
            click.echo(f"  {'':<10}   --opt {option['name']}={option['default']}  {option['help']}")
    click.echo("models (reads: images, or text as byte sequences up to the context length):")
    click.echo(f"  {'name':<10} {'params':>12} {'blocks':>7}  reads")
    for name, info in sorted(described["models"].items()):
        reads = f"text, context {info['context']}" if info["context"] else info["inputs"]
        click.echo(f"  {name:<10} {info['params']:>12,} {info['blocks']:>7}  {reads}")
    click.echo("data sets:")
    for name, spec in sorted(described["datasets"].items()):
        classes = f"{spec['num_classes']:>4} classes" if spec["kind"] == "image" else f"{spec['num_classes']:>4} tokens "
        click.echo(f"  {name:<14} {spec['kind']:<5} {classes}  {spec['description']}")


def _names(ctx, param, values: tuple[str, ...]) -> list[str]:
    """A repeatable option whose values may also be comma-separated: --method bp,NAME --method NAME."""
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def _ints(ctx, param, values: tuple[str, ...]) -> list[int]:
    names = _names(ctx, param, values)
    try:
        return [int(v) for v in names]
    except ValueError:
        raise click.BadParameter(f"{','.join(values)!r} is not a list of integers (e.g. --k 2,4)") from None


def _target_options() -> list:
    """One option per task's target (dbench.task.Target: --target-acc, --target-loss, a plug-in task's),
    checked by the task's own rule."""
    from dbench import task as tasks

    def option(rule):
        def check(ctx, param, value: float | None) -> float | None:
            problem = rule.problem(value) if value is not None else None
            if problem:
                raise click.BadParameter(problem)
            return value

        return click.option(rule.option, rule.keyword, type=float, default=None, callback=check,
                            metavar=rule.metavar, help=rule.help)

    return [option(task.target) for task in tasks.every()]


def _engines(ctx, param, values: tuple[str, ...]) -> list[str]:
    names = _names(ctx, param, values)
    bad = [n for n in names if n not in ("local", "distributed")]
    if bad:
        raise click.BadParameter(f"unknown engine {bad[0]!r}; runs are recorded as local or distributed")
    return names


def _run_paths(ctx, param, values: tuple[Path, ...]) -> tuple[Path, ...]:
    from dbench.run_paths import check_given  # before the commands' heavy imports: a typo fails at once

    check_given(values)
    return values


def _selection_options(command):
    """The options `report` and `compare` share: which runs, and the verdict's target accuracy."""
    options = (
        click.argument("paths", nargs=-1, type=click.Path(path_type=Path), callback=_run_paths),
        click.option("--method", "methods", multiple=True, callback=_names, metavar="NAMES",
                     help="Only these methods (repeatable or comma-separated), e.g. --method bp,NAME "
                          "(see `dbench list`)."),
        click.option("--model", "models", multiple=True, callback=_names, metavar="NAMES", help="Only these models."),
        click.option("--dataset", "datasets", multiple=True, callback=_names, metavar="NAMES",
                     help="Only these data sets."),
        click.option("--k", "ks", multiple=True, callback=_ints, metavar="K",
                     help="Only these numbers of modules, e.g. --k 2,4."),
        click.option("--engine", "engines", multiple=True, callback=_engines, metavar="NAMES",
                     help="Only runs of these engines: local, distributed."),
        click.option("--epochs", "epochs", multiple=True, callback=_ints, metavar="N",
                     help="Only runs planned for these numbers of epochs, e.g. --epochs 300."),
        click.option("--include-unfinished", is_flag=True,
                     help="Also use runs that are not complete (running, interrupted, failed, diverged) "
                          "and finished at least one epoch."),
        *_target_options(),
    )
    for option in reversed(options):  # the first listed is the outermost decorator, as when stacked
        command = option(command)
    return command


def _warn(message: str) -> None:
    click.echo(f"warning: {message}", err=True)


def _projection_options(command):
    """--link and --device-memory: a PROJECTED section of the runs recorded with --trace (dbench.projection)."""
    command = click.option("--device-memory", type=float, default=None, metavar="GIB",
                           help="With --link: memory per device, to say which layouts fit.")(command)
    return click.option("--link", "link", default=None, metavar="PROFILE",
                        help="Also show the PROJECTED seconds of runs recorded with --trace on this link (nvlink4, "
                             "pcie4, pcie5, ib-ndr, 100gbe, 25gbe, or a `dbench probe-link` file), marked as "
                             "projected.")(command)


def _check_memory(device_memory: float | None) -> None:
    if device_memory is not None and not device_memory > 0:
        raise DbenchError(f"bad --device-memory {device_memory}: must be a number of GiB > 0")


@main.command()
@_selection_options
@_projection_options
@click.option("--out", type=click.Path(path_type=Path), default=Path("reports"), show_default=True,
              help="Folder to write the report into (created if needed; files of the same name are replaced).")
def report(paths: tuple[Path, ...], out: Path, methods, models, datasets, ks, engines, epochs,
           include_unfinished: bool, link: str | None, device_memory: float | None, **targets: float | None) -> None:
    """Figures and tables comparing the runs under PATHS [default: results/]: the verdict (which method buys
    what), convergence, memory, generalization, σ and speed, with index.md and a self-contained index.html."""
    _check_memory(device_memory)
    from dbench.report import build_report  # heavy imports (pandas, matplotlib) only when asked

    written = build_report(
        list(paths) or [Path("results")], out, methods=methods, models=models, datasets=datasets, ks=ks,
        engines=engines, epochs=epochs, include_unfinished=include_unfinished, targets=targets,
        warn=_warn, link=link, device_memory=device_memory,
    )
    click.echo(f"report of {len(written.runs)} run(s) written to {written.out}: "
               f"open {written.index_html} (or {written.index_md.name})")


@main.command()
@_selection_options
@_projection_options
def compare(paths: tuple[Path, ...], methods, models, datasets, ks, engines, epochs, include_unfinished: bool,
            link: str | None, device_memory: float | None, **targets: float | None) -> None:
    """Which method buys what, per model, data set and K, for the runs under PATHS [default: results/]:
    speedups beside their ideals, peak memory, best test error and time to accuracy (a language model's: best
    test bits per byte and time to a target loss) (the report's verdict)."""
    from dbench.report import build, verdict  # heavy imports (pandas, matplotlib) only when asked

    chosen = build.select_runs(list(paths) or [Path("results")], methods=methods, models=models,
                               datasets=datasets, ks=ks, engines=engines, epochs=epochs,
                               include_unfinished=include_unfinished, warn=_warn)
    numbers = verdict.table(chosen.data, targets)
    click.echo(verdict.text(numbers, targets), nl=False)
    if link is not None:  # after the measured verdict, in a block of its own that says PROJECTED
        from dbench import projection

        profile = projection.link(link)
        traced = [run.path for run in chosen.data.runs if (run.path / "trace.json").is_file()]
        click.echo("\n" + (projection.text([projection.load(p, profile) for p in traced], profile, device_memory)
                           if traced else "PROJECTED: no run here holds a trace (record one with --trace)."))


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--link", "link_name", default="nvlink4", show_default=True, metavar="PROFILE",
              help="Link between devices: nvlink4, pcie4, pcie5, ib-ndr, 100gbe, 25gbe, or a file from "
                   "`dbench probe-link`.")
@click.option("--device-memory", type=float, default=None, metavar="GIB",
              help="Memory per device: say which layouts fit (each device's peak against it).")
@click.option("--devices", type=click.IntRange(min=1), default=None, metavar="N",
              help="Lay each run out on N devices: N/K replicas of its traced K modules, each replica keeping the "
                   "traced per-device batch. [default: the traced layout]")
@click.option("--replicas", type=click.IntRange(min=1), default=None, metavar="D",
              help="Lay each run out on D replicas of its traced K modules (with --devices: N must be K × D).")
def project(paths: tuple[Path, ...], link_name: str, device_memory: float | None, devices: int | None,
            replicas: int | None) -> None:
    """PROJECTED seconds per epoch of runs recorded with --trace on the local engine, on their N devices (or
    laid out anew: --devices, --replicas): each trace replayed on a virtual clock per device over a link profile
    (docs/ALGORITHMS.md, "Projection")."""
    from dbench import projection

    _check_memory(device_memory)
    profile = projection.link(link_name)
    runs = [projection.load(p, profile, devices=devices, replicas=replicas) for p in paths]
    click.echo(projection.text(runs, profile, device_memory))


@main.command("probe-link")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="cpu: two processes over gloo; cuda: two GPUs over NCCL (needs two).")
@click.option("--repeats", type=click.IntRange(min=1), default=20, show_default=True,
              help="Timed round trips per message size, after two warm-up ones (medians are kept).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Where to store the profile [default: results/links/probe-<backend>-<device>.json].")
def probe_link(device: str, repeats: int, out: Path | None) -> None:
    """Measure latency, bandwidth and posting cost between two processes here, through dbench's transport,
    and store them as a link profile for `dbench project --link FILE`."""
    import torch

    from dbench import probe

    if device == "cuda" and torch.cuda.device_count() < 2:
        raise DbenchError(f"--device cuda needs two GPUs (NCCL between them); {torch.cuda.device_count()} visible")
    profile = probe.probe(device, repeats=repeats)
    out = out or Path("results") / "links" / f"{profile['name']}.json"
    probe.save(profile, out)
    from dbench.projection import link

    click.echo(f"{link(str(out)).describe()}\nsaved in {out}")


def _suite_options(command):
    """NAME, --file and --results: how `suite` and `check` find a suite and its runs."""
    command = click.option("--results", type=click.Path(path_type=Path), default=Path("results"), show_default=True,
                           help="The suite's runs are RESULTS/NAME/<method>-<model>-<dataset>-k<K>-s<seed>/.")(command)
    command = click.option("--file", "file", type=click.Path(path_type=Path), default=Path("bench.toml"),
                           show_default=True, help="The suites file.")(command)
    return click.argument("name")(command)


@main.command()
@_suite_options
@click.option("--data-dir", default=None, help="Data folder for new runs (overrides the suite's data_dir).")
@click.option("--device", default=None, metavar="DEVICE",
              help="Put every module of each new run on DEVICE, e.g. cuda:0: K modules sharing one GPU time-share "
                   "it, so the report shows their costs there, not parallel speedups.")
@click.option("--dry-run", is_flag=True, help="List the runs and what is on disk for each; train nothing.")
@click.option("--progress", is_flag=True, help="Show each run's progress bar (default: one line per epoch).")
def suite(name: str, file: Path, results: Path, data_dir: str | None, device: str | None, dry_run: bool,
          progress: bool) -> None:
    """Run suite NAME of bench.toml: skip complete runs, resume unfinished ones, record diverged ones and go on."""
    from dbench import suites

    planned = suites.load(file, name)
    if dry_run:
        states = suites.check(planned, results, data_dir, device)  # what a real run refuses, the dry run refuses too
        click.echo(f"suite {name}: {planned.description}" if planned.description else f"suite {name}")
        for i, run in enumerate(planned.runs, 1):
            click.echo(f"[{i}/{len(planned.runs)}] {run.name}: {states[run.name]}  ({run.path(results)})")
        return
    final = suites.run_suite(planned, results, quiet=not progress, data_dir=data_dir, device=device, echo=click.echo)
    counts = {state: list(final.values()).count(state) for state in sorted(set(final.values()))}
    click.echo(f"suite {name}: " + ", ".join(f"{n} {state}" for state, n in counts.items()))


@main.command()
@_suite_options
@click.option("--golden", type=click.Path(path_type=Path), default=Path("results/golden"), show_default=True,
              help="Golden figures: GOLDEN/NAME/<hardware>.json.")
@click.option("--update", is_flag=True, help="Write the current runs' figures as the golden ones (after a deliberate change).")
def check(name: str, file: Path, results: Path, golden: Path, update: bool) -> None:
    """Compare suite NAME's runs with the golden figures: exit 1 if accuracy fell (a language model's test loss in
    bits per byte rose) or memory grew past tolerance."""
    from dbench import check as checker
    from dbench import suites

    planned = suites.load(file, name)
    if update:
        click.echo(f"golden figures written to {checker.update(planned, results, golden)}")
        return
    findings, path = checker.check(planned, results, golden)
    failed = [f for f in findings if not f.ok]
    click.echo(checker.table(findings))
    if failed:
        click.echo(f"check {name}: {len(failed)} of {len(findings)} figures regressed or failed against {path}", err=True)
        sys.exit(1)
    click.echo(f"check {name}: all {len(findings)} figures within tolerance of {path}")


# The OS's refusals of a path's shape (not of its content): only a path the user gave can cause them.
PATH_REFUSALS = (errno.ENAMETOOLONG, errno.ELOOP)


def entry() -> None:
    """Console entry point: user errors are one line on stderr and exit code 2."""
    # `kill` (SIGTERM) stops a run the way Ctrl-C does: the run directory is
    # marked interrupted and stays resumable, instead of saying "running" forever.
    interrupts.install()
    run_command(main)


def run_command(command: click.Command) -> None:
    """Run a click command as dbench's own: a user error is one line on stderr and exit code 2, no traceback.

    The benchmark scripts run through this too, so a bad option there fails as `dbench` does.
    """
    try:
        command(standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as e:
        click.echo(e.ctx.get_help() if e.ctx else str(e))
        sys.exit(0)
    except click.ClickException as e:
        # dbench's own (DbenchError: exit 2; RunInterrupted: 130) show themselves; click's usage errors
        # (exit 2) and others are given dbench's one-line form.
        if isinstance(e, (DbenchError, RunInterrupted)):
            e.show()
        else:
            click.echo(f"error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("interrupted", err=True)
        sys.exit(130)
    except OSError as e:
        # A path the user gave that the system cannot even look up (a name too long for the file system, a
        # loop of symbolic links): a user error wherever it is first touched. Every other OSError is a fault.
        if e.errno not in PATH_REFUSALS:
            raise
        click.echo(f"error: cannot use the path {e.filename}: {e.strerror}", err=True)
        sys.exit(2)
