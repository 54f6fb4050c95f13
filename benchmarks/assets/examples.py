"""Example PNGs for the README's curl calls: seen classes the demo model gets right.

python -m benchmarks.assets.examples --model server/models/demo --out docs/examples
"""

from __future__ import annotations

import argparse
from pathlib import Path

import open_clip
import torch
from PIL import Image

from benchmarks import demo_eval
from benchmarks._lib import synthetic

EXAMPLES = {
    "red_star": ("red", "star", "plain"),
    "blue_square": ("blue", "square", "striped"),
    "green_circle": ("green", "circle", "dotted"),
}


def render_example(colour: str, shape: str, background: str, seed: int) -> torch.Tensor:
    """One large object of the given class on the given background; [1, 3, 64, 64]."""
    gen = torch.Generator().manual_seed(seed)
    label = synthetic.COLOUR_NAMES.index(colour) * len(synthetic.SHAPES) + synthetic.SHAPES.index(shape)
    attrs = {
        "labels": torch.tensor([label]),
        "colour": torch.tensor([label // len(synthetic.SHAPES)]),
        "shape": torch.tensor([label % len(synthetic.SHAPES)]),
        "size": torch.tensor([1]),
        "count": torch.tensor([1]),
        "background": torch.tensor([synthetic.BACKGROUNDS.index(background)]),
    }
    return synthetic.render(attrs, gen).images


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=Path("server/models/demo"))
    p.add_argument("--out", type=Path, default=Path("docs/examples"))
    args = p.parse_args()
    model, tokenizer, pre = demo_eval.load_folder(args.model)
    _, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{args.model}")
    classes = demo_eval.class_embeddings(model, tokenizer, synthetic.CLASS_NAMES, synthetic.TEMPLATES)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, (colour, shape, background) in EXAMPLES.items():
        for seed in range(100):  # the first rendering the model classifies correctly and confidently
            img = render_example(colour, shape, background, seed)
            probs = demo_eval.zero_shot_logits(model, img, classes, pre["mean"], pre["std"]).softmax(-1)[0]
            if synthetic.CLASS_NAMES[int(probs.argmax())] == f"{colour} {shape}" and probs.max() > 0.5:
                break
        else:
            raise SystemExit(f"no correctly classified rendering of {colour} {shape}")
        pixels = (img[0].permute(1, 2, 0) * 255).round().byte().numpy()  # [64, 64, 3]
        Image.fromarray(pixels).save(args.out / f"{name}.png")
        # Check the file as the server sees it: PNG decode plus open_clip's own eval transform.
        x = preprocess(Image.open(args.out / f"{name}.png")).unsqueeze(0)  # [1, 3, 64, 64]
        with torch.no_grad():
            served = synthetic.CLASS_NAMES[int(demo_eval.raw_logits(model, x, classes).argmax())]
        assert served == f"{colour} {shape}", (name, served)
        print(f"{name}.png: seed {seed}, predicted '{served}' p={probs.max():.2f}")


if __name__ == "__main__":
    main()
