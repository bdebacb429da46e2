"""Ray Train pretraining: the driver (``driver.pretrain``), the per-worker loop (``worker.train_func``),
the cross-rank agreements (``sync``), what a run leaves behind (``outputs``) and the local-cluster CPU
budget (``cluster``)."""

from pipeline.train.driver import pretrain
from pipeline.train.sync import StopRun, check_targets_in_sync
from pipeline.train.worker import train_func

__all__ = ["StopRun", "check_targets_in_sync", "pretrain", "train_func"]
