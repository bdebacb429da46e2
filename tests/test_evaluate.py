import torch
import torch.nn.functional as F

from pipeline.evaluation.metrics import knn_accuracy, knn_predict, linear_probe_accuracy


def brute_force_knn(train, labels, test, num_classes, k, t):
    train = F.normalize(train, dim=1)
    preds = []
    for q in F.normalize(test, dim=1):
        sims = [(float(q @ train[i]), int(labels[i])) for i in range(train.shape[0])]
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * num_classes
        for s, y in sims[:k]:
            votes[y] += torch.exp(torch.tensor(s / t)).item()
        preds.append(max(range(num_classes), key=lambda c: votes[c]))
    return torch.tensor(preds)


def test_knn_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    train = torch.randn(300, 16, generator=g)
    labels = torch.randint(0, 5, (300,), generator=g)
    test = torch.randn(50, 16, generator=g)
    for k, t in [(1, 0.07), (20, 0.1), (200, 0.07)]:
        fast = knn_predict(train, labels, test, 5, k=k, temperature=t, chunk_size=7)
        assert torch.equal(fast, brute_force_knn(train, labels, test, 5, k, t)), (k, t)


def test_knn_and_linear_probe_on_separable_data():
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(4, 8, generator=g) * 5
    ytr, yte = torch.randint(0, 4, (400,), generator=g), torch.randint(0, 4, (100,), generator=g)
    xtr = centers[ytr] + torch.randn(400, 8, generator=g)
    xte = centers[yte] + torch.randn(100, 8, generator=g)
    assert knn_accuracy(xtr, ytr, xte, yte, k=20) > 0.95
    assert linear_probe_accuracy(xtr, ytr, xte, yte, epochs=30, batch_size=64) > 0.95
    # labels unrelated to features: chance level
    assert knn_accuracy(xtr, ytr[torch.randperm(400, generator=g)], xte, yte, k=20) < 0.5


def test_knn_over_a_bank_split_across_ranks_equals_the_whole_bank():
    from pipeline.evaluation.metrics import knn_neighbors, knn_vote, merge_neighbors

    gen = torch.Generator().manual_seed(0)
    bank, labels = torch.randn(300, 16, generator=gen), torch.randint(0, 5, (300,), generator=gen)
    queries = torch.randn(40, 16, generator=gen)
    whole = knn_vote(*knn_neighbors(bank, labels, queries, k=20), num_classes=5)
    parts = [knn_neighbors(bank[r::3], labels[r::3], queries, k=20) for r in range(3)]  # 3 "ranks"
    assert torch.equal(knn_vote(*merge_neighbors(parts, 20), num_classes=5), whole)


def test_features_in_channels_last_and_bf16_match_the_plain_forward():
    # extract_features feeds channels_last batches (and the monitor bf16 autocast): the same embedding as a plain
    # float32 forward of the contiguous batch, to float rounding (channels_last) or to bf16's precision.
    from pipeline.core.augment import normalize
    from pipeline.core.models import SmallCNN
    from pipeline.evaluation.metrics import extract_features

    torch.manual_seed(0)
    encoder = SmallCNN(1, 8).eval()
    images = torch.randint(0, 256, (300, 1, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        reference = encoder(normalize(images, [0.3], [0.35]))
    fp32 = extract_features(encoder, images, [0.3], [0.35], batch_size=128)
    torch.testing.assert_close(fp32, reference, rtol=1e-4, atol=1e-5)
    bf16 = extract_features(encoder, images, [0.3], [0.35], batch_size=128, autocast_dtype=torch.bfloat16)
    assert bf16.dtype == torch.float32 and (bf16 - reference).norm() <= 0.02 * reference.norm()
    assert not torch.equal(bf16, fp32)  # autocast did run
    same_neighbour = F.cosine_similarity(bf16[:, None], reference[None], dim=2).argmax(1) == torch.arange(300)
    assert same_neighbour.all()  # every image's nearest reference embedding is its own


def test_the_monitor_embeds_in_the_training_precision(monkeypatch):
    from pipeline.config import load_config
    from pipeline.evaluation import monitor as monitor_module

    calls = []

    def fake_extract(encoder, images, mean, std, device="cpu", autocast_dtype=None):
        calls.append(autocast_dtype)
        return torch.eye(3)[images[:, 0, 0, 0].long()]  # one-hot of the label stored in pixel (0, 0)

    monkeypatch.setattr(monitor_module, "extract_features", fake_extract)
    monkeypatch.setattr(
        monitor_module,
        "load_labelled",
        lambda *a, **k: (torch.tensor([0, 1, 2] * 4).view(-1, 1, 1, 1), torch.tensor([0, 1, 2] * 4)),
    )
    cfg = load_config("configs/fashion_mnist_cpu.yaml", ["eval.knn_k=3"])
    monitor = monitor_module.KnnMonitor(cfg, torch.device("cpu"), autocast_dtype=torch.bfloat16)
    assert monitor(torch.nn.Identity()) == 1.0 and calls == [torch.bfloat16, torch.bfloat16]  # queries, bank
