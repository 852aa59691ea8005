"""LD3 training: the time-grid parameterisation, losses, teacher generation/caching and the trainer."""
from .losses import LPIPSLoss, LossUnavailableError, PseudoHuberLoss, get_loss
from .parameterization import TimeParameterization, init_timesteps
from .teacher import (TeacherCache, TeacherCacheError, TeacherCacheMismatch, TeacherCacheTooLarge,
                      generate_teacher_data, make_teacher, model_identity)
from .trainer import CheckpointMismatchError, LD3Trainer, NonFiniteLossError, check_nfe

__all__ = ["LD3Trainer", "NonFiniteLossError", "CheckpointMismatchError", "check_nfe", "TimeParameterization",
           "init_timesteps", "get_loss", "LPIPSLoss", "PseudoHuberLoss", "LossUnavailableError", "TeacherCache",
           "TeacherCacheError", "TeacherCacheMismatch", "TeacherCacheTooLarge", "generate_teacher_data",
           "make_teacher", "model_identity"]
