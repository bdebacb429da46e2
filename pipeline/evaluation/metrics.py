"""Representation quality of a frozen encoder: weighted kNN and a linear probe on cached features.

Always evaluate the ONLINE encoder (what BYOL keeps), in eval mode.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.augment import normalize
from pipeline.core.step import autocast


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    images: torch.Tensor,
    mean: list[float],
    std: list[float],
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Features of uint8 images [N, C, H, W] (resized by the caller), encoder in eval mode, as float32.

    Batches go in channels_last, the training worker's layout (faster on CPUs: ``bench/embed_throughput.py``).
    ``autocast_dtype``: the kNN monitor passes the run's training precision; ``byol eval`` keeps float32.
    """
    was_training = encoder.training
    encoder.eval()
    device = torch.device(device)
    feats = []
    with autocast(device.type, autocast_dtype):
        for start in range(0, images.shape[0], batch_size):
            batch = normalize(images[start : start + batch_size].to(device), mean, std)
            feats.append(encoder(batch.contiguous(memory_format=torch.channels_last)).float().cpu())
    encoder.train(was_training)
    return torch.cat(feats)


@torch.no_grad()
def knn_neighbors(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    k: int = 200,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cosine similarities, labels) of the k nearest training features of every test feature, nearest first.

    A memory bank split across ranks gives the same result as a whole one: take each part's k nearest, then
    the k nearest of those (``merge_neighbors``).
    """
    train = F.normalize(train_features.float(), dim=1)
    k = min(k, train.shape[0])
    sims, labels = [], []
    for start in range(0, test_features.shape[0], chunk_size):
        test = F.normalize(test_features[start : start + chunk_size].float(), dim=1)
        sim, idx = (test @ train.T).topk(k, dim=1)
        sims.append(sim)
        labels.append(train_labels[idx])
    return torch.cat(sims), torch.cat(labels)


def merge_neighbors(parts: list[tuple[torch.Tensor, torch.Tensor]], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest of several ``knn_neighbors`` results over disjoint parts of a bank (same queries)."""
    sims = torch.cat([p[0] for p in parts], dim=1)
    labels = torch.cat([p[1] for p in parts], dim=1)
    sims, idx = sims.topk(min(k, sims.shape[1]), dim=1)
    return sims, labels.gather(1, idx)


def knn_vote(sims: torch.Tensor, labels: torch.Tensor, num_classes: int, temperature: float = 0.07) -> torch.Tensor:
    """Weighted kNN (Wu et al. 2018): the neighbours vote with weight exp(sim / T)."""
    votes = torch.zeros(sims.shape[0], num_classes)
    votes.scatter_add_(1, labels, (sims / temperature).exp())
    return votes.argmax(dim=1)


def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Weighted kNN (Wu et al. 2018): cosine similarity, the k nearest vote with weight exp(sim / T)."""
    sims, labels = knn_neighbors(train_features, train_labels, test_features, k, chunk_size)
    return knn_vote(sims, labels, num_classes, temperature)


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 200,
    temperature: float = 0.07,
) -> float:
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    pred = knn_predict(train_features, train_labels, test_features, num_classes, k, temperature)
    return float((pred == test_labels).float().mean())


def linear_probe_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    epochs: int = 100,
    batch_size: int = 1024,
    lr: float = 0.1,
    seed: int = 0,
) -> float:
    """A linear classifier on frozen, cached features: SGD Nesterov, cosine LR, no weight decay (paper).

    Features are standardised with the training set's statistics (a frozen BatchNorm without affine).
    """
    gen = torch.Generator().manual_seed(seed)
    mu, sd = train_features.mean(0), train_features.std(0) + 1e-6
    xtr, xte = (train_features - mu) / sd, (test_features - mu) / sd
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    with torch.random.fork_rng():  # the same probe for the same features, without touching the caller's RNG
        torch.manual_seed(seed)
        clf = nn.Linear(xtr.shape[1], num_classes)
    opt = torch.optim.SGD(clf.parameters(), lr=lr, momentum=0.9, nesterov=True)
    steps_per_epoch = math.ceil(xtr.shape[0] / batch_size)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    for _ in range(epochs):
        perm = torch.randperm(xtr.shape[0], generator=gen)
        for start in range(0, xtr.shape[0], batch_size):
            idx = perm[start : start + batch_size]
            loss = F.cross_entropy(clf(xtr[idx]), train_labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        return float((clf(xte).argmax(1) == test_labels).float().mean())
