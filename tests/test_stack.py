"""A stack of K jobs trains each job exactly as if it had run alone (CPU, float32): same metrics, same weights."""

from __future__ import annotations

import os

import pytest
import torch

from reglab.loop import Job, Member, thread_count, train_stack
from tests.conftest import read_metrics, read_summary
from tests.test_loop import config

QUICK = ["trainer.epochs=4", "dataset.n_train=300", "trainer.save_weights=true"]

# Jobs that differ in everything a stack lets them differ in. None of them draws random numbers beyond
# initialization, batch order, the (scratch) draws of the forward pass (dropout masks, noise, dropped blocks) and
# mixup/cutmix draws, all from the member's own generators (spectral norm's u, v too). A stack shares one network:
# each model's jobs train in a stack of their own. SAM passes over every batch twice: the members without it
# (dropout among them) must not notice.
JOBS = {
    "seed0": ["trainer.seed=0"],
    "seed1": ["trainer.seed=1"],
    "lr": ["optimizer.lr=0.003"],
    "l2_coupled": ["regularizer=l2", "regularizer.l2.weight_decay=0.01"],
    "l2_coupled_torch": ["regularizer=l2", "regularizer.l2.weight_decay=0.01", "regularizer.l2.impl=torch"],
    "l2_penalty": ["regularizer=l2", "regularizer.l2.mode=penalty", "regularizer.l2.weight_decay=0.01"],
    "l2_decoupled": ["regularizer=l2", "regularizer.l2.mode=decoupled", "regularizer.l2.weight_decay=0.1"],
    "l2_decoupled_torch": [
        "regularizer=l2",
        "regularizer.l2.mode=decoupled",
        "regularizer.l2.weight_decay=0.1",
        "regularizer.l2.impl=torch",
    ],
    "l2_penalty_torch": [
        "regularizer=l2",
        "regularizer.l2.mode=penalty",
        "regularizer.l2.weight_decay=0.01",
        "regularizer.l2.impl=torch",
    ],
    "l1_proximal": ["regularizer=l1", "regularizer.l1.strength=0.01"],
    "l1_proximal_torch": ["regularizer=l1", "regularizer.l1.strength=0.01", "regularizer.l1.impl=torch"],
    "l1_subgradient": ["regularizer=l1", "regularizer.l1.mode=subgradient", "regularizer.l1.impl=torch"],
    "label_smoothing": ["regularizer=label_smoothing", "regularizer.label_smoothing.eps=0.2"],
    "label_smoothing_torch": ["regularizer=label_smoothing", "regularizer.label_smoothing.impl=torch"],
    "early_stopping": [
        "regularizer=early_stopping",
        "regularizer.early_stopping.patience=1",
        "regularizer.early_stopping.monitor=train/loss",
        "regularizer.early_stopping.mode=max",
    ],
    "dropout": ["regularizer=dropout", "regularizer.dropout.p=0.5", "regularizer.dropout.max_norm=2.0"],
    # Monte Carlo dropout at the end: its passes draw from the member's own noise generator
    "mc_dropout": ["regularizer=dropout", "regularizer.dropout.mc_samples=4", "trainer.seed=3"],
    "mixup": ["regularizer=mixup", "regularizer.mixup.alpha=0.4"],
    "mixup_torch": ["regularizer=mixup", "regularizer.mixup.impl=torch"],
    "cutmix": ["regularizer=cutmix"],
    "smoothed_then_mixed": [
        "regularizer=[label_smoothing,mixup,cutmix]",
        "regularizer.label_smoothing.impl=torch",
        "regularizer.mixup.alpha=1",
    ],
    "label_noise": ["dataset.label_noise=0.3", "trainer.seed=2"],
    "noise": ["regularizer=noise", "regularizer.noise.hidden_sigma=0.2"],
    "gaussian_dropout": [
        "regularizer=[noise,dropout]",
        "regularizer.noise.mode=multiplicative",
        "regularizer.noise.hidden_sigma=0.5",
    ],
    "swa": [
        "regularizer=swa",
        "regularizer.swa.start_epoch=2",
        "regularizer.swa.lr=0.003",
        "regularizer.swa.anneal_epochs=2",
    ],
    "swa_torch": ["regularizer=swa", "regularizer.swa.start_epoch=3", "regularizer.swa.impl=torch"],
    "ema": ["regularizer=ema", "regularizer.ema.decay=0.9"],
    "ema_torch": ["regularizer=ema", "regularizer.ema.impl=torch", "trainer.seed=1"],
    "sam": ["regularizer=sam", "regularizer.sam.rho=0.1"],
    "sam_dropout": ["regularizer=[sam,dropout]", "regularizer.dropout.p=0.3"],
    "spectral_norm": ["regularizer=spectral_norm", "regularizer.spectral_norm.coefficient=2"],
    "sam_noise_mixup_swa": [  # techniques of different kinds at once: SAM's second pass replays noise draws
        "regularizer=[sam,noise,mixup,swa]",
        "regularizer.noise.hidden_sigma=0.1",
        "regularizer.swa.start_epoch=2",
    ],
    "everything": [
        "regularizer=[l1,l2,dropout,label_smoothing]",
        "regularizer.l1.mode=subgradient",
        "regularizer.l2.mode=penalty",
        "regularizer.dropout.input_p=0.1",
    ],
    "beyond": [
        "regularizer=[sam,spectral_norm,ema,l2,dropout,early_stopping]",
        "regularizer.l2.mode=decoupled",
        "regularizer.early_stopping.patience=2",
    ],
}


OTHER_MODELS = {  # model: the jobs of its stack
    "resmlp": {
        "resmlp_seed0": ["trainer.seed=0"],
        "resmlp_seed1": ["trainer.seed=1"],
        "resmlp_stochastic_depth": ["regularizer=stochastic_depth"],
        "resmlp_stochastic_depth_uniform": [
            "regularizer=[stochastic_depth,noise,l2]",
            "regularizer.stochastic_depth.rule=uniform",
            "regularizer.noise.hidden_sigma=0.1",
        ],
        "resmlp_sam_stochastic_depth": ["regularizer=[stochastic_depth,sam]"],
        "resmlp_dropout": ["regularizer=[dropout,label_smoothing]", "trainer.seed=3"],
    },
    "resnet": {
        "resnet_seed0": ["trainer.seed=0"],
        "resnet_stochastic_depth": [
            "regularizer=[stochastic_depth,dropout]",
            "regularizer.dropout.conv_p=0.2",
        ],
        "resnet_noise": ["regularizer=noise", "regularizer.noise.hidden_sigma=0.2", "trainer.seed=1"],
    },
    "cnn1d": {
        "cnn1d_seed0": ["trainer.seed=0"],
        "cnn1d_dropout": ["regularizer=[dropout,l2]", "regularizer.dropout.conv_p=0.2"],
        "cnn1d_element_dropout": [
            "regularizer=dropout",
            "regularizer.dropout.conv_kind=element",
            "trainer.seed=1",
        ],
    },
    # 2-D: images (scikit-learn's 8x8 digits), with the per-member augmentation (shifts and flips drawn from each
    # member's batch generator), conv dropout of both kinds and torchvision's CutMix, which takes images only
    "cnn": {
        "cnn_seed0": ["trainer.seed=0"],
        "cnn_augment": ["dataset.augment=true", "trainer.seed=1"],
        "cnn_channel_dropout": ["regularizer=dropout", "regularizer.dropout.conv_p=0.2"],
        "cnn_element_dropout": [
            "regularizer=dropout",
            "regularizer.dropout.conv_p=0.2",
            "regularizer.dropout.conv_kind=element",
            "dataset.augment=true",
        ],
        "cnn_cutmix_torch": ["regularizer=[cutmix,l2]", "regularizer.cutmix.impl=torch"],
        "cnn_cutmix": ["regularizer=cutmix", "trainer.seed=2"],
    },
    "resnet2d": {
        "resnet2d_seed0": ["trainer.seed=0"],
        "resnet2d_stochastic_depth": ["regularizer=[stochastic_depth,mixup]", "dataset.augment=true"],
    },
}
SMALL = {
    "resmlp": ["model=resmlp", "model.width=32", "model.blocks=3"],
    "resnet": ["model=resnet", "model.channels=[8,8,16]"],
    "cnn1d": ["model=cnn1d", "model.channels=[8,8]", "model.kernel_size=[5,3]"],
    "cnn": ["dataset=digits", "model=cnn", "model.channels=[8,16]", "model.hidden=[32]"],
    "resnet2d": ["dataset=digits", "model=resnet", "model.channels=[8,8,16]"],
}
for model, jobs in OTHER_MODELS.items():
    JOBS.update({name: [*SMALL[model], *overrides] for name, overrides in jobs.items()})
STACKS = [
    [name for name in JOBS if not name.startswith(tuple(OTHER_MODELS))],
    *map(list, OTHER_MODELS.values()),
]


def without_time(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "time_s"} for row in rows]


def run(tmp_path, data_root, names: list[str], where: str, extra=()) -> None:
    members = [
        Member(cfg=config(data_root, *QUICK, *extra, *JOBS[name]), run_dir=tmp_path / where / name, job=Job())
        for name in names
    ]
    for member in members:
        member.run_dir.mkdir(parents=True)
    train_stack(members)


@pytest.fixture(scope="module")
def alone_and_stacked(tmp_path_factory, data_root):
    tmp_path = tmp_path_factory.mktemp("stack")
    for name in JOBS:
        run(tmp_path, data_root, [name], "alone")
    for stack in STACKS:
        run(tmp_path, data_root, stack, "stacked")
    return tmp_path


@pytest.mark.parametrize("name", list(JOBS))
def test_a_stacked_job_equals_its_lone_run_bit_for_bit(alone_and_stacked, name):
    alone, stacked = alone_and_stacked / "alone" / name, alone_and_stacked / "stacked" / name
    assert without_time(read_metrics(stacked)) == without_time(read_metrics(alone))
    for weights in ("best.pt", "last.pt"):
        mine, theirs = torch.load(stacked / weights), torch.load(alone / weights)
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[key], theirs[key]) for key in mine)
    summary, lone = read_summary(stacked), read_summary(alone)
    stack_size = next(len(stack) for stack in STACKS if name in stack)
    assert summary["stack"]["size"] == stack_size and lone["stack"]["size"] == 1
    # trainer.threads=auto: the lone run on one thread, the stack on one per member up to the cores, so on a machine
    # with several cores this also shows that the thread count leaves a member's results alone
    assert lone["threads"] == 1 and summary["threads"] == min(stack_size, len(os.sched_getaffinity(0)))
    # sharpness (a diagnostic of the final model, one gradient over all training samples) agrees to rounding
    # only: with spectral norm's transform in the stack, that large reduction's gradient rounds differently
    assert summary["sharpness"] == pytest.approx(lone["sharpness"], rel=1e-4, abs=1e-7)
    varying = ("wall_time_s", "train_time_s", "stack", "run_dir", "sharpness", "threads")
    assert {k: v for k, v in summary.items() if k not in varying} == {
        k: v for k, v in lone.items() if k not in varying
    }


def test_early_stopping_ends_one_member_while_the_others_go_on(alone_and_stacked):
    stopped = read_summary(alone_and_stacked / "stacked" / "early_stopping")
    assert stopped["status"] == "early_stopped" and stopped["epochs_run"] < 4
    assert read_summary(alone_and_stacked / "stacked" / "seed0")["epochs_run"] == 4


PENALTY = ["regularizer=l2", "regularizer.l2.mode=penalty"]


# the diverging member in an optimizer group of its own (another learning rate), or in the same update block as the
# healthy one (the same optimizer settings; its penalty λ/2·Σw² overflows to inf)
@pytest.mark.parametrize(
    "diverges, healthy",
    [
        (["optimizer=sgd", "optimizer.lr=1e30"], ["optimizer=sgd"]),
        ([*PENALTY, "regularizer.l2.weight_decay=1e38"], [*PENALTY, "regularizer.l2.weight_decay=0"]),
    ],
    ids=["own group", "same block"],
)
def test_a_diverging_member_never_touches_the_others(tmp_path, data_root, diverges, healthy):
    JOBS["diverges"], JOBS["healthy"] = diverges, healthy
    try:
        run(tmp_path, data_root, ["diverges", "healthy"], "stacked")
        run(tmp_path, data_root, ["healthy"], "alone")
    finally:
        del JOBS["diverges"], JOBS["healthy"]
    assert read_summary(tmp_path / "stacked" / "diverges")["status"] == "diverged"
    assert without_time(read_metrics(tmp_path / "stacked" / "healthy")) == without_time(
        read_metrics(tmp_path / "alone" / "healthy")
    )
    assert (
        read_summary(tmp_path / "stacked" / "healthy")["test/acc"]
        == read_summary(tmp_path / "alone" / "healthy")["test/acc"]
    )
    mine, theirs = (
        torch.load(tmp_path / "stacked" / "healthy" / "last.pt"),
        torch.load(tmp_path / "alone" / "healthy" / "last.pt"),
    )
    assert all(torch.equal(mine[key], theirs[key]) for key in theirs)


def test_identical_members_of_a_cnn_stack_stay_identical(tmp_path, data_root):
    """The same job three times in one stack: every position in the stack must compute the same numbers (MKL picks
    kernels by operand alignment unless reglab's MKL_CBWR setting makes it strict; member 1 once differed)."""
    members = []
    for k in range(3):
        cfg = config(data_root, "trainer.epochs=2", "dataset.n_train=300", "trainer.seed=1", "model=cnn1d")
        (tmp_path / str(k)).mkdir()
        members.append(Member(cfg=cfg, run_dir=tmp_path / str(k), job=Job(multirun=True)))
    train_stack(members)
    rows = [read_metrics(tmp_path / str(k)) for k in range(3)]
    assert without_time(rows[1]) == without_time(rows[0]) == without_time(rows[2])


def test_auto_threads_are_one_alone_and_one_per_member_up_to_the_cores():
    cores = len(os.sched_getaffinity(0))
    assert thread_count("auto", 1) == 1
    assert thread_count("auto", 2) == min(2, cores)
    assert thread_count("auto", 48) == cores
    assert thread_count(3, 1) == 3  # a number is taken as it is


def test_a_stack_on_several_threads_sums_as_its_lone_runs_do(tmp_path, data_root):
    """Weights of 256 x 256: a sum over more than 32768 numbers, which torch splits between threads with other
    rounding; the stack (one thread per member) takes its metrics on one thread, as the lone runs do."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one core: the stack runs on one thread too")
    jobs = {"wide0": ["model.hidden=[256,256]"], "wide1": ["model.hidden=[256,256]", "trainer.seed=1"]}
    extra = ["trainer.epochs=2", "dataset.n_train=300", "trainer.plots=false"]
    for name in jobs:
        (tmp_path / name).mkdir()
        (tmp_path / "stacked" / name).mkdir(parents=True)
    for name, overrides in jobs.items():
        train_stack([Member(cfg=config(data_root, *extra, *overrides), run_dir=tmp_path / name, job=Job())])
    stacked = [
        Member(cfg=config(data_root, *extra, *overrides), run_dir=tmp_path / "stacked" / name, job=Job())
        for name, overrides in jobs.items()
    ]
    train_stack(stacked)
    varying = ("wall_time_s", "train_time_s", "stack", "run_dir", "threads")
    for name in jobs:
        alone, together = tmp_path / name, tmp_path / "stacked" / name
        assert read_summary(together)["threads"] == 2
        assert without_time(read_metrics(together)) == without_time(read_metrics(alone))
        summary, lone = read_summary(together), read_summary(alone)
        assert {k: v for k, v in summary.items() if k not in varying} == {
            k: v for k, v in lone.items() if k not in varying
        }


def wide_stack(model: str, seeds: list[int]):
    """A stack of `model`, a member per seed, as wide as MNIST's inputs (784; cnn1d: 40), and its input length."""
    from reglab.models import Architecture, build_model
    from reglab.regularizers.dropout import DropoutPlan

    cfg = {
        "mlp": {"hidden": [100, 100]},
        "cnn1d": {"channels": [8, 16], "kernel_size": [5, 3], "hidden": [32]},
        "resmlp": {"width": 32, "blocks": 2, "hidden": []},
    }
    length = 784 if model != "cnn1d" else 40
    arch = Architecture((1, length), num_classes=10, seeds=seeds, dropout=[DropoutPlan()] * len(seeds))
    return build_model({"name": model, "activation": "relu", **cfg[model]}, arch), length


@pytest.mark.parametrize("model", ["mlp", "cnn1d", "resmlp"])
def test_evaluation_computes_what_training_computes(model):
    """Evaluation runs without autograd, ReLU in place: its logits must be exactly those of the forward pass that
    training takes, for inputs as wide as MNIST's (a matmul over 784 inputs)."""
    stack, length = wide_stack(model, [0, 1, 2])
    stack.eval()
    x = torch.randn(3, 3200, 1, length, generator=torch.Generator().manual_seed(0))
    with torch.enable_grad():
        training = stack(x)
    with torch.inference_mode():
        evaluation = stack(x)
    assert training.requires_grad and torch.equal(training.detach(), evaluation)


def test_members_scored_a_few_at_a_time_score_as_all_at_once(monkeypatch):
    """`evaluate` scores as many members per call as keep its temporaries small: on a large split, a few at a time.
    How many must not change a number."""
    from reglab import loop
    from reglab.models import Architecture, build_model
    from reglab.regularizers.dropout import DropoutPlan

    arch = Architecture(
        input_shape=(1, 40), num_classes=10, seeds=[0, 1, 2, 3, 4], dropout=[DropoutPlan()] * 5
    )
    stack = build_model({"name": "mlp", "activation": "relu", "hidden": [32]}, arch)
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(500, 1, 40, generator=generator), torch.randint(10, (5, 500), generator=generator)
    together = loop.evaluate(stack, x, y, batch_size=256)
    monkeypatch.setattr(loop, "SCORED_AT_ONCE", 2 * 500)  # two members a call: parts of 2, 2 and 1
    apart = loop.evaluate(stack, x, y, batch_size=256)
    assert len(apart) == 5
    assert [{k: v.item() for k, v in m.items()} for m in apart] == [
        {k: v.item() for k, v in m.items()} for m in together
    ]


@pytest.mark.parametrize("model", ["mlp", "cnn1d", "resmlp"])
def test_logits_are_the_same_bits_in_chunks_of_any_size(model, monkeypatch):
    """On the CPU a stack is evaluated in chunks of fewer samples than a lone run (`EVALUATED_AT_ONCE`): every
    member's logits must not depend on how many samples are computed beside them, for a stack or alone."""
    from reglab import loop

    stack, length = wide_stack(model, [0, 1, 2])
    x = torch.randn(1001, 1, length, generator=torch.Generator().manual_seed(0))
    whole = loop.predict_all(stack, x, batch_size=4096, members=3)
    # 1001 samples in chunks of at most 1000: 501 and 500, not 1000 and a last one computed by another kernel
    assert torch.equal(loop.predict_all(stack, x, batch_size=1000, members=3), whole)
    monkeypatch.setattr(loop, "FEWEST_EVALUATED", 3)
    for rows in (1000, 100, 37, 6):  # near-equal chunks of about this many samples (5 or 6: never under 3)
        monkeypatch.setattr(loop, "EVALUATED_AT_ONCE", 3 * rows)
        assert torch.equal(loop.predict_all(stack, x, batch_size=4096, members=3), whole), rows
    alone, _ = wide_stack(model, [1])
    monkeypatch.setattr(loop, "EVALUATED_AT_ONCE", 37)
    assert torch.equal(loop.predict_all(alone, x, batch_size=4096, members=1)[0], whole[1])
