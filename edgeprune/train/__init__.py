"""AutoSelect training (METHODS.md, AutoSelect): soft top-K, VP noise gate, diagonal-attention Denoiser,
and the loop that trains the Scorer (edgeprune.pruners.autoselect) on a frozen VLM. Data: train/data.py."""
from edgeprune.train.denoiser import Denoiser
from edgeprune.train.noise_gate import vp_gate
from edgeprune.train.soft_topk import soft_topk, zscore
from edgeprune.train.trainer import Batch, Trainer, TrainConfig, lr_at, tau_at

__all__ = ["soft_topk", "zscore", "vp_gate", "Denoiser", "Trainer", "TrainConfig", "Batch", "tau_at", "lr_at"]
