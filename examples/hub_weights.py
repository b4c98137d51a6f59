"""Load a timm model with real pretrained weights and rewrite it with RECAST.

Online, the weights come from timm's hub:   python examples/hub_weights.py --model timm:resnet18
Offline, pass a local checkpoint instead:   python examples/hub_weights.py --model timm:resnet18 --weights FILE
(safetensors, or a .pth read with weights_only=True). The fit's fidelity and sizes are printed.
"""

import argparse

from recast import RecastConfig, RecastModel
from recast.backbones import load_backbone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="timm:vit_small_patch16_224")
    parser.add_argument("--weights", help="local checkpoint instead of the hub")
    parser.add_argument("--target", help="att, mlp, att+mlp or conv (default: att for a ViT, conv for a ResNet)")
    args = parser.parse_args()
    base = load_backbone(args.model, weights=args.weights)
    target = args.target or ("att" if hasattr(base, "blocks") else "conv")
    model = RecastModel.from_base(base, RecastConfig(target=target))
    report = model.mimicry_report
    print(f"{args.model}: {target}, weight relative error {report['weight_rel_error']:.2e}, "
          f"min cosine {report['weight_cosine_min']:.6f}, {report['seconds']:.2f}s")
    print(f"backbone {report['backbone_bytes']:,} bytes (original {report['original_bytes']:,}); "
          f"per task: {model.task_parameters('base')}")


if __name__ == "__main__":
    main()
