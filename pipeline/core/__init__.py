"""The BYOL core in plain PyTorch: networks, loss and EMA, step, schedules and run plan, optimizers,
augmentations, image decoding and checkpoint state. Nothing here imports Ray or MLflow (a test walks this package)."""
