"""Train an AutoSelect Scorer on a frozen VLM with the noise-gated objective (METHODS.md, AutoSelect).

Writes CKPT (the Scorer, what `edgeprune export --method autoselect --scorer CKPT` reads) and
CKPT.trainer.pt beside it (Denoiser, optimizer, step, RNG: what --resume continues from).
Data: a JSONL file of {"image": path, "prompt": ..., "answer": ...}; make one from offline data with
`python -m edgeprune.train.data {skimage,fashion-mnist} OUT_DIR`.
edgeprune-mini's Scorer is trained by scripts/train_mini_scorer.py (cached Fashion-MNIST features, the same
Trainer and options: --keeps, --llm-tokens).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def add_parser(subparsers):
    from edgeprune.cli.args import add_model_arg

    p = subparsers.add_parser("train", help=__doc__.splitlines()[0], description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arg(p, required=True)
    p.add_argument("--data", type=Path, required=True, help="training JSONL (image, prompt, answer)")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--keep", type=int, help="token budget K the Scorer is trained for")
    budget.add_argument("--keeps", metavar="K,K,...", help="several budgets for one Scorer, trained in turn (step s: "
                        "the (s mod count)-th), e.g. 8,16,32,64,128")
    p.add_argument("--steps", type=int, required=True, help="total optimisation steps (the schedules span these)")
    p.add_argument("--out", type=Path, required=True, help="Scorer checkpoint to write (.safetensors)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default: 1e-4)")
    p.add_argument("--batch-size", type=int, default=2, help="examples per step (default: 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation, data order and noise (default: 0)")
    p.add_argument("--resume", action="store_true", help="continue from --out and its .trainer.pt")
    p.add_argument("--depth", type=int, help="Scorer Transformer blocks (default: autoselect.DEFAULT_DEPTH, 1)")
    p.add_argument("--width", type=int, help="Scorer width after a down-projection of the encoder features "
                   "(default: autoselect.DEFAULT_WIDTH, 128; 0: the encoder width, METHODS.md's original scorer)")
    p.add_argument("--llm-tokens", type=float, default=0.0, metavar="F",
                   help="only the ceil(F*K) top-scored tokens reach the LLM (cheaper steps; default 0: all N)")
    p.add_argument("--denoise", choices=("all", "dropped"), default="all",
                   help="Denoiser on every token (all, METHODS.md; default) or its change weighted by 1 - alpha "
                        "(dropped: kept tokens reach the projector unchanged, as at inference)")
    p.add_argument("--autocast", action="store_true", help="run the frozen VLM in bfloat16 autocast")
    p.add_argument("--warmup", type=int, help="learning-rate warmup steps (default: 5%% of --steps)")
    p.add_argument("--tau-start", type=float, default=1.0, help="soft top-K temperature at step 0 (default: 1.0)")
    p.add_argument("--tau-end", type=float, default=0.05, help="temperature at the last step (default: 0.05)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip (default: 1.0)")
    p.add_argument("--save-every", type=int, default=0, help="also checkpoint every N steps (default: only at the end)")
    p.add_argument("--device", default="cpu", help="torch device of the VLM and the trained modules (default: cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run(args) -> int:
    import torch

    from edgeprune.errors import EdgepruneError
    from edgeprune.models import load
    from edgeprune.pruners.autoselect import DEFAULT_DEPTH, DEFAULT_WIDTH, Scorer
    from edgeprune.train.data import ExampleBatches, load_examples
    from edgeprune.train.denoiser import Denoiser
    from edgeprune.train.trainer import Trainer, TrainConfig, state_path

    keeps = ()
    if args.keeps is not None:
        try:
            keeps = tuple(int(k) for k in args.keeps.split(",") if k.strip())
        except ValueError:
            raise EdgepruneError(f"--keeps {args.keeps!r}: expected comma-separated integers, e.g. 8,16,32") from None
        if not keeps:
            raise EdgepruneError(f"--keeps {args.keeps!r}: expected at least one budget")
    keep = max(keeps) if keeps else args.keep
    config = TrainConfig(keep=keep, steps=args.steps, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                         warmup=args.warmup, grad_clip=args.grad_clip, tau_start=args.tau_start,
                         tau_end=args.tau_end, save_every=args.save_every, keeps=keeps,
                         llm_tokens=args.llm_tokens, autocast=args.autocast, denoise=args.denoise)
    if args.resume and not state_path(args.out).is_file():
        raise EdgepruneError(f"--resume: {state_path(args.out)} does not exist; train without --resume first")
    if not args.resume and state_path(args.out).is_file():
        raise EdgepruneError(f"{args.out} already has a trainer state; pass --resume to continue it "
                             "or choose another --out")
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        raise EdgepruneError(f"--device {args.device!r}: {err}") from err
    examples = load_examples(args.data)
    adapter = load(args.model).to(device)
    n = adapter.num_image_tokens
    bad = [k for k in keeps or (keep,) if not 1 <= k <= n]
    if bad:
        raise EdgepruneError(f"--{'keeps' if keeps else 'keep'} {bad[0]}: expected 1 <= keep <= N={n} image "
                             f"tokens of {args.model}")
    batches = ExampleBatches(adapter, examples, batch_size=args.batch_size, seed=args.seed)
    dim = batches(0).feats.shape[-1]
    torch.manual_seed(args.seed)  # seeded initialisation of the Scorer and Denoiser
    width = DEFAULT_WIDTH if args.width is None else args.width
    scorer = Scorer(dim, depth=DEFAULT_DEPTH if args.depth is None else args.depth,
                    width=min(width, dim) if width else None).to(device)
    denoiser = Denoiser(dim).to(device)
    trainer = Trainer(adapter, scorer, denoiser, config, batches)
    if args.resume:
        trainer.resume(args.out)
        log.info("resumed %s at step %d of %d", args.out, trainer.step, config.steps)
    log.info("training %d -> %d steps, K=%s of N=%d, %d examples, batch %d", trainer.step, config.steps,
             ",".join(map(str, keeps)) if keeps else keep, n, len(examples), args.batch_size)
    losses = trainer.train(checkpoint=args.out, progress=not (args.no_progress or args.quiet))
    done = len(trainer.step_seconds)
    if losses:
        head, tail = losses[:max(1, len(losses) // 10)], losses[-max(1, len(losses) // 10):]
        log.info("loss %.4f (first %d steps) -> %.4f (last %d); %.3f s/step", sum(head) / len(head), len(head),
                 sum(tail) / len(tail), len(tail), sum(trainer.step_seconds) / max(done, 1))
    print(f"wrote {args.out} (step {trainer.step}/{config.steps}); use it with "
          f"`edgeprune export --method autoselect --scorer {args.out} --keep {keep}`")
    return 0
