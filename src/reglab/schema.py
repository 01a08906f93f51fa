"""The config schema: every key reglab reads, its type and its allowed values, checked before any training starts.

Hydra's struct mode already refuses unknown keys on the command line; `validate` also refuses unknown keys that a
`+key=value` override or a hand-written preset smuggled in, wrong types (`trainer.epochs=ten`) and out-of-range
values (`regularizer.dropout.p=1.5`). Every problem raises one `ConfigError` naming the key, the value and what is
allowed. Cross-key rules (a CNN on 1-D data, augmentation of 1-D signals) live at the end. The `regularizer` group is
not written here: each technique declares its keys and its own cross-key rules in its file (regularizers/base.py).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from reglab.errors import ConfigError
from reglab.specs import (
    boolean,
    choice,
    either,
    float_pair,
    int_list,
    integer,
    number,
    optional,
    string_list,
    text,
)

ACTIVATION = choice("relu", "gelu", "tanh")
DATA_COMMON = {
    "name": choice("mnist1d", "digits", "mnist", "fashion_mnist", "cifar10"),
    "root": text(),
    "val_fraction": number(0, 1, lo_open=True, hi_open=True),
    "split_seed": integer(0),
    "n_train": optional(integer(1)),
    "label_noise": number(0, 1),
    "augment": boolean(),
}

SCHEMA: dict[str, Mapping] = {
    "dataset": {
        **DATA_COMMON,
        "test_fraction": number(0, 1, lo_open=True, hi_open=True),
        "download": boolean(),
    },
    "model": {
        "name": choice("mlp", "cnn1d", "cnn", "resmlp", "resnet"),
        "hidden": int_list(1),
        "activation": ACTIVATION,
        "channels": int_list(1),
        "kernel_size": either(integer(1), int_list(1)),
        "width": integer(1),
        "blocks": integer(1),
    },
    "optimizer": {
        "name": choice("sgd", "adam", "adamw"),
        "lr": number(0, lo_open=True),
        "betas": float_pair(),
        "eps": number(0, lo_open=True),
        "momentum": number(0, 1, hi_open=True),
        "nesterov": boolean(),
    },
    "trainer": {
        "epochs": integer(1),
        "batch_size": integer(1),
        "eval_batch_size": integer(1),
        "seed": integer(0),
        "device": choice("auto", "cpu", "cuda"),
        "threads": either(choice("auto"), integer(1)),
        "lr_schedule": choice("constant", "cosine"),
        "flush_denormal": boolean(),
        "fused_optimizer": boolean(),
        "compile": boolean(),
        "deterministic": boolean(),
        "precision": choice("fp32", "bf16"),
        "progress": choice("auto", "bar", "epochs", "none"),
        "checkpoint_every": integer(0),
        "resume": either(boolean(), text()),
        "on_error": choice("auto", "raise", "record"),
        "loader": choice("tensors", "dataloader"),
        "num_workers": integer(0),
        "save_weights": boolean(),
        "plots": boolean(),
    },
    "logger": {
        "name": choice("wandb", "none"),
        "wandb": {
            "project": text(),
            "entity": optional(text()),
            "mode": choice("auto", "online", "offline", "disabled"),
            "init_timeout": number(0, lo_open=True),
            "tags": string_list(),
            "log_plots": boolean(),
        },
    },
}

INSTANTIABLE = ("reglab.", "torch.")  # a config must never name arbitrary code to run
STACKED_LAUNCHER = "hydra_plugins.reglab_stacked_launcher.StackedLauncher"  # checks its jobs itself


def validate(cfg: Mapping) -> None:
    """Raise ConfigError for the first key of `cfg` (a plain dict of the run's config) that breaks the schema."""
    schema = full_schema()
    unknown = [key for key in cfg if key not in schema]
    if unknown:
        raise ConfigError(
            unknown[0], cfg[unknown[0]], f"no such key; the config's groups are {', '.join(schema)}"
        )
    for group, spec in schema.items():
        if group not in cfg:
            raise ConfigError(group, None, "a config group; it is missing from the config")
        _check_node(cfg[group], spec, group)
    _check_required(cfg, schema)
    _check_cross_keys(cfg)
    techniques = technique_classes()
    for name, settings in cfg["regularizer"].items():
        techniques[name].check(settings, cfg)


def full_schema() -> dict[str, Mapping]:
    """SCHEMA with the `regularizer` group: each technique's keys, as its own file declares them."""
    return {**SCHEMA, "regularizer": {name: cls.keys for name, cls in technique_classes().items()}}


def technique_classes():
    from reglab.regularizers import technique_classes  # torch loads with the techniques' math

    return technique_classes()


# Keys every config must carry; the rest depend on the option (e.g. only CNNs have `channels`).
REQUIRED = {
    "dataset": (*DATA_COMMON, "augment"),
    "model": ("name", "hidden", "activation"),
    "optimizer": ("name", "lr"),
    "trainer": tuple(SCHEMA["trainer"]),
    "logger": ("name",),
}
REQUIRED_BY_OPTION = {
    ("model", "cnn1d"): ("channels", "kernel_size"),
    ("model", "cnn"): ("channels", "kernel_size"),
    ("model", "resnet"): ("channels", "kernel_size"),
    ("model", "resmlp"): ("width", "blocks"),
    ("optimizer", "sgd"): ("momentum", "nesterov"),
    ("optimizer", "adam"): ("betas", "eps"),
    ("optimizer", "adamw"): ("betas", "eps"),
    ("dataset", "digits"): ("test_fraction",),
    **{("dataset", name): ("download",) for name in ("mnist", "fashion_mnist", "cifar10")},
}


def _check_required(cfg: Mapping, schema: Mapping) -> None:
    """A key a preset or a `+group.key=...` override left out would otherwise fail deep inside training."""
    nodes = [(group, cfg[group], keys) for group, keys in REQUIRED.items()]
    nodes += [
        (f"{g}", cfg[g], keys) for (g, option), keys in REQUIRED_BY_OPTION.items() if cfg[g]["name"] == option
    ]
    nodes += [
        (f"regularizer.{name}", node, tuple(schema["regularizer"][name]))
        for name, node in cfg["regularizer"].items()
    ]
    if cfg["logger"]["name"] == "wandb":
        nodes.append(("logger.wandb", cfg["logger"].get("wandb") or {}, tuple(SCHEMA["logger"]["wandb"])))
    for path, node, keys in nodes:
        missing = [key for key in keys if key not in node]
        if missing:
            raise ConfigError(f"{path}.{missing[0]}", None, f"a value: {path} must set {', '.join(missing)}")


def _check_node(node, spec: Mapping, path: str) -> None:
    if not isinstance(node, Mapping):
        raise ConfigError(path, node, "a config node with keys " + ", ".join(spec))
    for key, value in node.items():
        full = f"{path}.{key}"
        if key == "_target_" and not str(value).startswith(INSTANTIABLE):
            raise ConfigError(
                full, value, "reglab has no instantiable keys; only reglab.* and torch.* classes ever are"
            )
        if key not in spec:
            raise ConfigError(full, value, f"no such key; known keys of {path}: {', '.join(spec)}")
        rule = spec[key]
        if isinstance(rule, Mapping):
            _check_node(value, rule, full)
        elif not rule.check(value):
            raise ConfigError(full, value, rule.allowed)


def _check_cross_keys(cfg: Mapping) -> None:
    _check_conv_layers(cfg["model"])
    opt = cfg["optimizer"]
    if opt["name"] == "sgd" and opt["nesterov"] and opt["momentum"] <= 0:
        raise ConfigError(
            "optimizer.nesterov", True, "false when optimizer.momentum=0 (Nesterov needs momentum)"
        )
    if cfg["dataset"].get("augment") and cfg["dataset"]["name"] == "mnist1d":
        raise ConfigError("dataset.augment", True, "false for mnist1d (shifts and flips are for 2-D images)")
    if cfg["trainer"]["device"] == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                "trainer.device", "cuda", "auto or cpu: no CUDA device is visible on this machine"
            )


def _check_conv_layers(model: Mapping) -> None:
    """The conv networks' layer lists, checked here so that a sweep refuses them before any job trains."""
    if model["name"] not in ("cnn1d", "cnn", "resnet"):
        return
    channels, kernel = model["channels"], model["kernel_size"]
    if not channels:
        raise ConfigError("model.channels", channels, "at least one conv layer's channels, e.g. [25, 25, 25]")
    if model["name"] == "resnet" and (not isinstance(kernel, int) or kernel % 2 == 0):
        raise ConfigError(
            "model.kernel_size", kernel, "one odd size for model=resnet (a block keeps the size it is given)"
        )
    if isinstance(kernel, list) and len(kernel) != len(channels):
        raise ConfigError("model.kernel_size", kernel, f"one size, or one per layer ({len(channels)} layers)")


class ValidateSweep(Callback):
    """Hydra callback: before a sweep starts, say how many jobs it will run and over which values, then compose
    and validate every job's config, so that one bad value stops the sweep at once (one line, exit status 2)
    instead of failing job 7 after six jobs trained.

    It expands the grid exactly as Hydra's basic sweeper does: the `hydra.sweeper.params` that options and presets
    carry, then the command line. The basic sweeper runs under every launcher (basic, joblib, submitit, SLURM), and
    this callback runs before the launcher starts, so every launcher prints the grid first. Other sweepers (Optuna
    draws its values as it goes) get their trial count and search space printed and are not validated here, and
    neither are errors that only the data can reveal (`dataset.n_train` larger than the data set): those fail
    their own job.
    """

    def on_multirun_start(self, config, **kwargs) -> None:
        if "BasicSweeper" not in str(config.hydra.sweeper.get("_target_", "")):
            print("\n".join(describe_search(config)), flush=True)
            return
        jobs = grid_jobs(config)
        print("\n".join(describe_grid(jobs)), flush=True)
        if launcher_checks_jobs(config):
            return  # it composes every job before it sets any up, and checks each then: no need to compose twice
        for overrides in jobs:
            stop_on_bad_job(composed_job(overrides), overrides)


def launcher_checks_jobs(config) -> bool:
    """Whether the launcher checks every job of the sweep with `stop_on_bad_job` before it starts any: the stacked
    launcher does when the basic sweeper hands it the whole grid at once (no `max_batch_size`)."""
    sweeper = config.hydra.sweeper
    return (
        str(config.hydra.launcher.get("_target_", "")) == STACKED_LAUNCHER
        and "BasicSweeper" in str(sweeper.get("_target_", ""))
        and sweeper.get("max_batch_size") is None
    )


def stop_on_bad_job(cfg, overrides: list[str], sweep_dir: Path | None = None) -> None:
    """One sweep job's config (a DictConfig without Hydra's node, or plain containers) checked before any job
    starts: a bad value stops the sweep with one line and exit status 2, and `sweep_dir` is removed when it holds
    nothing but the multirun.yaml Hydra wrote into it."""
    try:
        validate(resolved(cfg) if isinstance(cfg, DictConfig) else cfg)
    except ConfigError as err:
        print(f"reglab: error: {err} (sweep job: {' '.join(overrides)}); no job was started", file=sys.stderr)
        if sweep_dir is not None and [p.name for p in sweep_dir.iterdir()] == ["multirun.yaml"]:
            (sweep_dir / "multirun.yaml").unlink()
            sweep_dir.rmdir()
        raise SystemExit(2) from None


def resolved(cfg) -> dict:
    """A DictConfig as plain containers; a broken interpolation becomes a ConfigError like any other bad value."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "config"
        raise ConfigError(key, getattr(err, "value", None), str(err).splitlines()[0]) from None


def swept_values(jobs: list[list[str]]) -> dict[str, list[str]]:
    """Each key that takes more than one value across the jobs, with its values in launch order."""
    values: dict[str, list[str]] = {}
    for job in jobs:
        for override in job:
            key, _, value = override.partition("=")
            seen = values.setdefault(key, [])
            if value not in seen:
                seen.append(value)
    return {key: seen for key, seen in values.items() if len(seen) > 1}


def describe_grid(jobs: list[list[str]]) -> list[str]:
    """'[reglab] sweep: 240 jobs = 5 x 4 x 4 x 3 over' and one line per swept key with its values: a grid that
    multiplies out of the options' own grids is seen before it runs."""
    grid = swept_values(jobs)
    count = f"{len(jobs)} job{'s' if len(jobs) != 1 else ''}"
    if not grid:
        return [f"[reglab] sweep: {count}, no key takes more than one value"]
    product = " x ".join(str(len(values)) for values in grid.values())
    head = f"[reglab] sweep: {count}" + (f" = {product}" if len(grid) > 1 else "") + " over"
    return [head, *(f"[reglab]   {key}: {', '.join(values)} ({len(values)})" for key, values in grid.items())]


def describe_search(config) -> list[str]:
    """A sweeper that draws its values (Optuna): how many trials, what it optimizes, and the search space (the
    sweeper's params, then the command line's sweep overrides)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    sweeper = config.hydra.sweeper
    name = str(sweeper.get("_target_", "")).rsplit(".", 1)[-1] or "sweeper"
    space = {str(key): str(value) for key, value in (sweeper.get("params") or {}).items()}
    parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    space.update(
        {o.get_key_element(): o.input_line.partition("=")[2] for o in parsed if o.is_sweep_override()}
    )
    trials = sweeper.get("n_trials")
    goal = f", {sweeper.direction} the validation loss" if sweeper.get("direction") else ""
    head = f"[reglab] {name}: {trials if trials is not None else 'an open number of'} trials{goal}, over"
    return [head, *(f"[reglab]   {key}: {value}" for key, value in space.items())]


def grid_jobs(config) -> list[list[str]]:
    """Every job's overrides, as Hydra's BasicSweeper will launch them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = [f"{key}={value}" for key, value in (config.hydra.sweeper.get("params") or {}).items()]
    parsed = OverridesParser.create().parse_overrides([*params, *config.hydra.overrides.task])
    return [job for batch in BasicSweeper.split_arguments(parsed, max_batch_size=None) for job in batch]


def composed_job(overrides: list[str]) -> dict:
    """One job's config as plain containers (Hydra's own `hydra.*` overrides do not change it)."""
    from hydra import compose
    from omegaconf import OmegaConf

    job = [o for o in overrides if not o.lstrip("+~").startswith("hydra")]
    return OmegaConf.to_container(compose(config_name="config", overrides=job), resolve=True)
