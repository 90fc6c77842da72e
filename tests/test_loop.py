"""The one training loop: hooks run in order, the LR schedule is applied, a failed run
leaves no final checkpoint, and a run stopped after a periodic checkpoint and resumed ends
with the same weights (model, EMA, optimizer) as an uninterrupted one, for a tiny model and
for the polishers through ``dpl train-polisher --resume``."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset
from typer.testing import CliRunner

from dpl_tools.cli.cli import app
from dpl_tools.config import load_config
from dpl_tools.data.coco import load_coco
from dpl_tools.data.noise_models import GaussianNoise
from dpl_tools.data.polisher_pairs import (
    GroundTruth,
    PairSettings,
    noise_metadata,
    synthesize_pairs,
    write_noise_parquet,
)
from dpl_tools.engine.ema import ModelEMA
from dpl_tools.engine.loop import (
    Checkpointer,
    EMAHook,
    Hook,
    LRSchedule,
    TrainConfig,
    TrainLoop,
    train,
)
from dpl_tools.engine.train_polisher import train_polisher
from dpl_tools.errors import DplError
from dpl_tools.models.checkpoint import DetectorSpec, save_detector
from dpl_tools.models.detector import build_detector
from dpl_tools.models.polisher import read_polisher_checkpoint


class Points(Dataset):
    """Ten 4-d points with a scalar target each, in the (image, target) form the loop reads."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(10, 4, generator=g), torch.randn(10, generator=g)

    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int):
        return self.x[i], {"y": self.y[i], "index": i}


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.Linear(8, 1))  # uses the RNG


def _loss_fn(noise: torch.Generator):
    """MSE plus a term drawn from ``noise``: the extra generator's state matters too."""

    def loss_fn(net, images, targets):
        pred = net(torch.stack(images)).squeeze(1)
        y = torch.stack([t["y"] for t in targets])
        jitter = torch.randn(len(y), generator=noise)
        return {"mse": ((pred - y) ** 2).mean(), "jitter": (pred * jitter).mean() * 0.01}

    return loss_fn


class Recorder(Hook):
    """Records hook calls (with the learning rate the optimizer has at each step)."""

    def __init__(self, tag: str, log: list) -> None:
        self.tag, self.log = tag, log

    def before_train(self, loop):
        self.log.append((self.tag, "before_train", loop.iteration))

    def before_step(self, loop):
        lr = loop.optimizer.param_groups[0]["lr"]
        self.log.append((self.tag, "before_step", loop.iteration, lr))

    def after_step(self, loop):
        self.log.append((self.tag, "after_step", loop.iteration))

    def after_train(self, loop):
        self.log.append((self.tag, "after_train", loop.finished))


class StopAt(Hook):
    """Simulates a killed run: fails before the step of ``iteration``."""

    def __init__(self, iteration: int) -> None:
        self.iteration = iteration

    def before_step(self, loop):
        if loop.iteration == self.iteration:
            raise KeyboardInterrupt


CFG = dict(iters=7, batch_size=3, lr=0.05, warmup_iters=3, lr_steps=[0.5], workers=0)


def _run(stop_at: int | None = None, resume: dict | None = None):
    """Train the tiny net (EMA, extra generator, checkpoints every 2 iterations); returns
    (model, ema, optimizer, the checkpoints written as (state, weights, final))."""
    cfg = TrainConfig(**CFG, checkpoint_every=2, seed=5)
    model, noise = _net(), torch.Generator().manual_seed(1)
    ema = ModelEMA(model, 0.9)
    saved = []

    def save(net, state, final):
        weights = {k: v.clone() for k, v in net.state_dict().items()}
        saved.append((copy.deepcopy(state), weights, final))

    if resume is not None:
        model.load_state_dict(resume["weights"])
    hooks = [LRSchedule(), EMAHook(ema, model), Checkpointer(save, cfg.checkpoint_every)]
    if stop_at is not None:
        hooks.insert(0, StopAt(stop_at))
    loop = TrainLoop(
        model, Points(), cfg, torch.device("cpu"), loss_fn=_loss_fn(noise), hooks=hooks,
        generators={"noise": noise}, resume_state=resume and resume["state"],
    )  # fmt: skip
    try:
        loop.run()
    except KeyboardInterrupt:
        pass
    return model, ema, loop.optimizer, saved


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stopped_and_resumed_loop_equals_uninterrupted():
    model, ema, opt, saved = _run()
    assert [(s["iteration"], final) for s, _, final in saved] == [
        (2, False),
        (4, False),
        (6, False),
        (7, True),
    ]

    _, _, _, partial = _run(stop_at=5)  # checkpoints at 2 and 4, then killed in step 6
    assert [(s["iteration"], final) for s, _, final in partial] == [(2, False), (4, False)]
    state, weights, _ = partial[-1]
    assert set(state["hooks"]) == {"ema"} and set(state["generators"]) == {"noise"}
    resumed, resumed_ema, resumed_opt, _ = _run(resume={"state": state, "weights": weights})

    assert _same(resumed.state_dict(), model.state_dict())
    assert _same(resumed_ema.state_dict(), ema.state_dict())
    momentum = [s["momentum_buffer"] for s in opt.state_dict()["state"].values()]
    resumed_momentum = [s["momentum_buffer"] for s in resumed_opt.state_dict()["state"].values()]
    assert all(torch.equal(a, b) for a, b in zip(momentum, resumed_momentum, strict=True))
    # ... and differs from a run that did not restore the generators and the RNG.
    fresh = _run(resume={"state": {**state, "rng": None, "generators": {}}, "weights": weights})
    assert not _same(fresh[0].state_dict(), model.state_dict())


def test_hooks_run_in_order_with_the_lr_schedule():
    log: list = []
    cfg = TrainConfig(**CFG, checkpoint_every=0)
    model = _net()
    hooks = [LRSchedule(), Recorder("a", log), Recorder("b", log)]
    loop = TrainLoop(
        model, Points(), cfg, torch.device("cpu"), loss_fn=_loss_fn(torch.Generator()),
        hooks=hooks,
    )  # fmt: skip
    result = loop.run()
    assert result.iterations == 7 and result.iterations_run == 7
    assert set(result.last_losses) == {"mse", "jitter"}
    assert result.last_loss == pytest.approx(sum(result.last_losses.values()), rel=1e-5)
    assert not model.training  # eval mode once trained
    expected = [("a", "before_train", 0), ("b", "before_train", 0)]
    for i in range(7):
        expected += [("a", "before_step", i, cfg.lr_at(i)), ("b", "before_step", i, cfg.lr_at(i))]
        expected += [("a", "after_step", i), ("b", "after_step", i)]
    expected += [("a", "after_train", True), ("b", "after_train", True)]
    assert log == expected
    lrs = [entry[3] for entry in log if entry[:2] == ("a", "before_step")]
    # warm-up from 0.001 x lr over 3 iterations, lr, then x 0.1 from iteration 3.5 (7 / 2)
    assert lrs[0] == pytest.approx(0.05 * 0.001) and lrs[0] < lrs[1] < lrs[2] < 0.05
    assert lrs[3:] == pytest.approx([0.05, 0.005, 0.005, 0.005])


def test_failed_run_calls_after_train_but_writes_no_final_checkpoint():
    log, saved = [], []
    cfg = TrainConfig(**CFG, checkpoint_every=0)
    with pytest.raises(KeyboardInterrupt):
        train(
            _net(), Points(), cfg, torch.device("cpu"), loss_fn=_loss_fn(torch.Generator()),
            save=lambda net, state, final: saved.append(final),
            hooks=[StopAt(3), Recorder("r", log)],
        )  # fmt: skip
    assert log[-1] == ("r", "after_train", False) and saved == []
    with pytest.raises(DplError, match="no training images"):
        TrainLoop(_net(), torch.utils.data.TensorDataset(torch.zeros(0)), cfg, torch.device("cpu"))


def _polisher_inputs(synth_dataset, tmp_path):
    """An untrained tiny teacher and a 2-round noise file for the synthetic set."""
    coco = load_coco(synth_dataset)
    torch.manual_seed(0)
    teacher = build_detector(
        "mobilenet_v2_fpn", len(coco.categories), "none", min_size=64, max_size=96,
        rpn_pre_nms_top_n_test=60, rpn_post_nms_top_n_test=30,
    )  # fmt: skip
    save_detector(
        tmp_path / "teacher.pt", teacher, DetectorSpec("mobilenet_v2_fpn", coco.categories, 64, 96)
    )
    settings = PairSettings(reg_copies=20, cls_copies=[8, 8])
    write_noise_parquet(
        tmp_path / "noise.parquet",
        synthesize_pairs(GroundTruth.from_coco(coco), GaussianNoise(), settings, rounds=2),
        noise_metadata(coco, GaussianNoise(), settings, 2, 0),
    )
    return tmp_path / "teacher.pt", tmp_path / "noise.parquet"


POLISHER = {
    "iters": 3, "batch_size": 2, "workers": 0, "warmup_iters": 2, "checkpoint_every": 2,
    "reg_per_image": 32, "cls_per_image": 32, "max_proposals": 20, "val_fraction": 0.1,
}  # fmt: skip


def test_killed_polisher_run_resumes_to_the_uninterrupted_weights(synth_dataset, tmp_path):
    teacher, noise = _polisher_inputs(synth_dataset, tmp_path)
    images = synth_dataset.parent / "images"
    cfg = load_config(None, {"polisher": POLISHER})
    args = (teacher, noise, synth_dataset, images)
    whole, once = tmp_path / "whole.pt", tmp_path / "resumed.pt"
    train_polisher(*args, whole, cfg, "cpu", seed=2)

    # Killed in step 3 (of noise round 2), after the checkpoint at 2.
    with pytest.raises(KeyboardInterrupt):
        train_polisher(*args, once, cfg, "cpu", seed=2, hooks=[StopAt(2)])
    last = tmp_path / "resumed.last.pt"
    assert not once.exists() and read_polisher_checkpoint(last)["train_state"]["iteration"] == 2

    other = tmp_path / "other_teacher.pt"
    other.write_bytes(teacher.read_bytes() + b"\0")  # another file: another hash
    with pytest.raises(DplError, match="another teacher"):
        train_polisher(other, noise, synth_dataset, images, once, cfg, "cpu", seed=2, resume=True)

    result = CliRunner().invoke(
        app,
        ["train-polisher", "--teacher", str(teacher), "--noise", str(noise), "--ann",
         str(synth_dataset), "--images", str(images), "--out", str(once), "--iters", "3",
         "--batch-size", "2", "--workers", "0", "--device", "cpu", "--val-fraction", "0.1",
         "--reg-per-image", "32", "--cls-per-image", "32", "--max-proposals", "20",
         "--checkpoint-every", "2", "--seed", "2", "--resume",
         "--config", str(_preset(tmp_path))],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "3 (1 in this run" in result.output  # it did resume, at step 3
    assert not last.exists()  # the periodic checkpoint is replaced by the final one
    a, b = read_polisher_checkpoint(whole), read_polisher_checkpoint(once)
    assert _same(a["state_dict"], b["state_dict"])
    assert a["extra"]["validation"] == b["extra"]["validation"]
    assert a["extra"]["last_losses"] == b["extra"]["last_losses"]
    assert "train_state" not in b  # the final file is the EMA polisher only


def _preset(tmp_path):
    """The warm-up of POLISHER (no flag for it)."""
    path = tmp_path / "warmup.yaml"
    path.write_text("polisher:\n  warmup_iters: 2\n")
    return path


def test_killed_teacher_with_a_pretrained_backbone_resumes_to_the_uninterrupted_weights(
    synth_dataset, tmp_path
):
    """A teacher from backbone weights trains with its stem frozen; the resumed run rebuilds
    the same trainable parameters (it once failed: "parameter group doesn't match")."""
    from torchvision.models import mobilenet_v2

    from dpl_tools.engine.train_detector import train_teacher
    from dpl_tools.models.checkpoint import load_detector

    torch.manual_seed(0)
    weights = tmp_path / "mnv2.pth"
    torch.save(mobilenet_v2().state_dict(), weights)
    cfg = load_config(None, {
        "model": {"backbone_weights": str(weights), "min_size": 64, "max_size": 96},
        "teacher": {"iters": 3, "batch_size": 2, "workers": 0, "warmup_iters": 1,
                    "checkpoint_every": 2},
    })  # fmt: skip
    images = synth_dataset.parent / "images"
    whole, once = tmp_path / "whole.pt", tmp_path / "resumed.pt"
    train_teacher(synth_dataset, images, whole, cfg, "cpu", seed=1)
    with pytest.raises(KeyboardInterrupt):
        train_teacher(synth_dataset, images, once, cfg, "cpu", seed=1, hooks=[StopAt(2)])
    assert (tmp_path / "resumed.last.pt").is_file() and not once.exists()
    model, _, result = train_teacher(synth_dataset, images, once, cfg, "cpu", seed=1, resume=True)
    assert (result.iterations, result.iterations_run) == (3, 1)
    stem = model.backbone.body["0"]
    assert not any(p.requires_grad for p in stem.parameters())
    a, b = load_detector(whole)[0].state_dict(), load_detector(once)[0].state_dict()
    assert _same(a, b)
    # the frozen stem still holds the backbone file's weights
    assert torch.equal(b["backbone.body.0.0.weight"], torch.load(weights)["features.0.0.weight"])


def test_resume_refuses_another_seed_batch_size_or_process_count():
    """The data stream continues at the sample where it stopped: only for the same seed,
    batch size and number of processes (each rank's random state is its own)."""
    _, _, _, partial = _run(stop_at=5)
    state, weights, _ = partial[-1]
    for key, value in (("seed", 6), ("batch_size", 2)):
        changed = {**state, "config": {**state["config"], key: value}}
        with pytest.raises(DplError, match=f"--resume: the interrupted run used {key}"):
            _run(resume={"state": changed, "weights": weights})
    two_ranks = {**state, "ranks": [state, state]}
    with pytest.raises(DplError, match="had 2 process"):
        _run(resume={"state": two_ranks, "weights": weights})


def _ddp_worker(rank: int, init_file: str, out: str) -> None:
    """One of 2 gloo processes: the tiny net trained uninterrupted, then killed after its
    checkpoint at iteration 4 and resumed from it; rank 0 saves both final weights."""
    import torch.distributed as torch_dist

    from dpl_tools.runtime import DistInfo

    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                  world_size=2)  # fmt: skip
    info = DistInfo(rank, 2, rank)
    cfg = TrainConfig(**CFG, checkpoint_every=2, seed=5)

    def run(stop_at=None, resume=None):
        model = _net()
        if resume is not None:
            model.load_state_dict(resume["weights"])
        torch.manual_seed(100 + rank)  # each rank draws its own dropout masks
        saved = []
        hooks = [
            LRSchedule(),
            Checkpointer(
                lambda net, state, final: saved.append(copy.deepcopy((state, net.state_dict()))), 2
            ),
        ]
        if stop_at is not None:
            hooks.insert(0, StopAt(stop_at))
        noise = torch.Generator().manual_seed(1 + rank)
        loop = TrainLoop(model, Points(), cfg, torch.device("cpu"), info,
                         loss_fn=_loss_fn(noise), hooks=hooks, generators={"noise": noise},
                         resume_state=resume and resume["state"])  # fmt: skip
        try:
            loop.run()
        except KeyboardInterrupt:
            pass
        return model, saved

    uninterrupted, _ = run()
    _, partial = run(stop_at=5)
    if rank == 0:
        torch.save(partial[-1], f"{out}/checkpoint.pt")
    torch_dist.barrier()
    state, weights = torch.load(f"{out}/checkpoint.pt", weights_only=False)
    resumed, _ = run(resume={"state": state, "weights": weights})
    if rank == 0:
        torch.save({"uninterrupted": uninterrupted.state_dict(), "resumed": resumed.state_dict(),
                    "ranks": state["ranks"]}, f"{out}/result.pt")  # fmt: skip
    torch_dist.destroy_process_group()


def test_two_process_resume_restores_each_ranks_random_state(tmp_path):
    """Under DDP every rank draws its own random numbers (dropout, the loss's generator):
    the checkpoint keeps each rank's random state and a resumed 2-process run ends with the
    uninterrupted run's weights (with rank 0's state on both ranks it did not)."""
    torch.multiprocessing.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)),
                                nprocs=2)  # fmt: skip
    result = torch.load(tmp_path / "result.pt", weights_only=False)
    ranks = result["ranks"]
    assert len(ranks) == 2 and not torch.equal(ranks[0]["rng"], ranks[1]["rng"])
    assert _same(result["resumed"], result["uninterrupted"])
