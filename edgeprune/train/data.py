"""Training data for AutoSelect: a JSONL format, its loader, and builders from data that installs offline.

Format: one JSON object per line,

    {"image": "images/train_00000.png", "prompt": "What item of clothing is this?", "answer": "Ankle boot"}

`image` is a path, absolute or relative to the JSONL file's folder; `prompt` is the user text that goes
into the model's chat template after the image; `answer` is the target the NLL is taken on. Blank
lines are skipped; other keys are ignored (room for ids or metadata).

Builders (each writes a JSONL file and returns its path):
- `write_skimage_dataset`: the photos shipped in scikit-image's data folder, one question each.
- `write_fashion_mnist`: Debian's `dataset-fashion-mnist` (IDX gz under /usr/share/datasets/fashion-mnist/),
  each 28x28 image saved as PNG, "What item of clothing is this?" -> the class name.
`python -m edgeprune.train.data {skimage,fashion-mnist} OUT_DIR [--split test] [--limit 1000]` runs them.

`ExampleBatches` turns examples into training batches for a model adapter: it tokenises with the
model's chat template and caches the frozen encoder's features per image (the encoder is the same at
every step, so each image is encoded once while the cache has room).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


from edgeprune.errors import EdgepruneError
from edgeprune.eval.data import CLASSES, DEFAULT_DATA_DIR, PROMPT, load_split, read_idx

__all__ = ["Example", "ExampleBatches", "answer_ids", "load_examples", "write_examples", "write_skimage_dataset",
           "write_fashion_mnist", "read_idx", "FASHION_MNIST_DIR", "FASHION_MNIST_CLASSES", "FASHION_PROMPT", "SKIMAGE_PROMPT"]

# One Fashion-MNIST reader, prompt and answer set for training and evaluation (edgeprune/eval/data.py):
# the answers are the ones the shipped mini projector was aligned with.
FASHION_MNIST_DIR = DEFAULT_DATA_DIR
FASHION_MNIST_CLASSES = CLASSES
FASHION_PROMPT = PROMPT
SKIMAGE_PROMPT = "What is shown in this image? Answer in a few words."
# File in skimage/data -> what it shows (only photos and scans that ship with the wheel, no downloads).
SKIMAGE_PHOTOS = {
    "astronaut.png": "an astronaut", "chelsea.png": "a cat", "coffee.png": "a cup of coffee",
    "rocket.jpg": "a rocket", "motorcycle_left.png": "a motorcycle", "horse.png": "a horse",
    "camera.png": "a man with a camera", "coins.png": "coins", "hubble_deep_field.jpg": "galaxies",
    "page.png": "a page of text", "moon.png": "the surface of the moon", "brick.png": "a brick wall",
    "grass.png": "grass", "gravel.png": "gravel", "retina.jpg": "a retina", "clock_motion.png": "a clock",
}


@dataclass(frozen=True)
class Example:
    image: Path    # resolved path
    prompt: str
    answer: str


def load_examples(path: str | Path) -> list[Example]:
    """Read a JSONL file of {"image", "prompt", "answer"}; errors name the file, line and problem."""
    path = Path(path)
    if not path.is_file():
        raise EdgepruneError(f"training data {path}: no such file; expected a JSONL file of "
                             '{"image": ..., "prompt": ..., "answer": ...} lines')
    examples = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise EdgepruneError(f"{where}: not JSON ({err})") from err
        if not isinstance(obj, dict):
            raise EdgepruneError(f"{where}: a {type(obj).__name__}, expected an object with image, prompt, answer")
        for key in ("image", "prompt", "answer"):
            if not isinstance(obj.get(key), str) or not obj[key]:
                raise EdgepruneError(f"{where}: '{key}' is {obj.get(key)!r}, expected a non-empty string")
        image = Path(obj["image"]).expanduser()
        image = image if image.is_absolute() else path.parent / image
        if not image.is_file():
            raise EdgepruneError(f"{where}: image {image} does not exist")
        examples.append(Example(image=image, prompt=obj["prompt"], answer=obj["answer"]))
    if not examples:
        raise EdgepruneError(f"training data {path}: no examples")
    return examples


def write_examples(path: str | Path, rows: list[dict]) -> Path:
    """Write rows {"image", "prompt", "answer"} as JSONL (image paths as given)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({"image": str(r["image"]), "prompt": r["prompt"], "answer": r["answer"]}) + "\n")
    return path


def write_skimage_dataset(out_dir: str | Path) -> Path:
    """JSONL over scikit-image's shipped photos (absolute paths into the installed package)."""
    try:
        import skimage.data
    except ImportError as err:
        raise EdgepruneError("scikit-image is not installed: pip install scikit-image") from err
    data_dir = Path(skimage.data.__file__).parent
    rows = [{"image": data_dir / name, "prompt": SKIMAGE_PROMPT, "answer": answer}
            for name, answer in SKIMAGE_PHOTOS.items() if (data_dir / name).is_file()]
    if not rows:
        raise EdgepruneError(f"no scikit-image photos found in {data_dir}")
    return write_examples(Path(out_dir) / "skimage.jsonl", rows)


def write_fashion_mnist(out_dir: str | Path, split: str = "train", limit: int | None = None,
                        root: str | Path = FASHION_MNIST_DIR) -> Path:
    """Fashion-MNIST `split` ("train" 60k or "test" 10k; the first `limit`) -> PNGs + JSONL in out_dir."""
    from PIL import Image

    images, labels = load_split(split, root)
    count = images.shape[0] if limit is None else min(int(limit), images.shape[0])
    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        name = f"images/{split}_{i:05d}.png"
        Image.fromarray(images[i]).save(out_dir / name)
        rows.append({"image": name, "prompt": FASHION_PROMPT, "answer": FASHION_MNIST_CLASSES[int(labels[i])]})
    return write_examples(out_dir / f"fashion_mnist_{split}.jsonl", rows)


def answer_ids(tokenizer, suffix_template: str, answer: str, eos: int | None) -> list[int]:
    """Target ids of `answer`: a space first when the template's suffix does not end in whitespace
    (LLaVA's "ASSISTANT:" -> " cat"), then EOS so the model also learns to stop."""
    text = answer if not suffix_template or suffix_template[-1].isspace() else " " + answer
    ids = list(tokenizer.encode(text, add_special_tokens=False).ids)
    return ids + ([int(eos)] if eos is not None else [])


class ExampleBatches:
    """`batches(step) -> Batch` over `examples` for the trainer: a pure function of (seed, step).

    Sample order: example j of the run (j = step * batch_size + i) is permutation(epoch)[j % len], each
    epoch's permutation seeded by (seed, epoch). Features come from `adapter.encode(need=("feats",))`
    under no_grad, cached per image path for up to `cache_limit` images.
    """

    def __init__(self, adapter, examples: list[Example], batch_size: int, seed: int = 0, cache_limit: int = 1024):
        from edgeprune.runtime.prompt import encode_prompt

        if not examples:
            raise EdgepruneError("train: no examples")
        self.adapter, self.examples = adapter, list(examples)
        self.batch_size, self.seed, self.cache_limit = batch_size, seed, cache_limit
        self._feats: dict[Path, object] = {}
        self._perms: dict[int, list[int]] = {}
        eos = adapter.eos_token_ids[0] if getattr(adapter, "eos_token_ids", ()) else None
        self._ids = []
        for ex in self.examples:
            prefix, suffix = encode_prompt(adapter.tokenizer, adapter.chat_template, ex.prompt)
            self._ids.append((prefix, suffix, answer_ids(adapter.tokenizer, adapter.chat_template.suffix,
                                                         ex.answer, eos)))

    def _perm(self, epoch: int) -> list[int]:
        import torch

        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms[epoch] = torch.randperm(len(self.examples), generator=g).tolist()
        return self._perms[epoch]

    def indices(self, step: int) -> list[int]:
        n = len(self.examples)
        return [self._perm(j // n)[j % n] for j in range(step * self.batch_size, (step + 1) * self.batch_size)]

    def features(self, paths: list[Path]):
        """Encoder features [B, N, C] of `paths` (float32), encoding only the uncached ones, in one batch."""
        import torch

        missing = list(dict.fromkeys(p for p in paths if p not in self._feats))
        fresh = {}
        if missing:
            is_module = isinstance(self.adapter, torch.nn.Module)
            device = next(self.adapter.parameters()).device if is_module else "cpu"
            with torch.no_grad():
                pixels = self.adapter.preprocess([str(p) for p in missing]).to(device)
                feats = self.adapter.encode(pixels, need=("feats",)).feats.float().cpu()  # [M, N, C], kept on the CPU
            for p, f in zip(missing, feats):
                fresh[p] = f
                if len(self._feats) < self.cache_limit:
                    self._feats[p] = f
        return torch.stack([self._feats.get(p, fresh.get(p)) for p in paths])

    def __call__(self, step: int):
        from edgeprune.train.trainer import Batch

        idx = self.indices(step)
        feats = self.features([self.examples[i].image for i in idx])
        return Batch(feats=feats, prefix=[self._ids[i][0] for i in idx], suffix=[self._ids[i][1] for i in idx],
                     answer=[self._ids[i][2] for i in idx], meta={"indices": idx})


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m edgeprune.train.data",
                                     description="Write an AutoSelect training JSONL from offline data.")
    parser.add_argument("source", choices=("skimage", "fashion-mnist"))
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--split", default="train", choices=("train", "test"), help="fashion-mnist split")
    parser.add_argument("--limit", type=int, help="fashion-mnist: only the first LIMIT images")
    args = parser.parse_args(argv)
    try:
        if args.source == "skimage":
            out = write_skimage_dataset(args.out_dir)
        else:
            out = write_fashion_mnist(args.out_dir, split=args.split, limit=args.limit)
    except EdgepruneError as err:
        print(f"error: {err}")
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
