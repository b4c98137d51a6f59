"""fit_task, checkpoints, sequences and multi-task inference on a tiny ViT and colour-coded images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from PIL import Image
from torch.utils.data import Dataset, TensorDataset

from recast import RecastConfig, RecastModel
from recast.backbones import load_backbone
from recast.bench import BenchBackbone, BenchTask, Suite, open_tasks, plan, run_one
from recast.data import open_data
from recast.data.transforms import transforms_for
from recast.errors import ConfigError, TaskError
from recast.methods import build_method
from recast.recipe import attach_recipe, recipe_of
from recast.train import (
    SequenceTask,
    TrainConfig,
    TrainingError,
    evaluate,
    fit_task,
    forward_mixed,
    image_size_of,
    learn_sequence,
    load_model,
    predict_logits,
    prepare_task,
    set_image_size,
    state_tensors,
)
from tests.helpers import narrow_resnet

TINY = {"img_size": 16, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2, "num_classes": 3}
COLOURS_A = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
COLOURS_B = {"cyan": (30, 200, 200), "magenta": (200, 30, 200), "white": (235, 235, 235), "yellow": (220, 220, 30)}
FAST = TrainConfig(epochs=3, batch_size=16, lr=2e-2, seed=0)


def tiny_base() -> torch.nn.Module:
    """A 2-block ViT for 16-px images, with a recipe so that model directories can be reloaded."""
    torch.manual_seed(0)
    return attach_recipe(timm.create_model("vit_tiny_patch16_224", **TINY), "timm", "vit_tiny_patch16_224", **TINY)


def tiny_model() -> RecastModel:
    """The tiny ViT rewritten with banks for attention and MLP layers."""
    return RecastModel.from_base(tiny_base(), RecastConfig(target="att+mlp", groups=1))


def colour_folder(root: Path, colours: dict[str, tuple[int, int, int]], per_class: int = 20) -> Path:
    """An image folder whose classes are noisy solid colours (easily separable)."""
    rng = np.random.default_rng(len(colours))
    for name, rgb in colours.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.asarray(rgb)[None, None, :] + rng.normal(0, 25, (16, 16, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / name / f"{i}.png")
    return root


def open_colours(root: Path, model: RecastModel, augment: bool = False):
    evaluation = transforms_for(model.net, train=False)
    training = transforms_for(model.net, train=True) if augment else evaluation
    return open_data(f"imagefolder:{root}", train_transform=training, eval_transform=evaluation)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("colours")
    return colour_folder(root / "a", COLOURS_A), colour_folder(root / "b", COLOURS_B)


def test_train_config_defaults_and_files(tmp_path):
    config = TrainConfig()
    assert (config.lr, config.weight_decay, config.batch_size, config.step_size, config.gamma) == (2e-3, 1e-6, 128, 33, 0.1)
    assert (config.epochs, config.grad_clip) == (100, 1.0)
    (tmp_path / "c.json").write_text(json.dumps({"epochs": 7, "lr": 0.01}))
    (tmp_path / "c.toml").write_text("[train]\nepochs = 5\nprecision = 'bf16'\n")
    assert TrainConfig.from_file(tmp_path / "c.json").epochs == 7
    assert TrainConfig.from_file(tmp_path / "c.toml").precision == "bf16"
    (tmp_path / "bad.json").write_text(json.dumps({"epoch": 7}))
    with pytest.raises(ConfigError, match="unknown training options"):
        TrainConfig.from_file(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="precision"):
        TrainConfig(precision="fp8")
    with pytest.raises(ConfigError, match="batch_size"):
        TrainConfig(batch_size=0)


def test_only_task_parameters_change_and_test_is_measured_once(folders, tmp_path):
    model = tiny_model()
    splits = open_colours(folders[0], model, augment=True)
    prepare_task(model, "a", splits.classes, seed=0)
    own = {n for n, p in model.named_parameters() if p.requires_grad}  # task a's coefficients and head
    assert own == {"coefficient_table.per_task.a", "net.head.per_task.weight.a", "net.head.per_task.bias.a"}
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k not in own}
    result = fit_task(model, splits.train, splits.val, splits.test, FAST, log_csv=tmp_path / "log.csv")
    assert result.test_accuracy >= 0.9 and result.val_accuracy >= 0.9
    assert 1 <= result.best_epoch <= 3 and len(result.history) == 3
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.items())
    assert (tmp_path / "log.csv").read_text().count("\n") == 4
    assert evaluate(model, splits.test) == result.test_accuracy


def test_two_task_sequence_never_forgets(folders):
    model = tiny_model()
    tasks = []
    for name, root in zip(("a", "b"), folders, strict=True):
        s = open_colours(root, model)
        tasks.append(SequenceTask(name, f"imagefolder:{root}", s.train, s.val, s.test, s.classes, s.split_info))
    logits_after = {}

    def after_task(model, task, result):  # task a's logits right after each task is learned
        active = model.active_task
        model.set_task("a")
        logits_after[task.name] = predict_logits(model, tasks[0].test)
        model.set_task(active)
        return 0

    run = learn_sequence(model, tasks, FAST, on_task=after_task)
    assert torch.equal(logits_after["a"], logits_after["b"])
    matrix = run["accuracy_matrix"]
    assert matrix[0][0] == matrix[1][0]
    assert run["forgetting"] == 0.0 and run["bwt"] == 0.0
    assert matrix[0][0] > 0.8 and matrix[1][1] > 0.8  # chance: 1/3 and 1/4
    assert [t["name"] for t in run["tasks"]] == ["a", "b"]
    assert run["tasks"][1]["params"]["head"] == 4 * 32 + 4


def test_resume_from_a_checkpoint_equals_an_uninterrupted_run(folders, tmp_path):
    config = TrainConfig(epochs=4, batch_size=16, lr=2e-2, seed=3)

    def run(epochs_first: int | None) -> dict[str, torch.Tensor]:
        model = tiny_model()
        splits = open_colours(folders[0], model, augment=True)
        prepare_task(model, "a", splits.classes, seed=3)
        ckpt = tmp_path / f"ck{epochs_first}"
        if epochs_first is not None:  # stop early, then resume with a freshly built model
            fit_task(model, splits.train, splits.val, None, TrainConfig(**{**config.to_dict(), "epochs": epochs_first}),
                     checkpoint_dir=ckpt)
            record = json.loads((ckpt / "checkpoint.json").read_text())
            record["config"]["epochs"] = config.epochs
            (ckpt / "checkpoint.json").write_text(json.dumps(record))
            model = tiny_model()
            prepare_task(model, "a", splits.classes, seed=99)  # a different head: resume must overwrite it
        fit_task(model, splits.train, splits.val, splits.test, config, checkpoint_dir=ckpt,
                 resume=epochs_first is not None)
        return model.task_tensors("a")

    straight, resumed = run(None), run(2)
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_resume_needs_a_checkpoint_and_the_same_options(folders, tmp_path):
    model = tiny_model()
    splits = open_colours(folders[0], model)
    prepare_task(model, "a", splits.classes)
    with pytest.raises(ConfigError, match="no checkpoint"):
        fit_task(model, splits.train, splits.val, None, FAST, checkpoint_dir=tmp_path, resume=True)
    fit_task(model, splits.train, splits.val, None, TrainConfig(epochs=1, batch_size=16), checkpoint_dir=tmp_path)
    with pytest.raises(ConfigError, match="other training options"):
        fit_task(model, splits.train, splits.val, None, TrainConfig(epochs=2, batch_size=16),
                 checkpoint_dir=tmp_path, resume=True)


class _Images(Dataset):
    """Constant images with given labels; one sample can be made NaN."""

    def __init__(self, labels: list[int], nan_at: int | None = None) -> None:
        self.labels, self.nan_at = labels, nan_at

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        image = torch.full((3, 16, 16), float("nan") if i == self.nan_at else 0.1 * (self.labels[i] + 1))
        return image, self.labels[i]


def test_nan_loss_stops_and_keeps_the_last_good_state(tmp_path):
    model = tiny_model()
    prepare_task(model, "t", ["x", "y", "z"])
    good = _Images([0, 1, 2] * 4)
    config = TrainConfig(epochs=1, batch_size=4, seed=0)
    fit_task(model, good, good, None, config, checkpoint_dir=tmp_path)
    before = state_tensors(model)
    config2 = TrainConfig(epochs=2, batch_size=4, seed=0)
    bad = _Images([0, 1, 2] * 4, nan_at=5)
    with pytest.raises(TrainingError, match=r"loss became nan .*last good state"):
        fit_task(model, bad, good, None, config2)
    after = state_tensors(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bad_labels_and_empty_data_are_clear_errors():
    model = tiny_model()
    prepare_task(model, "t", ["x", "y", "z"])
    with pytest.raises(TrainingError, match="label 5 is out of range for a head with 3 classes"):
        fit_task(model, _Images([0, 5, 1, 2]), _Images([0]), None, TrainConfig(epochs=1, batch_size=4))
    empty = TensorDataset(torch.zeros(0, 3, 16, 16), torch.zeros(0, dtype=torch.long))
    with pytest.raises(TrainingError, match="train split is empty"):
        fit_task(model, empty, _Images([0]), None, FAST)
    with pytest.raises(ConfigError, match="has a head of 3 classes"):
        prepare_task(model, "t", ["x", "y"])
    with pytest.raises(TaskError, match="existing tasks: base, t"):
        model.set_task("nope")


def test_mixed_task_batch_equals_per_task_forwards():
    model = tiny_model()
    model.add_task("four", 4)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # non-trivial coefficients and heads
    model.eval()
    images = torch.randn(6, 3, 16, 16)
    tasks = ["base", "four", "four", "base", "four", "base"]
    outputs = [forward_mixed(model, images, tasks, single_forward=False)]
    if hasattr(model, "forward_tasks"):  # the model's own single forward over the mixed batch
        outputs.append(forward_mixed(model, images, tasks))
    for mixed in outputs:
        assert mixed.shape == (6, 4)
        for i, name in enumerate(tasks):
            model.set_task(name)
            alone = model(images[i : i + 1])[0]
            torch.testing.assert_close(mixed[i, : alone.shape[0]], alone, rtol=1e-5, atol=1e-6)
            assert torch.isinf(mixed[i, alone.shape[0] :]).all()


def test_checkpoint_files_are_safetensors_and_json(folders, tmp_path):
    model = tiny_model()
    splits = open_colours(folders[0], model)
    prepare_task(model, "a", splits.classes)
    fit_task(model, splits.train, splits.val, None, TrainConfig(epochs=2, batch_size=16), checkpoint_dir=tmp_path)
    record = json.loads((tmp_path / "checkpoint.json").read_text())
    assert record["epoch"] == 2 and record["tensors"] == "epoch-2.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.json", "epoch-2.safetensors"]
    tensors = safetensors.torch.load_file(tmp_path / "epoch-2.safetensors")
    assert tensors["rng.torch"].dtype == torch.uint8


def test_two_builtin_tasks_on_the_shipped_vit_without_forgetting(tmp_path, monkeypatch):
    """The issue's check on real offline data: optdigits then faces on the shipped recast-vit32."""
    monkeypatch.setenv("RECAST_DATA", str(tmp_path / "data"))  # built from the installed packages, here
    base = load_backbone("recast-vit32")
    model = build_method("recast", base, target="att", groups=3)
    suite = Suite("two", (BenchTask("digits", "builtin:optdigits", hflip=0.0), BenchTask("faces", "builtin:faces")),
                  (), {}, max_train_images=600)
    tasks = open_tasks(suite, base, 42, TrainConfig())
    first_logits = {}

    def keep_first(model, task, result):
        if task.name == "digits":
            with torch.no_grad():
                first_logits["after"] = predict_logits(model.eval(), task.test)
        return 0

    config = TrainConfig(epochs=3, step_size=2, batch_size=64, lr=1e-2, seed=42)
    outcome = learn_sequence(model, tasks, config, on_task=keep_first)
    digits, faces = (t["test_accuracy"] for t in outcome["tasks"])
    assert digits > 0.3 and faces > 0.6  # chance: 0.1 and 0.5
    model.set_task("digits")
    with torch.no_grad():
        assert torch.equal(predict_logits(model.eval(), tasks[0].test), first_logits["after"])
    assert outcome["accuracy_matrix"][1][0] == outcome["accuracy_matrix"][0][0] and outcome["forgetting"] == 0.0


def test_image_size_changes_the_model_input_and_the_transforms():
    base = tiny_base()
    assert image_size_of(base) == 16
    set_image_size(base, 32)
    assert image_size_of(base) == 32 and base.patch_embed.grid_size == (4, 4)
    assert base.pos_embed.shape[1] == 1 + 16  # the class token plus a 4 x 4 grid, resampled
    image = transforms_for(base, train=False)(Image.new("RGB", (50, 40)))
    assert image.shape == (3, 32, 32) and base(image[None]).shape == (1, 3)
    assert recipe_of(base)["kwargs"]["img_size"] == 32  # a saved copy is rebuilt at this size
    with pytest.raises(ConfigError, match="multiple of 8"):
        set_image_size(base, 36)
    resnet = narrow_resnet()
    set_image_size(resnet, 48)
    assert image_size_of(resnet) == 48
    assert transforms_for(resnet, train=True)(Image.new("RGB", (20, 20))).shape == (3, 48, 48)


def test_image_size_in_a_suite_is_applied_and_recorded(folders, tmp_path):
    task = BenchTask("a", f"imagefolder:{folders[0]}")
    backbone = BenchBackbone("tiny", "tiny-vit", ("recast:att",), {"recast:att": {"target": "att", "groups": 1}},
                             loader=tiny_base)
    suite = Suite("sized", (task,), (backbone,), {"epochs": 1, "batch_size": 16, "image_size": 32}, seeds=(0,))
    record = run_one(suite, plan(suite)[0], tmp_path, log=lambda _: None)
    assert record["image_size"] == 32 and record["train_config"]["image_size"] == 32
    model = load_model(tmp_path / "models" / "recast-att__tiny__0")  # saved at 32 px, rebuilt at 32 px
    assert image_size_of(model.net) == 32
    assert model.tasks["a"].meta["train_config"]["image_size"] == 32
