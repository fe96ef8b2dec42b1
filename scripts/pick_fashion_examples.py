#!/usr/bin/env python
"""Pick the shipped example images: held-out Fashion-MNIST test images that edgeprune-mini answers right.

For each class in --classes, the test split is walked in index order and the first image is kept
whose greedy answer to "What item of clothing is this?" names its class, both unpruned and pruned
as the README prunes it (--method divprune --keep 64), through the torch reference pipeline. The
images are picked to be answered right — they show what a right answer looks like, not how often
the model is right (docs/results.md measures that: 0.670 unpruned at n = 300). labels.json records
this rule, each image's test-split index and how many images of its class were skipped first.

    .venv/bin/python scripts/pick_fashion_examples.py --force
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "examples" / "fashion-mnist"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", default="Sneaker,Trouser,Bag,Ankle boot", help="comma-separated class names")
    p.add_argument("--method", default="divprune", help="the pruned check's method (the README's)")
    p.add_argument("--keep", type=int, default=64, help="the pruned check's K (the README's)")
    p.add_argument("--max-tries", type=int, default=40, help="give up on a class after this many images")
    p.add_argument("--out", type=Path, default=OUT, help=f"folder for the PNGs and labels.json (default {OUT})")
    p.add_argument("--force", action="store_true", help="overwrite the images and labels.json in --out")
    return p.parse_args(argv)


def main(argv=None) -> int:
    import torch
    from PIL import Image

    from edgeprune.eval.data import CLASSES, PROMPT, load_split, match_class
    from edgeprune.fileio import atomic_write
    from edgeprune.models import load
    from edgeprune.reference import generate

    args = parse_args(argv)
    labels_file = args.out / "labels.json"
    if labels_file.exists() and not args.force:
        raise SystemExit(f"{labels_file} exists; pass --force to overwrite it (or --out elsewhere)")
    wanted = [c.strip() for c in args.classes.split(",") if c.strip()]
    unknown = [c for c in wanted if c not in CLASSES]
    if unknown:
        raise SystemExit(f"--classes: unknown {unknown}; expected names from {', '.join(CLASSES)}")
    torch.manual_seed(0)
    adapter = load("edgeprune-mini")
    pruner = adapter.build_pruner(args.method, args.keep)
    images, labels = load_split("test")
    picked = []
    for name in wanted:
        label = CLASSES.index(name)
        candidates = [int(i) for i in (labels == label).nonzero()[0][:args.max_tries]]
        for tried, index in enumerate(candidates):
            answers = [generate(adapter, p, images[index], PROMPT, max_new_tokens=8).text[0] for p in (None, pruner)]
            if all(match_class(a) == label for a in answers):
                break
        else:
            raise SystemExit(f"{name}: none of the first {len(candidates)} test images answered right")
        file = f"{name.lower().replace(' ', '-')}.png"
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write(args.out / file, lambda tmp: Image.fromarray(images[index]).save(tmp, format="PNG"))
        picked.append({"file": file, "label": label, "class": name, "test_index": index,
                       "skipped_before": tried, "answer_unpruned": answers[0].strip(),
                       f"answer_{args.method}_k{args.keep}": answers[1].strip()})
        print(f"{file}: test image {index} ({name}), {tried} of its class skipped first; answers {answers}")
    record = {
        "source": "Fashion-MNIST test split (t10k, held out: the projector was aligned on the train split), "
                  "28x28 grey, saved unchanged",
        "prompt": PROMPT,
        "how_picked": (f"for each class, the first test image in index order that edgeprune-mini answers with its "
                       f"class name both unpruned and with {args.method} K={args.keep} (torch reference, greedy); "
                       "picked to be answered right, so they show a right answer, not the accuracy "
                       "(docs/results.md: 0.670 unpruned, n = 300)"),
        "script": "scripts/pick_fashion_examples.py",
        "images": picked,
    }
    atomic_write(labels_file, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2) + "\n"))
    print(f"wrote {labels_file}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
