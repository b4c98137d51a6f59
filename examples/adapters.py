"""Combine RECAST with an adapter: RECAST-Att plus AdaptFormer, one task trained, exported, reloaded.

Run:  python examples/adapters.py [--out DIR] [--steps N]
"""

import argparse

import torch
import torch.nn.functional as F

from recast.methods import build_method, load_method
from recast.quickstart import synthetic_task
from recast.recipe import create_timm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/adapters")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    base = create_timm("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=96, depth=4, num_heads=3,
                       num_classes=10)
    model = build_method("recast+adaptformer", base, groups=2, rank=2)  # RECAST-Att + a bottleneck per block
    model.add_task("quadrants", num_classes=4)
    model.set_task("quadrants")
    print("per-task numbers:", model.task_parameters("quadrants"))
    images, labels = synthetic_task(4, 128, 32, seed=1)
    optimiser = torch.optim.AdamW(model.param_groups(2e-2), lr=2e-2)
    model.train()
    for _ in range(args.steps):
        optimiser.zero_grad()
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimiser.step()
    model.eval()
    model.save_pretrained(args.out)
    reloaded = load_method(args.out).eval()
    reloaded.set_task("quadrants")
    with torch.no_grad():
        print(f"loss {loss.item():.3f}; reloaded equals trained:", torch.equal(reloaded(images), model(images)))
        print("export equals trained:", torch.allclose(model.export("quadrants").eval()(images), model(images), atol=1e-5))


if __name__ == "__main__":
    main()
