"""The ``autoload`` command: ``autoload tune MODULE:ATTR [options]`` and ``autoload show FILE``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn
from torch.nn import functional

import autoload
from autoload import cache
from autoload.distributed import Terminated
from autoload.errors import AutoloadError, ConfigError, ResultFileError, SpecError, summary
from autoload.importer import import_from_string
from autoload.memory import parse_size
from autoload.report import LiveProgress, render_cache, render_report
from autoload.result import TuneResult
from autoload.sources import lightning_step, resolve
from autoload.tuner import tune

__all__ = ["main"]

LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "cross_entropy": functional.cross_entropy,
    "mse": functional.mse_loss,
    "l1": functional.l1_loss,
    "smooth_l1": functional.smooth_l1_loss,
    "huber": functional.huber_loss,
    "nll": functional.nll_loss,
    "bce_with_logits": functional.binary_cross_entropy_with_logits,
}
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
}


class _ArgumentError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, not argparse's usage dump
        raise _ArgumentError(f"{message} (see `{self.prog} --help`)")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int or a comma list, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected an int or a comma list, got {text!r}")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


_CACHE_DIR_HELP = (f"the folder results are remembered in (default ${cache.ENV}, else "
                   "~/.cache/autoload); a shared one lets a cluster's nodes tune once")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="autoload", description="Find the fastest DataLoader settings.")
    parser.add_argument("-V", "--version", action="version",
                        version=f"%(prog)s {autoload.__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    # --debug after the subcommand too; SUPPRESS keeps a subcommand from resetting it to False.
    debug = _Parser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    t = sub.add_parser("tune", help="tune a data set (and optionally a model)", parents=[debug])
    t.add_argument("dataset", metavar="MODULE:ATTR",
                   help="a Dataset, a DataLoader, a LightningDataModule, or a zero-argument "
                        "callable returning one")
    t.add_argument("--model", metavar="MODULE:ATTR",
                   help="an nn.Module (a LightningModule brings its training_step and "
                        "optimizer), or a factory of one")
    t.add_argument("--loss", metavar="NAME|MODULE:ATTR",
                   help=f"loss for (x, y) batches: {', '.join(LOSSES)} or MODULE:ATTR")
    t.add_argument("--step", metavar="MODULE:ATTR",
                   help="a training step, step(model, batch) -> loss, instead of --loss")
    t.add_argument("--optimizer", default="sgd", metavar="NAME|MODULE:ATTR",
                   help="sgd (default), adam, adamw, or MODULE:ATTR called with the parameters")
    t.add_argument("--lr", type=_positive_float, default=0.01, help="learning rate (0.01)")
    t.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    t.add_argument("--trials", type=_positive_int, help="cap on trials, baselines included")
    t.add_argument("--timeout", type=_positive_float, default=60.0,
                   help="the whole run's budget in seconds (60)")
    t.add_argument("--memory-cap", type=_size, help="host memory cap, e.g. 8GiB")
    t.add_argument("--gpu-memory-cap", type=_size, help="GPU memory cap, e.g. 20GiB")
    t.add_argument("--batch-size", type=_int_list, help="fix it (64) or restrict it (32,64,128)")
    t.add_argument("--min-batch-size", type=_positive_int, default=8,
                   help="smallest batch size searched (8)")
    t.add_argument("--max-batch-size", type=_positive_int, default=1024,
                   help="largest batch size searched (1024)")
    t.add_argument("--drop-last", action="store_true",
                   help="allow batch sizes that do not divide the epoch")
    t.add_argument("--workers", type=_int_list, help="fix num_workers (4) or restrict it (0,2,4)")
    t.add_argument("--max-workers", type=int,
                   help="largest num_workers searched; by default the usable CPUs, or up to 4x "
                        "them when fetching took more than 10%% of the time at num_workers=0")
    t.add_argument("--amp", choices=["auto", "off", "bfloat16", "float16"], default="auto",
                   help="autocast: auto (default) searches bf16 on CPUs with native bf16 and "
                        "fp16/bf16 on CUDA; off, or one dtype to measure it")
    t.add_argument("--sharded", action="store_true",
                   help="the IterableDataset shards itself across workers")
    t.add_argument("--keep-batch-size", action="store_true",
                   help="tune everything else at your DataLoader's batch size")
    t.add_argument("--no-cache", action="store_true",
                   help="measure again even when a result for the same setting is cached")
    t.add_argument("--cache-dir", metavar="DIR", help=_CACHE_DIR_HELP)
    t.add_argument("--json", metavar="PATH", help="write the result as JSON")
    t.add_argument("--storage", metavar="URL", help="Optuna storage, e.g. sqlite:///autoload.db")
    t.add_argument("--study-name", help="study name in --storage (resumed if it exists)")
    t.add_argument("--seed", type=int, default=0,
                   help="seed of the search's sampler (0); the same seed proposes the same "
                        "trials, though measured rates still vary")
    t.add_argument("--quiet", action="store_true", help="no live progress")
    s = sub.add_parser("show", help="print the report of a saved result JSON, or of a cached "
                                    "result by the id `autoload cache list` prints",
                       parents=[debug])
    s.add_argument("path", metavar="PATH|ID",
                   help="a result written by `autoload tune --json PATH`, or a cached result's "
                        "id (or a unique prefix of it)")
    s.add_argument("--cache-dir", metavar="DIR", help=_CACHE_DIR_HELP)
    c = sub.add_parser("cache", help="list or clear the remembered results", parents=[debug])
    c.add_argument("action", choices=["list", "clear"],
                   help="list: show the cached results; clear: delete them all")
    c.add_argument("--cache-dir", metavar="DIR", help=_CACHE_DIR_HELP)
    return parser


def _load_dataset(spec: str) -> Any:
    return resolve(import_from_string(spec), name=spec)


def _load_model(spec: str, device: str) -> nn.Module:
    obj = import_from_string(spec)
    if not isinstance(obj, nn.Module):
        if not callable(obj):
            raise SpecError(f"--model {spec!r} is of type {type(obj).__name__}, neither an "
                            "nn.Module nor a callable returning one.")
        obj = obj()
        if not isinstance(obj, nn.Module):
            raise SpecError(f"--model {spec}() returned a {type(obj).__name__}, not an nn.Module.")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} asks for CUDA, but torch sees no GPU here; use "
                          "--device cpu.")
    return obj.to(device)


def _load_loss(name: str) -> Callable[..., torch.Tensor]:
    if ":" in name:
        loss = import_from_string(name)
        if not callable(loss):
            raise SpecError(f"--loss {name!r} is not callable.")
        return loss  # type: ignore[no-any-return]
    if name not in LOSSES:
        raise ConfigError(f"--loss {name!r} is unknown; use one of {', '.join(LOSSES)} or "
                          "MODULE:ATTR.")
    return LOSSES[name]


def _make_optimizer(name: str, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    if ":" in name:
        factory = import_from_string(name)
        opt: Any = factory(model.parameters())
        if not isinstance(opt, torch.optim.Optimizer):
            raise SpecError(f"--optimizer {name}(params) returned a {type(opt).__name__}, "
                            "not a torch.optim.Optimizer.")
        checked: torch.optim.Optimizer = opt
        return checked
    if name.lower() not in OPTIMIZERS:
        raise ConfigError(f"--optimizer {name!r} is unknown; use one of {', '.join(OPTIMIZERS)} "
                          "or MODULE:ATTR.")
    return OPTIMIZERS[name.lower()](model.parameters(), lr=lr)


def _single(values: list[int] | None) -> int | list[int] | None:
    return values[0] if values is not None and len(values) == 1 else values


def _load_step(spec: str) -> Callable[..., Any]:
    step = import_from_string(spec)
    if not callable(step):
        raise SpecError(f"--step {spec!r} is not callable; it should be step(model, batch) -> "
                        "loss.")
    return step  # type: ignore[no-any-return]


def _tune(args: argparse.Namespace, console: Console) -> int:
    if (args.loss is not None or args.step is not None) and args.model is None:
        raise ConfigError("--loss and --step need --model; without a model autoload measures "
                          "loading only.")
    if args.loss is not None and args.step is not None:
        raise ConfigError("--loss and --step both say how to train; give one of them.")
    if args.json:
        folder = Path(args.json).resolve().parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise ConfigError(f"--json {args.json}: folder {str(folder)!r} does not exist or is "
                              "not writable; create it or pick another path.")
    dataset = _load_dataset(args.dataset)
    model = loss = optimizer = step = None
    if args.model is not None:
        loss = None if args.loss is None else _load_loss(args.loss)
        step = None if args.step is None else _load_step(args.step)
        model = _load_model(args.model, args.device)
        if lightning_step(model) is None or loss is not None or step is not None:
            optimizer = _make_optimizer(args.optimizer, model, args.lr)
    kwargs: dict[str, Any] = dict(
        model=model, loss_fn=loss, optimizer=optimizer, step=step, device=args.device,
        n_trials=args.trials, timeout=args.timeout, memory_cap=args.memory_cap,
        gpu_memory_cap=args.gpu_memory_cap, batch_size=_single(args.batch_size),
        min_batch_size=args.min_batch_size, max_batch_size=args.max_batch_size,
        drop_last=args.drop_last, num_workers=_single(args.workers), max_workers=args.max_workers,
        amp=args.amp, sharded=args.sharded, storage=args.storage, study_name=args.study_name,
        seed=args.seed, keep_batch_size=args.keep_batch_size, cache=not args.no_cache,
        cache_dir=args.cache_dir,
    )
    if args.quiet:
        result = tune(dataset, **kwargs)
    else:
        with LiveProgress(Console(stderr=True)) as progress:
            result = tune(dataset, progress=progress, **kwargs)
    console.print(render_report(result))
    if args.json:
        result.save(args.json)
        console.print(f"result written to {args.json}")
    return 0


def _cache(action: str, folder: str | None, console: Console) -> int:
    where = cache.cache_dir(folder)
    if action == "clear":
        count = cache.clear(folder)
        console.print(f"removed {count} cached result{'s' if count != 1 else ''} from {where}")
        return 0
    found = cache.entries(folder)
    if not found:
        console.print(f"no cached results in {where}")
        return 0
    console.print(render_cache(found, where))
    return 0


def _show(target: str, folder: str | None) -> TuneResult:
    """A saved result: the file ``target``, else the cached one whose id starts with it."""
    path = Path(target)
    if not (path.exists() or os.sep in target or target.endswith(".json")):
        path = cache.find(target, folder)
    try:
        online = json.loads(path.read_text()).get("kind") == "online"
    except (OSError, ValueError, AttributeError):
        online = False  # TuneResult.load says what is wrong with it
    if online:
        raise ResultFileError(
            f"{str(path)!r} is a setting autoload.DataLoader(num_workers='auto') settled on "
            "while training, not a tune() result, and has no report; `autoload cache list` "
            "shows it."
        )
    return TuneResult.load(path)


def main(argv: Sequence[str] | None = None, *, console: Console | None = None) -> int:
    """Run the CLI; returns the exit code (0 success, 1 tuning failed, 2 bad input, 130 Ctrl-C,
    143 SIGTERM)."""
    console = console or Console()
    err = Console(stderr=True, highlight=False) if console.file is sys.stdout else console
    debug = False
    try:
        try:
            args = _parser().parse_args(argv)
        except SystemExit as exc:  # --help and --version print, then exit 0
            return exc.code if isinstance(exc.code, int) else 0
        debug = args.debug
        if args.command == "show":
            console.print(render_report(_show(args.path, args.cache_dir)))
            return 0
        if args.command == "cache":
            return _cache(args.action, args.cache_dir, console)
        return _tune(args, console)
    except _ArgumentError as exc:
        err.print(f"autoload: error: {exc}", markup=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt as exc:
        # SIGTERM (a scheduler's preemption) exits as a process it ends would: 128 + 15.
        terminated = isinstance(exc, Terminated)
        err.print(f"autoload: {'terminated' if terminated else 'interrupted'}; the model and "
                  "optimizer were restored.", markup=False, soft_wrap=True)
        return 143 if terminated else 130
    except AutoloadError as exc:
        if debug:
            raise
        err.print(f"autoload: error: {exc}", markup=False, soft_wrap=True)
        return 1 if exc.__class__.__name__ == "TuningFailedError" else 2
    except Exception as exc:  # the user's own code raised: show it as theirs, in one line
        if debug:
            raise
        where = exc.__traceback__
        while where is not None and where.tb_next is not None:
            where = where.tb_next
        at = "" if where is None else (
            f" at {where.tb_frame.f_code.co_filename}:{where.tb_lineno}")
        err.print(f"autoload: error: your code raised {summary(exc)}{at} "
                  "(rerun with --debug for the traceback)", markup=False, soft_wrap=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
