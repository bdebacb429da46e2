"""Representation quality: features, weighted kNN and linear probe (``metrics``), the distributed kNN monitor
used during pretraining (``monitor``) and ``byol eval`` (``checkpoint_eval``)."""
