"""The reference's defended train step in PyTorch: VGG11-BN cut 4 + noise + CEM (benchmark only).

What the official code (github.com/xiasong0501/CEM, ``model_training_paral_pruning.py``) runs per
batch for ``noise + CEM`` (reference spec §2.1, §3.1, §4.3-4.4, §5.1), written again here, NCHW:

* **batch**: the host gathers ``batch`` rows of a fixed uint8 ``[N, H, W, 3]`` dataset (random
  labels) by index, as :mod:`benchmarks.train_step`'s JAX step is fed; then the augmentation of
  :func:`cem_jax.data.augment` on the batch tensor (zero-pad 4, a random ``H x W`` crop and a
  random horizontal flip per image: torchvision ``RandomCrop(pad 4)`` + ``RandomHorizontalFlip``,
  which the reference runs in its DataLoader workers, and the JAX step runs on the device), and
  the CIFAR-10 normalisation;
* **client** ``f``: conv64-BN-ReLU, pool, conv128-BN-ReLU, pool, the ``C8S1`` bottleneck (conv
  128 → 8, 3x3, bias, no ReLU), sigmoid: ``[B, 8, 8, 8]`` at 32 px; Xavier-uniform init, zero bias;
* **noise**: ``z_n = z + σ·ε``, σ = 0.1, ε fresh per step;
* **server** (PyTorch default init): conv 8 → 128 (no BN / ReLU), the rest of VGG11-BN cfg 'A'
  after entry 4, flatten, Dropout(0.5) → Linear(512, 512) → ReLU → Dropout(0.5) → Linear(512, 512)
  → ReLU → Linear(512, C); cross-entropy;
* **CEM** (``compute_class_means``, ``log_entropy = 1``: the ``mode="reference"`` hinge of
  :func:`cem_jax.entropy.cem_loss`), in the official code's form: the batch sorted by label, the
  per-sample stacks of its class's centroids / weights / variances, ``torch.cdist`` to the own-class
  centroids, the argmin on the host (numpy), then Python loops over the classes present and over
  the clusters present in each: ``μ = 10·n/(π·N_class)`` (0.99 when ≥ 1),
  ``v = μ·mean((z − c)²) + (1 − μ)·v̄``, ``π·relu(log(v + γ) − log(τσ² + γ))`` (γ 0.01, τ 0.125),
  summed and divided by the number of classes present. One deliberate change: π and v̄ are those of
  the class itself (the class's first sorted sample), not the reference's ``lb_count`` slip (same
  cost; cem_jax fixes it too). The mixture state is fixed and random (C x K centroids in (0, 1),
  Dirichlet weights, variances around 0.01, ``N_class`` = 5000): only the speed is measured;
* **gradient routing**, by default as the reference: ``L_C.backward(retain_graph=True)``, the
  client's gradients copied, all gradients zeroed, ``CE.backward()``, then
  ``grad += λ·s(lr)·g_CEM`` on every client parameter, ``s(lr) = 0.001/lr`` (λ 16 at lr 0.05 → 0.32,
  the λ of cem_jax's ``cem_noise`` preset under its ``inverse_lr`` schedule).
  ``separate_backward=False`` runs one backward of ``CE + λ·s(lr)·L_C`` instead: the same
  gradients (``L_C`` depends on the client only), one client backward fewer — what cem_jax does;
* **update**: two SGDs as the reference (client; server + head), lr 0.05, momentum 0.9, coupled
  weight decay 5e-4 on every parameter (= ``optax.chain(add_decayed_weights(5e-4), sgd(0.05, 0.9))``).

:func:`make_step` returns a zero-argument callable running one such step and returning the loss
``CE + λ·s(lr)·L_C`` (a detached tensor: a CPU step is synchronous, so it is ready on return).

Imported lazily by :mod:`benchmarks.train_step`; torch is not a dependency of the package (the
``bench`` extra installs it). Without torch, importing this module raises ``ImportError`` saying so.
"""

from __future__ import annotations

import numpy as np

try:
    import torch
    import torch.nn.functional as F
    from torch import nn
except ImportError as e:  # pragma: no cover - the branch depends on the environment
    raise ImportError(
        "benchmarks.torch_train_step needs PyTorch, which cem_jax does not depend on: "
        'pip install torch (a CPU build is enough), or pip install -e ".[bench]"'
    ) from e

CFG_A = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.247, 0.243, 0.261)


def _vgg_layers(entries, c_in: int) -> list[nn.Module]:
    out: list[nn.Module] = []
    for v in entries:
        if v == "M":
            out.append(nn.MaxPool2d(2, 2))
        else:
            out += [nn.Conv2d(c_in, int(v), 3, padding=1), nn.BatchNorm2d(int(v)), nn.ReLU()]
            c_in = int(v)
    return out


def _channels(entries) -> int:
    return int([v for v in entries if v != "M"][-1])


def build_model(
    num_classes: int = 10, image_size: int = 32, cut: int = 4, bottleneck: int = 8
) -> tuple[nn.Module, nn.Module, nn.Module]:
    """``(client, server, classifier)`` of ``vgg11_bn_sgm`` at ``cut`` with the ``C{bottleneck}S1``
    bottleneck (reference §2.1, init §2.4)."""
    c = _channels(CFG_A[:cut])
    client = nn.Sequential(
        *_vgg_layers(CFG_A[:cut], 3), nn.Conv2d(c, bottleneck, 3, padding=1), nn.Sigmoid()
    )
    for m in client.modules():  # init_weights: the client only
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    server = nn.Sequential(nn.Conv2d(bottleneck, c, 3, padding=1), *_vgg_layers(CFG_A[cut:], c))
    side = image_size // 2 ** CFG_A.count("M")
    classifier = nn.Sequential(
        nn.Dropout(0.5),
        nn.Linear(512 * side * side, 512),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(512, 512),
        nn.ReLU(),
        nn.Linear(512, num_classes),
    )
    return client, server, classifier


def random_mixture(num_classes: int, clusters: int, dim: int, seed: int = 0):
    """A fixed random mixture state ``(centroids [C, K, D], weights [C, K], variances [C, K, D])``."""
    rng = np.random.default_rng(seed)
    centroids = rng.uniform(0.0, 1.0, (num_classes, clusters, dim)).astype(np.float32)
    weights = rng.dirichlet(np.full(clusters, 5.0), num_classes).astype(np.float32)
    variances = rng.uniform(0.005, 0.02, (num_classes, clusters, dim)).astype(np.float32)
    return centroids, weights, variances


def augment(images: torch.Tensor, padding: int = 4) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` -> float ``[B, H, W, 3]`` in [0, 1]: a random crop of the zero-padded
    image and a random horizontal flip, per image (:func:`cem_jax.data.augment`)."""
    b, h, w, c = images.shape
    padded = images.new_zeros((b, h + 2 * padding, w + 2 * padding, c))
    padded[:, padding : padding + h, padding : padding + w] = images
    off = torch.randint(0, 2 * padding + 1, (b, 2))
    rows = off[:, :1] + torch.arange(h)  # [B, H]
    cols = off[:, 1:] + torch.arange(w)  # [B, W]
    flip = torch.rand(b) < 0.5
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    crop = padded[torch.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]
    return crop.float() / 255.0


def cem_loss_reference(
    features: torch.Tensor,
    labels: torch.Tensor,
    centroids_list: list[torch.Tensor],
    weights_list: list[torch.Tensor],
    variances_list: list[torch.Tensor],
    class_length: float,
    sigma: float,
    *,
    tau: float = 0.125,
    gamma: float = 0.01,
    kappa: float = 10.0,
) -> torch.Tensor:
    """The official ``compute_class_means`` (``log_entropy = 1``), loops included; π and v̄ of the
    class itself (the class's first sorted sample) instead of the ``lb_count`` slip.

    ``centroids_list[c]`` ``[K, D]``, ``weights_list[c]`` ``[K]``, ``variances_list[c]`` ``[K]`` (the
    reference's per-cluster scalar v̄); ``class_length`` the expected class size ``N_class``.
    """
    sorted_indices = torch.argsort(labels)
    sorted_labels = labels[sorted_indices].cpu().numpy()
    unique_labels = torch.unique(labels).cpu().numpy()
    n = features.shape[0]
    flat = features[sorted_indices].reshape(n, -1)
    centroids_all = torch.stack([centroids_list[lab] for lab in sorted_labels], dim=0)
    weights_all = torch.stack([weights_list[lab] for lab in sorted_labels], dim=0)
    variances_all = torch.stack([variances_list[lab] for lab in sorted_labels], dim=0)
    distances = torch.cdist(flat.unsqueeze(1), centroids_all, p=2).squeeze(1)
    assignments = np.argmin(distances.detach().cpu().numpy(), axis=1)
    nearest = centroids_all[torch.arange(n), torch.from_numpy(assignments)]
    variance_matrix = (flat - nearest) ** 2
    floor = torch.log(tau * torch.tensor(sigma**2) + gamma)

    total = None
    current = 0
    for lab in unique_labels:
        start = current
        while current < n and sorted_labels[current] == lab:
            current += 1
        weights_label, variance_label = weights_all[start], variances_all[start]
        class_var = variance_matrix[start:current]
        cluster_assignments = assignments[start:current]
        order = np.argsort(cluster_assignments, kind="stable")
        sorted_assignments = cluster_assignments[order]
        sorted_class_var = class_var[torch.from_numpy(order)]
        class_sum = None
        cur = 0
        for j in np.unique(sorted_assignments):
            c_start = cur
            while cur < len(sorted_assignments) and sorted_assignments[cur] == j:
                cur += 1
            weight, vbar = weights_label[j], variance_label[j]
            mu = (cur - c_start) / (weight * class_length) * kappa
            if mu >= 1:
                mu = torch.tensor(0.99)
            v = torch.mean(sorted_class_var[c_start:cur])
            v = mu * v + (1 - mu) * vbar
            term = F.relu(torch.log(v + gamma) - floor).mean() * weight
            class_sum = term if class_sum is None else class_sum + term
        total = class_sum if total is None else total + class_sum
    return total / len(unique_labels)


def make_step(
    batch: int,
    *,
    image_size: int = 32,
    num_classes: int = 10,
    clusters: int = 5,
    sigma: float = 0.1,
    lambd: float = 16.0,
    lr: float = 0.05,
    separate_backward: bool = True,
    num_train: int | None = None,
    class_length: float = 5000.0,
    seed: int = 0,
):
    """A zero-argument callable running one reference train step at ``batch`` (see the module
    docstring); returns the step's loss ``CE + λ·s(lr)·L_C``, detached.

    ``num_train`` images (default ``max(4·batch, 512)``, as :mod:`benchmarks.train_step`) with
    random labels are cycled through in random order.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    n_train = num_train or max(4 * batch, 512)
    data = torch.from_numpy(
        rng.integers(0, 256, (n_train, image_size, image_size, 3), dtype=np.uint8)
    )
    targets = torch.from_numpy(rng.integers(0, num_classes, n_train).astype(np.int64))
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)

    client, server, classifier = build_model(num_classes, image_size)
    for m in (client, server, classifier):
        m.train()
    side = image_size // 4
    centroids, weights, variances = random_mixture(num_classes, clusters, 8 * side * side, seed)
    centroids_list = [torch.from_numpy(c) for c in centroids]
    weights_list = [torch.from_numpy(w) for w in weights]
    variances_list = [torch.from_numpy(v.mean(-1)) for v in variances]  # the reference's scalar v̄

    def sgd(params):
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)

    opt_client = sgd(client.parameters())
    opt_server = sgd([*server.parameters(), *classifier.parameters()])
    scale = 1.0 if lr < 0.00041 else 0.001 / lr  # the reference's s(lr)
    box = {"order": np.empty(0, np.int64), "pos": 0}

    def next_indices() -> torch.Tensor:
        if box["pos"] + batch > len(box["order"]):
            box["order"], box["pos"] = rng.permutation(n_train), 0
        idx = box["order"][box["pos"] : box["pos"] + batch]
        box["pos"] += batch
        return torch.from_numpy(idx)

    def step() -> torch.Tensor:
        idx = next_indices()
        images, labels = data[idx], targets[idx]
        x = (augment(images).permute(0, 3, 1, 2) - mean) / std
        x = x.contiguous()
        opt_client.zero_grad()
        opt_server.zero_grad()
        z = client(x)
        rob = cem_loss_reference(
            z, labels, centroids_list, weights_list, variances_list, class_length, sigma
        )
        z_n = z + sigma * torch.randn_like(z)
        logits = classifier(server(z_n).flatten(1))
        ce = F.cross_entropy(logits, labels)
        if separate_backward:
            rob.backward(retain_graph=True)
            g_cem = [p.grad.clone() for p in client.parameters()]
            opt_client.zero_grad()
            opt_server.zero_grad()
            ce.backward()
            for p, g in zip(client.parameters(), g_cem, strict=True):
                p.grad += lambd * scale * g
        else:
            (ce + lambd * scale * rob).backward()
        opt_client.step()
        opt_server.step()
        return (ce + lambd * scale * rob).detach()

    return step


__all__ = ["augment", "build_model", "cem_loss_reference", "make_step", "random_mixture"]
