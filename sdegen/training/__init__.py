r"""Training: denoising score-matching losses, EMA, the resumable [`train`][sdegen.training.train] loop and checkpoints."""

from .checkpoint import CheckpointError, load
from .ema import EMA
from .losses import WEIGHTINGS, ddpm_loss, dsm_loss, sample_time, smld_loss
from .trainer import LOSSES, OPTIMIZERS, Trainer, TrainingDivergedError, TrainResult, train

__all__ = ["dsm_loss", "smld_loss", "ddpm_loss", "sample_time", "EMA", "train", "Trainer", "TrainResult",
           "TrainingDivergedError", "load", "CheckpointError", "WEIGHTINGS", "LOSSES", "OPTIMIZERS"]
