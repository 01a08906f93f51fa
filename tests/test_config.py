"""Every option of every config group composes, passes the schema and builds its part."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from reglab.errors import ConfigError
from reglab.loop import Member, Stack, build_optimizer
from reglab.models import Architecture, build_model
from reglab.regularizers import build_regularization, technique_classes
from reglab.schema import validate
from tests.conftest import CONF


def built(cfg: dict, shape: tuple[int, ...]):
    """The regularization and model of one job, as the loop builds them (a stack of one)."""
    regs = build_regularization([cfg["regularizer"]])
    model = build_model(cfg["model"], Architecture(shape, 10, [0], regs.dropout_plans(), regs.model_layers))
    return regs, model


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def composed(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)


SHAPES = {
    "mnist1d": (1, 40),
    "digits": (1, 8, 8),
    "mnist": (1, 28, 28),
    "fashion_mnist": (1, 28, 28),
    "cifar10": (3, 32, 32),
}
MODEL_FOR = {
    "mnist1d": ["mlp", "cnn1d", "resmlp", "resnet"],
    "digits": ["mlp", "cnn", "resmlp", "resnet"],
    "mnist": ["mlp", "cnn", "resmlp", "resnet"],
    "fashion_mnist": ["mlp", "cnn", "resmlp", "resnet"],
    "cifar10": ["mlp", "cnn", "resmlp", "resnet"],
}


def test_groups_have_the_promised_options():
    assert set(options("dataset")) == set(SHAPES)
    assert set(options("model")) == {"mlp", "cnn1d", "cnn", "resmlp", "resnet"}
    assert set(options("optimizer")) == {"sgd", "adam", "adamw"}
    # every technique has its YAML and every YAML its technique (found by name in regularizers/)
    assert set(options("regularizer")) == {"none", *technique_classes()}
    classic = {"l1", "l2", "dropout", "early_stopping", "label_smoothing"}
    beyond = {"noise", "stochastic_depth", "mixup", "cutmix", "swa", "ema", "sam", "spectral_norm"}
    assert classic | beyond <= set(technique_classes())
    assert set(options("logger")) == {"wandb", "none"}


@pytest.mark.parametrize("dataset", options("dataset"))
def test_every_dataset_and_model_pair_builds(dataset):
    for model_name in MODEL_FOR[dataset]:
        cfg = composed(f"dataset={dataset}", f"model={model_name}", "regularizer=dropout")
        validate(cfg)
        _, model = built(cfg, SHAPES[dataset])
        assert model(torch.zeros(1, 2, *SHAPES[dataset])).shape == (1, 2, 10)


@pytest.mark.parametrize("regularizer", options("regularizer"))
@pytest.mark.parametrize("optimizer", options("optimizer"))
def test_every_regularizer_and_optimizer_builds(regularizer, optimizer):
    model = "resmlp" if regularizer == "stochastic_depth" else "mlp"  # it drops residual blocks
    cfg = composed(f"regularizer={regularizer}", f"optimizer={optimizer}", f"model={model}")
    if regularizer == "l2" and optimizer == "adamw":
        cfg["regularizer"]["l2"]["mode"] = (
            "decoupled"  # coupled decay is not what AdamW does: see test_schema
        )
    validate(cfg)
    regs, model = built(cfg, (1, 40))
    regs.setup(model)
    opt = build_optimizer(Stack([Member(cfg, None, None)], cfg["trainer"]), model, regs)
    assert opt.param_groups[0]["lr"] == cfg["optimizer"]["lr"]
    assert regs.names(0) == ([] if regularizer == "none" else [regularizer])


def test_several_regularizers_at_once():
    cfg = composed("regularizer=[l2,dropout,label_smoothing,early_stopping]")
    validate(cfg)
    regs = build_regularization([cfg["regularizer"]])
    assert regs.names(0) == ["l2", "dropout", "early_stopping", "label_smoothing"]


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_preset_composes(experiment):
    validate(composed(f"experiment={experiment}"))


def test_each_regularizer_option_carries_its_grid():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["regularizer=l2"], return_hydra_config=True)
    assert cfg.hydra.sweeper.params["regularizer.l2.weight_decay"] == "0,1e-5,1e-4,1e-3,1e-2"


def test_the_promised_key_names_exist():
    cfg = composed("regularizer=[l1,l2,dropout,label_smoothing,early_stopping]")
    for key in [
        "trainer.epochs",
        "trainer.batch_size",
        "trainer.seed",
        "trainer.device",
        "trainer.threads",
        "optimizer.lr",
        "regularizer.l2.weight_decay",
        "regularizer.l1.strength",
        "regularizer.dropout.p",
        "regularizer.label_smoothing.eps",
        "regularizer.early_stopping.patience",
        "dataset.n_train",
        "dataset.label_noise",
        "regularizer.l2.mode",
        "regularizer.l2.impl",
        "regularizer.dropout.impl",
    ]:
        node = cfg
        for part in key.split("."):
            assert part in node, key
            node = node[part]


BAD_VALUES = [
    ("regularizer=dropout", "regularizer.dropout.p=1.0", "regularizer.dropout.p"),
    ("regularizer=dropout", "regularizer.dropout.p=-0.1", "regularizer.dropout.p"),
    ("regularizer=l2", "regularizer.l2.weight_decay=-0.001", "regularizer.l2.weight_decay"),
    ("regularizer=l1", "regularizer.l1.strength=-1", "regularizer.l1.strength"),
    ("regularizer=label_smoothing", "regularizer.label_smoothing.eps=1.5", "regularizer.label_smoothing.eps"),
    (
        "regularizer=label_smoothing",
        "regularizer.label_smoothing.variant=sharp",
        "regularizer.label_smoothing.variant",
    ),
    (
        "regularizer=early_stopping",
        "regularizer.early_stopping.patience=-1",
        "regularizer.early_stopping.patience",
    ),
    (
        "regularizer=early_stopping",
        "regularizer.early_stopping.min_delta=-0.1",
        "regularizer.early_stopping.min_delta",
    ),
    ("regularizer=l2", "regularizer.l2.mode=sideways", "regularizer.l2.mode"),
    ("regularizer=l2", "regularizer.l2.impl=numpy", "regularizer.l2.impl"),
    ("regularizer=dropout", "regularizer.dropout.max_norm=0", "regularizer.dropout.max_norm"),
    ("regularizer=none", "trainer.batch_size=0", "trainer.batch_size"),
    ("regularizer=none", "trainer.epochs=ten", "trainer.epochs"),
    ("regularizer=none", "trainer.device=tpu", "trainer.device"),
    ("regularizer=none", "dataset.label_noise=2", "dataset.label_noise"),
    ("regularizer=none", "dataset.name=imagenet", "dataset.name"),
    ("regularizer=none", "optimizer.lr=0", "optimizer.lr"),
    ("regularizer=none", "+trainer.bogus=1", "trainer.bogus"),
    ("regularizer=none", "+model._target_=os.system", "model._target_"),
    ("regularizer=none", "+foo=1", "foo"),
]


@pytest.mark.parametrize(("option", "override", "key"), BAD_VALUES)
def test_bad_values_name_the_key_the_value_and_what_is_allowed(option, override, key):
    cfg = composed(option, override)
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert info.value.key == key
    message = str(info.value)
    assert key in message and "not allowed" in message
    assert override.split("=", 1)[1] in message


def test_missing_keys_are_named():
    cfg = composed("+regularizer.l2.weight_decay=0.1")  # an l2 node without the l2 option's other keys
    with pytest.raises(ConfigError, match="regularizer.l2.mode"):
        validate(cfg)
    cfg = composed("model=cnn1d")
    del cfg["model"]["channels"]
    with pytest.raises(ConfigError, match="model.channels"):
        validate(cfg)


def test_a_conv_stack_too_deep_for_the_input_is_refused():
    cfg = composed("dataset=digits", "model=cnn", "model.channels=[8,8,8,8]")
    with pytest.raises(ConfigError, match="model.channels"):
        built(cfg, (1, 8, 8))


def test_a_resnet_needs_an_odd_kernel_and_halves_its_input_down_to_one_at_most():
    with pytest.raises(ConfigError, match="model.kernel_size"):
        built(composed("model=resnet", "model.kernel_size=4"), (1, 40))
    _, model = built(composed("dataset=digits", "model=resnet", "model.channels=[4,8,8,16,32]"), (1, 8, 8))
    assert model(torch.zeros(1, 2, 1, 8, 8)).shape == (1, 2, 10)  # 8x8 -> 4x4 -> 2x2 -> 1x1
    cfg = composed("model=resmlp")
    del cfg["model"]["blocks"]
    with pytest.raises(ConfigError, match="model.blocks"):
        validate(cfg)


def test_contradictory_keys_are_refused():
    cfg = composed("optimizer=sgd", "optimizer.momentum=0", "optimizer.nesterov=true")
    with pytest.raises(ConfigError, match="optimizer.nesterov"):
        validate(cfg)
    cfg = composed(
        "regularizer=l2", "optimizer=sgd", "regularizer.l2.mode=decoupled", "regularizer.l2.impl=torch"
    )
    with pytest.raises(ConfigError, match="regularizer.l2.impl"):
        validate(cfg)
    for impl in ("scratch", "torch"):
        cfg = composed("regularizer=l2", "optimizer=adamw", f"regularizer.l2.impl={impl}")
        with pytest.raises(ConfigError, match="regularizer.l2.mode"):
            validate(cfg)
    cfg = composed(
        "regularizer=label_smoothing",
        "regularizer.label_smoothing.impl=torch",
        "regularizer.label_smoothing.variant=off_target",
    )
    with pytest.raises(ConfigError, match="variant"):
        validate(cfg)
    cfg = composed(
        "regularizer=early_stopping",
        "regularizer.early_stopping.stopping_threshold=0.5",
        "regularizer.early_stopping.divergence_threshold=0.4",  # minimizing val/loss: every score stops
    )
    with pytest.raises(ConfigError, match="divergence_threshold=0.4 is not allowed: .* above stopping_thr"):
        validate(cfg)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["model=resnet", "model.channels=[]"], "model.channels"),
        (["model=resnet", "model.kernel_size=4"], "model.kernel_size"),
        (["model=resnet", "model.kernel_size=[3,3]"], "model.kernel_size"),
        (["model=cnn1d", "model.kernel_size=[5,3]"], "model.kernel_size"),
        (["model=resnet", "model.channels=[8]", "regularizer=stochastic_depth"], "model.channels"),
    ],
)
def test_conv_layer_lists_are_checked_before_training(overrides, key):
    with pytest.raises(ConfigError, match=f"{key}=.* is not allowed"):
        validate(composed(*overrides))
