"""byol-ray: BYOL pretraining. The core (config, models, augment, schedules, optim, evaluate, step, sources)
is plain PyTorch and never imports Ray; Ray, Tune and MLflow live in thin layers around it."""

__version__ = "0.1.0"
