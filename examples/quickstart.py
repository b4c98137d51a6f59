"""Mimic a timm ViT with RECAST-Att, learn two tasks, switch between them, export one, reload.

Run:  python examples/quickstart.py [--out DIR]
"""

import argparse

import torch

from recast import RecastModel
from recast.quickstart import run_quickstart, synthetic_task
from recast.recipe import create_timm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/quickstart")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    base = create_timm("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=96, depth=4, num_heads=3,
                       num_classes=10)  # timm model + the recipe that rebuilds it on load
    summary = run_quickstart(base, args.out, steps=args.steps)
    print({k: v for k, v in summary.items() if k != "mimicry"})
    model = RecastModel.from_pretrained(args.out)  # backbone once + one small file per task
    model.set_task("corners")
    images, _ = synthetic_task(4, 16, 32, seed=2)
    plain = model.export("corners").eval()  # an ordinary timm ViT with the generated weights
    with torch.no_grad():
        print("export matches:", torch.allclose(plain(images), model.eval()(images), atol=1e-5))


if __name__ == "__main__":
    main()
