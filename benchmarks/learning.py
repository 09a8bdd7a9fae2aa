"""Does each method learn? Every method at K=2 and K=4 on the synthetic data (images or text), recorded.

Runs the grid through dbench's own runner (local engine), then prints a
Markdown table with the machine and software it ran on. Runs already complete
under --root are reused, so the script can be stopped and started again.

    python benchmarks/learning.py --model resnet8 --epochs 4 --ks 2,4
    python benchmarks/learning.py --model gpt-nano --dataset synthetic-text --context 64 --batch-size 32 \
        --lr 0.03 --weight-decay 0 --epochs 1 --ks 2,4

A language model's table shows test loss in bits per byte and next-token accuracy instead of accuracy.
"""
from __future__ import annotations

import math
import platform
from datetime import date
from pathlib import Path

import click
import torch

from dbench import run as runner
from dbench.cli import run_command
from dbench.config import RunConfig
from dbench.method import parse_options
from dbench.registry import DATASETS, METHODS


def method_order() -> list[str]:
    """Every installed method, in the order of tables (each method's ``table_order``, then its name)."""
    return [name for name, _ in sorted(METHODS.items(), key=lambda item: (item[1].table_order, item[0]))]


def variant(text: str) -> tuple[str, dict[str, str]]:
    """``fdg[shrink=0.5]`` as ("fdg", {"shrink": "0.5"}); a bare name has no options."""
    name, bracket, rest = text.partition("[")
    if not bracket:
        return text, {}
    if not rest.endswith("]"):
        raise click.BadParameter(f"bad method {text!r}: options go in brackets, e.g. fdg[shrink=0.5]",
                                 param_hint="--methods")
    options = {}
    for item in rest[:-1].split(";"):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise click.BadParameter(f"bad option {item!r} in {text!r}: expected key=value, e.g. fdg[shrink=0.5]",
                                     param_hint="--methods")
        options[key] = value
    return name, options


@click.command()
@click.option("--model", default="resnet8", show_default=True)
@click.option("--epochs", type=int, default=4, show_default=True)
@click.option("--ks", default="2,4", show_default=True, help="Values of K, comma separated.")
@click.option("--methods", default=lambda: ",".join(method_order()), show_default="every method",
              help="Comma separated; a variant names its options in brackets, ';' between them: fdg[shrink=0.5].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--dataset", default="synthetic", show_default=True, help="Data set (see `dbench list`).")
@click.option("--context", type=int, default=None, help="Text data: bytes per sequence [default: the model's].")
@click.option("--batch-size", type=int, default=RunConfig.batch_size, show_default=True)
@click.option("--lr", type=float, default=RunConfig.lr, show_default=True)
@click.option("--weight-decay", type=float, default=RunConfig.weight_decay, show_default=True)
@click.option("--root", type=click.Path(path_type=Path), default=Path("results/learning"), show_default=True)
def main(model: str, epochs: int, ks: str, methods: str, seed: int, dataset: str, context: int | None,
         batch_size: int, lr: float, weight_decay: float, root: Path) -> None:
    try:
        k_values = [int(v) for v in ks.split(",")]
    except ValueError:
        raise click.BadParameter(f"expected integers separated by commas, e.g. 2,4, got {ks!r}", param_hint="--ks") from None
    DATASETS.get(dataset)  # an unknown name fails here, before the first run starts
    variants = [variant(text) for text in methods.split(",")]
    for name, options in variants:  # every method and option is checked before the first run starts
        parse_options(METHODS.get(name), options)
    rows = []
    for k in k_values:
        for name, options in variants:
            method = name + (f"[{','.join(f'{o}={v}' for o, v in options.items())}]" if options else "")
            cfg = RunConfig(method=name, method_options=options, model=model, dataset=dataset, context=context,
                            gpus=k, epochs=epochs, seed=seed, batch_size=batch_size, lr=lr, weight_decay=weight_decay)
            named = "".join(f"-{o}{v}" for o, v in sorted(options.items()))
            data = "" if dataset == "synthetic" else f"-{dataset}"
            s = runner.completed(cfg, root / f"{cfg.method}{named}-{cfg.model}{data}-k{cfg.gpus}-e{cfg.epochs}-s{cfg.seed}")
            rows.append((method, k, s))
            click.echo(f"{method:>5} K={k}: {_quality(s)}", err=True)
    cpu = platform.processor() or platform.machine()
    click.echo(f"### {model}, {dataset}, {epochs} epochs, seed {seed} ({date.today().isoformat()})\n")
    click.echo(f"Machine: {torch.get_num_threads()} threads on {cpu} ({platform.platform()}), torch {torch.__version__}, "
               f"modules on the CPU; batch {batch_size}, SGD lr {lr:g} momentum 0.9 wd {weight_decay:g}, cosine"
               + (f", context {context}" if context else "") + ".\n")
    # No timing column: these runs share 2 cores with other work, and the
    # local engine runs modules one after another; speed is benchmarks' job.
    language = any(s.get("task") == "language model" for _, _, s in rows)
    if language:
        click.echo("| method | K | best test bits/byte | final test bits/byte | next-token acc % | final train bits/byte |")
        click.echo("| --- | --- | --- | --- | --- | --- |")
    else:
        click.echo("| method | K | best test acc % | final test acc % | final train loss |")
        click.echo("| --- | --- | --- | --- | --- |")
    for method, k, s in rows:
        if language:
            click.echo(f"| {method} | {k} | {s['best_test_bpb']:.3f} | {s['final_test_bpb']:.3f} | "
                       f"{100 * s['best_test_acc']:.2f} | {s['final_train_loss'] / math.log(2):.3f} |")
        else:
            click.echo(
                f"| {method} | {k} | {100 * s['best_test_acc']:.2f} | {100 * s['final_test_acc']:.2f} | "
                f"{s['final_train_loss']:.3f} |"
            )


def _quality(s: dict) -> str:
    if s.get("task") == "language model":
        return f"best test loss {s['best_test_bpb']:.3f} bits per byte"
    return f"best test acc {100 * s['best_test_acc']:.2f}%"


if __name__ == "__main__":
    run_command(main)
