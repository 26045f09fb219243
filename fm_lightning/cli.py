"""The command line behind ``python train.py``: fit, test the best checkpoint, say where things are.

    python train.py                                   # configs/default.yaml: SimpleCNN on MNIST
    python train.py --config configs/debug.yaml       # a seconds-long smoke run
    python train.py --config configs/wandb.yaml       # W&B, offline when no API key is set
    python train.py --trainer.max_epochs=3 --data.batch_size=128
    python train.py --trainer.callbacks+=lightning.pytorch.callbacks.EarlyStopping \
        --trainer.callbacks.monitor=val/loss
    python train.py --help

It is a plain LightningCLI (``run=False``), so every Trainer, model and data argument is a flag,
``--config`` takes YAML files (later ones override earlier ones) and callbacks or loggers are
added by class path.

Every run gets a directory of its own, even when several start at once in one working directory
(a job array, two terminals): each CSV or TensorBoard logger without an explicit ``version``
claims ``<save_dir>/<name>/version_<N>`` by creating it, which only one process can do, and
``config.yaml`` goes there too (beside the checkpoints for other loggers, such as W&B), as asked:
``version: null``, so running it again is a new run. An int count such as
``--trainer.limit_val_batches=1`` stays an int (one batch, not 1.0: all of them). A model or
data argument out of range is one ``error: --flag: expected ...`` line and exit status 2, as a
malformed or misspelt one is (with the closest real flag), and hardware the machine lacks.

A first run says what it does and nothing it need not: loggers after the first share its run
directory, the cosine schedule's ``T_max: null`` follows ``trainer.max_epochs``, every logger
gets the whole config, output that is not a terminal gets one line per epoch instead of a
progress bar, and known deprecations inside the pinned libraries are filtered narrowly.
"""

from __future__ import annotations

import difflib
import inspect
import netrc
import os
import re
import sys
import traceback
import warnings
from collections.abc import Sequence
from contextlib import suppress
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from fm_lightning.callbacks import FeatureMapCallback
from fm_lightning.data import MNISTDataModule
from fm_lightning.models import ImageClassifier
from fm_lightning.progress import EpochLinesProgressBar

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


class CLITrainer(pl.Trainer):
    """Lightning's Trainer, with the arguments where an int and a float differ read int first.

    ``limit_val_batches=1`` is one batch and ``1.0`` every batch. Python's typing caches
    ``Union[int, float]`` and ``Union[float, int]`` as one object, so Trainer's annotations can
    read float first, and then the CLI parses ``--trainer.limit_val_batches=1`` as 1.0 (and saves
    ``config.yaml`` so). ``int | float`` keeps its order; everything else is Trainer's own.

    Args:
        limit_train_batches: training batches per epoch and device: an int counts them, a
            float is a fraction (default 1.0, all of them).
        limit_val_batches: validation batches per device: an int counts them, a float is a
            fraction (default 1.0, all of them).
        limit_test_batches: test batches per device: an int counts them, a float is a fraction
            (default 1.0, all of them).
        limit_predict_batches: prediction batches per device: an int counts them, a float is a
            fraction (default 1.0, all of them).
        overfit_batches: train and validate on this many training batches (int) or this
            fraction of them (float); 0 is off.
        val_check_interval: validate every this many training batches (int) or this fraction
            of an epoch (float); also a time (str, timedelta or dict), as Trainer documents.
    """

    def __init__(
        self,
        *,
        limit_train_batches: int | float | None = None,
        limit_val_batches: int | float | None = None,
        limit_test_batches: int | float | None = None,
        limit_predict_batches: int | float | None = None,
        overfit_batches: int | float = 0.0,
        val_check_interval: int | float | str | timedelta | dict[str, int] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(
            limit_train_batches=limit_train_batches,
            limit_val_batches=limit_val_batches,
            limit_test_batches=limit_test_batches,
            limit_predict_batches=limit_predict_batches,
            overfit_batches=overfit_batches,
            val_check_interval=val_check_interval,
            **kwargs,
        )


class CosineAnnealingLR(torch.optim.lr_scheduler.CosineAnnealingLR):
    """torch's CosineAnnealingLR, whose ``T_max`` may be left out (``null``): train.py then sets
    it to ``trainer.max_epochs``, so that the cosine ends with the run however long it is.

    (torch's own class requires ``T_max``, so the CLI would refuse the config before it could
    fill it in.)
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, T_max: int | None = None, eta_min: float = 0.0
    ) -> None:
        if T_max is None:
            raise ValueError("expected T_max, the number of epochs to anneal over, got None")
        super().__init__(optimizer, T_max=T_max, eta_min=eta_min)


class FMLightningCLI(LightningCLI):
    """train.py's LightningCLI: ImageClassifier + MNISTDataModule, parsed but not run.

    Turns W&B offline without a key, gives every run a directory of its own (with its
    ``config.yaml``) and builds a :class:`CLITrainer`. ``args`` default to ``sys.argv``; the
    ``default_config`` file is read before any ``--config``.
    """

    def __init__(
        self, args: Sequence[str] | None = None, default_config: Path | None = DEFAULT_CONFIG
    ) -> None:
        super().__init__(
            ImageClassifier,
            MNISTDataModule,
            seed_everything_default=42,
            parser_kwargs={"default_config_files": [str(default_config)]} if default_config else {},
            save_config_callback=RunConfigCallback,
            parser_class=CLIParser,
            save_config_kwargs={"save_to_log_dir": False},  # RunConfigCallback.save_config does it
            auto_configure_optimizers=False,  # the optimizer is a --model.optimizer argument
            trainer_class=CLITrainer,
            run=False,
            args=args,
        )

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--ckpt_path",
            type=str | None,
            default=None,
            help="resume fitting from this checkpoint (a last.ckpt under logs/)",
        )

    def before_instantiate_classes(self) -> None:
        loggers = self.config.get("trainer.logger")
        loggers = loggers if isinstance(loggers, list) else [loggers]
        uses_wandb = any("WandbLogger" in str(getattr(lg, "class_path", "")) for lg in loggers)
        if uses_wandb and "WANDB_MODE" not in os.environ and not _wandb_key_available():
            # No account on this machine: write the run locally, upload later with `wandb sync`.
            os.environ["WANDB_MODE"] = "offline"
        # config.yaml records what was asked, not the version claimed below nor the T_max
        # derived here: run again, it starts a new run (of its own length) instead of writing
        # into this one's directory.
        self._asked = self.config.clone()
        try:
            _fit_schedule_to_run(self.config)
        except ValueError as err:
            self.parser.exit(2, f"error: {err}\n")
        _share_run_directory(loggers)
        # Lightning picks max(version)+1 only when a logger first writes, so runs started
        # together all pick the same one. Claim it now instead, on rank zero (DDP's other ranks
        # take rank zero's directories, which Lightning broadcasts).
        self._claimed: dict[Path, int] = {}  # loggers sharing a root share a version, as usual
        if rank_zero_only.rank == 0:
            for lg in loggers:
                if str(getattr(lg, "class_path", "")).rsplit(".", 1)[-1] not in _VERSIONED:
                    continue
                args = lg.init_args
                if args.get("version") is None:
                    root = Path(args.save_dir, args.get("name") or "")
                    if root not in self._claimed:
                        self._claimed[root] = claim_version_dir(root)
                    args.version = self._claimed[root]
            _put_wandb_in_run_directory(loggers)

    def instantiate_classes(self) -> None:
        """Builds model, data and Trainer; an argument they reject is a one-line error."""
        try:
            super().instantiate_classes()
        except BaseException as err:
            for root, version in self._claimed.items():  # the run never started: give them back
                with suppress(OSError):
                    (root / f"version_{version}").rmdir()
            if isinstance(err, MisconfigurationException):  # the Trainer's: hardware, mostly
                self.parser.exit(2, f"error: {_trainer_error(err, self.config)}\n")
            if isinstance(err, ValueError):
                self.parser.exit(2, f"error: {_flag_error(err)}\n")
            raise

    def instantiate_trainer(self, **kwargs) -> pl.Trainer:
        """Checks the optimizer's arguments (now that the model exists), then builds the Trainer,
        with one line per epoch instead of a progress bar when the output is not a terminal."""
        _check_optimizer(self.model)
        trainer_args = self.config_init.get("trainer") or {}
        callbacks = trainer_args.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, list) else [callbacks]
        if (
            trainer_args.get("enable_progress_bar") is not False
            and not any(isinstance(cb, ProgressBar) for cb in callbacks)
            and not _is_terminal(sys.stdout)
        ):
            # tqdm redraws after every batch; in a file (nohup, SLURM) every redraw stays.
            callbacks.append(EpochLinesProgressBar())
        trainer = super().instantiate_trainer(**{"callbacks": callbacks, **kwargs})
        for callback in trainer.callbacks:
            if isinstance(callback, RunConfigCallback):
                callback.config = self._asked
                callback.run_config = self.config  # what ran: the derived T_max, the versions
        return trainer


class CLIParser(LightningArgumentParser):
    """LightningCLI's parser, whose errors are one ``error: ...`` line and exit status 2, not the
    usage of every flag; a misspelt flag gets the closest real one."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:  # a nested parser: the outer one reports
            super().error(message, ex)
        text = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
        if text.startswith("unrecognized arguments:"):
            known = [o for o in self._option_string_actions if o.startswith("--")]
            for arg in text.split()[2:]:
                flag = arg.split("=", 1)[0]
                close = difflib.get_close_matches(flag, known, n=1, cutoff=0.8)
                if close:
                    text += f"; did you mean {close[0]}?"
        self.exit(2, f"error: {text} (python train.py --help lists every flag)\n")


_VERSIONED = ("CSVLogger", "TensorBoardLogger")  # loggers that number their runs version_<N>


def _kind(logger) -> str:
    """``TensorBoardLogger`` for a logger's ``class_path`` in the config, "" for true/false."""
    return str(getattr(logger, "class_path", "")).rsplit(".", 1)[-1]


def _fit_schedule_to_run(config) -> None:
    """A learning-rate schedule whose ``T_max`` is left out (``null``) anneals over the whole run:
    ``T_max = trainer.max_epochs``, since ImageClassifier steps its scheduler once per epoch.

    Raises:
        ValueError: T_max left out but the run has no number of epochs (``max_epochs`` unset,
            or -1 for no limit).
    """
    args = getattr(config.get("model.lr_scheduler"), "init_args", None)
    if args is None or "T_max" not in args or args.T_max is not None:
        return
    epochs = config.get("trainer.max_epochs")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(
            "--model.lr_scheduler.init_args.T_max: expected a number of epochs, since "
            f"--trainer.max_epochs is not a number of epochs for it to follow, got {epochs}"
        )
    args.T_max = epochs


def _share_run_directory(loggers: list) -> None:
    """TensorBoard loggers after a first CSV or TensorBoard logger write into its run directory
    (``<save_dir>/<name>/version_<N>/tensorboard``), unless given a ``version`` of their own.

    Without this ``--trainer.logger+=...TensorBoardLogger`` splits a run in two:
    ``logs/mnist/version_0`` and ``logs/lightning_logs/version_0``. Sharing ``save_dir`` and
    ``name`` makes the version claim below give both the same N.
    """
    specs = [lg for lg in loggers if getattr(lg, "init_args", None) is not None]
    if len(specs) < 2 or _kind(specs[0]) not in _VERSIONED:
        return  # a W&B run's directory is named by its run id, which exists once it starts
    lead = specs[0].init_args
    for logger in specs[1:]:
        args = logger.init_args
        if _kind(logger) == "TensorBoardLogger" and args.get("version") is None:
            args.save_dir, args.name = lead.save_dir, lead.get("name")
            args.sub_dir = args.get("sub_dir") or "tensorboard"


def _put_wandb_in_run_directory(loggers: list) -> None:
    """A W&B logger after a first CSV or TensorBoard logger keeps its files in that logger's run
    directory (``.../version_<N>/wandb/``), not in a ``wandb/`` that every run shares. Call it
    once the first logger's version is claimed."""
    specs = [lg for lg in loggers if getattr(lg, "init_args", None) is not None]
    if len(specs) < 2 or _kind(specs[0]) not in _VERSIONED:
        return
    lead = specs[0].init_args
    version = lead.get("version")
    version = version if isinstance(version, str) else f"version_{version}"
    run_dir = os.path.join(lead.save_dir, lead.get("name") or "", version)
    for logger in specs[1:]:
        args = logger.init_args
        if _kind(logger) == "WandbLogger" and args.get("version") is None and not args.get("id"):
            args.save_dir = run_dir


def claim_version_dir(root: str | os.PathLike) -> int:
    """Creates ``root/version_<N>`` for the lowest N above every existing one, and returns N.

    ``mkdir`` fails if the directory exists, so of several processes claiming at once each gets
    its own N.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    taken = [int(m[1]) for p in root.iterdir() if (m := re.fullmatch(r"version_(\d+)", p.name))]
    version = max(taken, default=-1) + 1
    while True:
        try:
            (root / f"version_{version}").mkdir()
            return version
        except FileExistsError:  # another run took it first
            version += 1


class RunConfigCallback(SaveConfigCallback):
    """Saves ``config.yaml`` in the run's own directory.

    That is ``trainer.log_dir`` for CSV and TensorBoard loggers, and ``<save_dir>/<name>/<version>``
    (beside the checkpoints) for the others, such as W&B, whose ``log_dir`` is the ``save_dir``
    that all runs share. Runs on rank zero only, so it needs no broadcast.
    """

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        logger = trainer.loggers[0] if trainer.loggers else None
        if logger is None:
            run_dir = trainer.default_root_dir
        elif isinstance(logger, (CSVLogger, TensorBoardLogger)):
            run_dir = logger.log_dir
        else:  # where ModelCheckpoint puts the run's checkpoints/
            version = logger.version
            version = version if isinstance(version, str) else f"version_{version}"
            run_dir = os.path.join(
                logger.save_dir or trainer.default_root_dir, str(logger.name), version
            )
        os.makedirs(run_dir, exist_ok=True)
        path = os.path.join(run_dir, self.config_filename)
        self.parser.save(self.config, path, skip_none=False, overwrite=True, multifile=False)
        # The whole config (optimizer, lr, network, epochs...) in every logger's hyperparameters
        # (W&B's run config), not only the model's and data module's own arguments.
        config = getattr(self, "run_config", None) or self.config
        for logger in trainer.loggers:
            try:
                logger.log_hyperparams(config.as_dict())
            except Exception as err:  # a logger's failure never stops the run
                rank_zero_warn(f"{type(logger).__name__} did not take the run's config: {err}")


def _check_optimizer(model: pl.LightningModule) -> None:
    """Builds the model's optimizer and scheduler on a stand-in parameter, so that torch checks
    their arguments before anything runs; a learning rate must also be > 0 (torch allows 0).

    Raises:
        ValueError: ``--model.optimizer: Invalid learning rate: -1.0`` and the like.
    """
    if not callable(getattr(model, "optimizer", None)):
        return
    lr = getattr(model.optimizer, "keywords", {}).get("lr")  # the CLI's optimizer is a partial
    if isinstance(lr, float | int) and lr <= 0:
        raise ValueError(f"--model.optimizer.lr: expected lr > 0, got {lr}")
    try:
        optimizer = model.optimizer([torch.nn.Parameter(torch.zeros(1))])
    except ValueError as err:  # torch's words name the argument and value
        raise ValueError(f"--model.optimizer: {err}") from None
    try:
        if getattr(model, "lr_scheduler", None) is not None:
            model.lr_scheduler(optimizer)
    except ValueError as err:
        raise ValueError(f"--model.lr_scheduler: {err}") from None


def _flag_error(err: ValueError) -> str:
    """``--data.batch_size: expected batch_size > 0, got 0``: the message after the flag of the
    argument it names, found from the model or data module whose ``__init__`` raised it."""
    groups = {"model": pl.LightningModule, "data": pl.LightningDataModule}
    for frame, _ in reversed(list(traceback.walk_tb(err.__traceback__))):  # innermost first
        owner = frame.f_locals.get("self")
        group = next((g for g, cls in groups.items() if isinstance(owner, cls)), None)
        if group is not None:
            params = inspect.signature(type(owner)).parameters  # its __init__'s, without self
            name = next((n for n in params if re.search(rf"\b{n}\b", str(err))), None)
            return f"--{group}{'.' + name if name else ''}: {err}"
    return str(err)  # _check_optimizer's, or the Trainer's: the message names the argument


def _is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def _quiet_known_warnings() -> None:
    """Silences deprecations that the pinned libraries raise inside each other, by message and
    module, so that a default run prints only what its user can act on."""
    # torch 2.14 deprecates LeafSpec, which lightning 2.6's batch flattening still builds.
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )


def _trainer_error(err: MisconfigurationException, config) -> str:
    """``--trainer.accelerator=gpu: No supported gpu backend found! ...``: Lightning's words on
    one line, after the flag that asked for hardware this machine lacks."""
    text = " ".join(str(err).split())
    accelerator = config.get("trainer.accelerator")
    if isinstance(accelerator, str) and accelerator not in ("auto", "cpu"):
        text = (
            f"--trainer.accelerator={accelerator}: {text} Pass --trainer.accelerator=auto (a GPU "
            "when there is one, else the CPU) or drop the config that asks for it."
        )
    return text


def _wandb_key_available() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def main(args: Sequence[str] | None = None, default_config: Path | None = DEFAULT_CONFIG) -> dict:
    """Fit, then test the best checkpoint; returns the test metrics. ``args`` default to argv."""
    _quiet_known_warnings()
    cli = FMLightningCLI(args, default_config)
    trainer = cli.trainer
    try:
        trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.ckpt_path)
        # The best checkpoint when one was saved; the weights in memory otherwise (debug runs).
        # Its path, not "best": with a second ModelCheckpoint (last.ckpt) Lightning warns that
        # "best" is the first callback's best, which is the one meant here.
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        metrics = trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=best or None)[0]
        if trainer.is_global_zero:
            _print_summary(trainer, metrics)
    finally:
        # Lightning leaves the DDP process group up. A gloo group still alive while the
        # interpreter shuts down can abort the process ("terminate called without an active
        # exception"), hiding how the run ended.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return metrics


def _print_summary(trainer, metrics: dict) -> None:
    lines = [f"test accuracy: {metrics.get('test/acc', float('nan')):.4f}"]
    if trainer.checkpoint_callback and trainer.checkpoint_callback.dirpath:
        best = trainer.checkpoint_callback.best_model_path or "(none saved)"
        lines.append(f"checkpoints:   {trainer.checkpoint_callback.dirpath}  (best: {best})")
    for cb in trainer.callbacks:
        if isinstance(cb, FeatureMapCallback) and cb.local_dir:
            lines.append(f"feature maps:  {cb.local_dir}")
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            run_dir = os.path.dirname(logger.experiment.dir)  # .../wandb/<run>/files -> .../<run>
            lines.append(f"W&B run:       {run_dir}  (feature maps under feature_maps/*)")
            if os.environ.get("WANDB_MODE") == "offline":
                lines.append(f"upload it:     wandb sync {run_dir}")
        elif getattr(logger, "log_dir", None):  # MLflow, Comet... have none
            lines.append(f"metrics:       {logger.log_dir}")
    print("\n" + "\n".join(lines))
