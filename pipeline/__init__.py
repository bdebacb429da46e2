"""byol-ray: BYOL pretraining. ``pipeline.core`` (networks, loss and EMA, step, schedules, plan, optimizers,
augmentations, images, checkpoints, storage) is plain PyTorch and never imports Ray; data, evaluation, train, tune
and cli are thin layers around it (Ray Data, Ray Train, Ray Tune, MLflow)."""

__version__ = "0.1.0"
