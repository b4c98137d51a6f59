"""RECAST on a device: one ONNX graph loaded once, three task files of a few hundred bytes, no torch.

Run:  python examples/edge_onnx.py [--out DIR] [--steps N]

The host part (PyTorch) learns three small tasks on a RECAST-Att ViT, exports the task-generic ONNX
graph once and packs each task as an int8 task file, and writes test images as PNG files. The device
part then runs in a fresh process that imports only numpy, Pillow, ONNX Runtime and the one file
``recast/edge/device.py`` (loaded by path: importing the ``recast`` package would load torch): it loads
the graph once, switches between the three delivered task files, classifies the images and prints
what each task cost to deliver. ``python examples/edge_onnx.py device ONNX_DIR TASK_FILE... --images DIR``
runs the device part alone.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

TASKS = {"quadrant-a": 1, "quadrant-b": 2, "quadrant-c": 3}  # task name -> seed of its synthetic data
CLASSES = 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="part")
    device = sub.add_parser("device", help="the device part alone")
    device.add_argument("onnx_dir")
    device.add_argument("task_files", nargs="+")
    device.add_argument("--images", required=True, help="folder of <task>/<label>_<i>.png images")
    parser.add_argument("--out", default="runs/edge_onnx")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    if args.part == "device":
        on_device(Path(args.onnx_dir), [Path(f) for f in args.task_files], Path(args.images))
        return
    out = Path(args.out)
    files = prepare_on_host(out, args.steps)
    command = [sys.executable, __file__, "device", str(out / "onnx"), *map(str, files), "--images", str(out / "images")]
    sys.exit(subprocess.run(command).returncode)  # a fresh process: nothing of the host part is loaded


# ------------------------------------------------------------------------------ host (PyTorch)
def prepare_on_host(out: Path, steps: int) -> list[Path]:
    """Learn the tasks, export the graph once, pack each task (int8), write test images; the task files."""
    import torch  # host only: the device part of this script must not load it

    from recast import RecastConfig, RecastModel
    from recast.edge.export import export_onnx
    from recast.edge.pack import write_packed_task
    from recast.quickstart import synthetic_task, train_steps
    from recast.recipe import create_timm

    torch.manual_seed(0)
    base = create_timm("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=96, depth=4, num_heads=3,
                       num_classes=CLASSES)
    model = RecastModel.from_base(base, RecastConfig(target="att", groups=2))
    files = []
    for name, seed in TASKS.items():
        images, labels = synthetic_task(CLASSES, 160, 32, seed)
        # what a camera gives: uint8 pixels (mean 0.5, std 0.5 undone), so host and device see the same images
        pixels = ((images * 0.5 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        normalised = (pixels.float() / 255 - 0.5) / 0.5
        model.add_task(name, CLASSES, class_names=[f"colour-{i}" for i in range(CLASSES)])
        model.set_task(name)
        train_steps(model, normalised[:128], labels[:128], steps)
        for i, (image, label) in enumerate(zip(pixels[128:], labels[128:].tolist(), strict=True)):
            path = out / "images" / name / f"{label}_{i:02d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
        files.append(out / "delivered" / f"{name}.int8.safetensors")
        write_packed_task(model, name, "int8", files[-1])
    manifest = export_onnx(model, out / "onnx")
    print(f"host: exported one graph for {len(manifest['tasks'])} tasks; packed {len(files)} task files (int8)")
    return files


# ------------------------------------------------------------------------ device (no torch)
def load_device_module():  # type: ignore[no-untyped-def]
    """``recast/edge/device.py`` loaded by path, without importing the ``recast`` package (and torch)."""
    spec = importlib.util.find_spec("recast")  # finds the package without running it
    assert spec is not None and spec.submodule_search_locations, "recast is not installed or on the path"
    path = Path(next(iter(spec.submodule_search_locations)), "edge", "device.py")
    module_spec = importlib.util.spec_from_file_location("recast_edge_device", path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module  # dataclasses look their module up here
    module_spec.loader.exec_module(module)
    return module


def on_device(onnx_dir: Path, task_files: list[Path], images_dir: Path) -> None:
    """Load the graph once, then for each delivered task file: switch to it and classify its images."""
    device = load_device_module()
    start = time.perf_counter()
    runner = device.EdgeRunner(onnx_dir, threads=1)
    graph_bytes = (onnx_dir / runner.manifest["graph"]).stat().st_size
    print(f"device: graph loaded once ({graph_bytes:,} bytes) in {1000 * (time.perf_counter() - start):.0f} ms")
    for file in task_files:
        start = time.perf_counter()
        task = runner.load_task(file.read_bytes(), str(file))
        switch_ms = 1000 * (time.perf_counter() - start)
        paths = sorted((images_dir / task.name).glob("*.png"))
        pixels = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
        labels = np.array([int(p.name.split("_")[0]) for p in paths])
        predicted = runner.run(runner.preprocess(pixels), task).argmax(axis=1)
        names = [task.class_names[i] for i in predicted[:3]] if task.class_names else predicted[:3].tolist()
        print(f"task {task.name}: delivered {task.file_bytes:,} bytes ({task.dtype}), switched in {switch_ms:.2f} ms, "
              f"{len(paths)} images, accuracy {np.mean(predicted == labels):.2f}, first predictions {names}")
    print("torch imported:", "torch" in sys.modules)


if __name__ == "__main__":
    main()
