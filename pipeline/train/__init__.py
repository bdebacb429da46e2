"""Ray Train pretraining: the driver (``driver.pretrain``), the per-worker loop (``worker.train_func``),
the cross-rank agreements (``sync``) and the local-cluster CPU budget (``cluster``)."""

from pipeline.train.driver import TrainingError, export_backbone, pretrain
from pipeline.train.sync import StopRun, TargetsOutOfSyncError, check_targets_in_sync
from pipeline.train.worker import train_func

__all__ = [
    "StopRun",
    "TargetsOutOfSyncError",
    "TrainingError",
    "check_targets_in_sync",
    "export_backbone",
    "pretrain",
    "train_func",
]
