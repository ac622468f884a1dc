"""DatasetEquity weights (Shrivastava, Zhang, Nagesh, Parchami, "DatasetEquity: Are All Samples
Created Equal? In The Quest For Equity Within Datasets", ICCV 2023 Workshops, arXiv 2308.09878).

Each training sample gets the likelihood p_i of its appearance cluster, and its loss is multiplied
by the "DEquity weight" (the paper's Generalized Focal Loss)

    w_i = (η + (1 − p_i)^γ) / (η + 1)        ∈ [η/(η+1), 1], w(p=0) = 1, decreasing in p.

Confirmed from the official code (github.com/towardsautonomy/DatasetEquity: README
`dequity_loss_weight(p, eta=1.0, gamma=5.0)`; `data_analysis/feature_extraction.py`; the
`*_dataset_distribution_analysis.ipynb` notebooks): the weight formula and its defaults η = 1,
γ = 5 (the training scripts also use η = 0.5 and 0.3/γ = 2); features = penultimate activations
of an ImageNet ResNet-101, reduced by t-SNE (sklearn `TSNE`) and clustered by DBSCAN (sklearn).

Decided here (the code we could read does not show it): p_i = (size of i's cluster) / N, the
frequency of the cluster ("frequency"; "max" divides by the largest cluster's size instead, so the
most common cluster has p = 1); DBSCAN noise points are clusters of their own (p = 1/N); the
DBSCAN radius, which the paper does not give, from the k-distance rule (see `cluster_features`);
and, as the offline default of the `dataset_equity` selector, k-means on PCA-reduced features
instead of t-SNE + DBSCAN (seconds instead of minutes, no radius to tune).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

LIKELIHOODS = ("frequency", "max")
CLUSTERINGS = ("kmeans", "tsne_dbscan")


def check_dataset_equity(eta: float, gamma: float) -> None:
    if not eta >= 0 or not math.isfinite(eta):
        raise ValueError(
            f"eta must be a finite value >= 0, got {eta}; the paper uses eta in {{0.3, 0.5, 1.0}}"
        )
    if not gamma >= 0 or not math.isfinite(gamma):
        raise ValueError(f"gamma must be a finite value >= 0, got {gamma}; the paper uses gamma in {{2, 5}}")


def dataset_equity_weight(p: Tensor, eta: float = 1.0, gamma: float = 5.0) -> Tensor:
    """w = (η + (1 − p)^γ)/(η + 1) for likelihoods p ∈ [0, 1] (float32; γ = 0 gives w = 1)."""
    check_dataset_equity(eta, gamma)
    p = torch.as_tensor(p).double()
    if p.numel() and (torch.isnan(p).any() or p.min() < 0 or p.max() > 1):
        raise ValueError("likelihoods p must be in [0, 1]")
    return ((eta + (1 - p) ** gamma) / (eta + 1)).float()


def cluster_likelihood(labels: Tensor, likelihood: str = "frequency") -> Tensor:
    """(N,) likelihood of each sample's cluster from (N,) integer cluster labels (−1 = noise: a
    cluster of its own). "frequency": cluster size / N; "max": cluster size / largest size."""
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
    labels = torch.as_tensor(labels).long().flatten()
    if not labels.numel():
        raise ValueError("no cluster labels")
    noise = labels < 0
    _, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    size = counts[inverse].double()
    size[noise] = 1.0
    denom = float(len(labels)) if likelihood == "frequency" else float(size.max())
    return size / denom


def _reduce_dims(x: np.ndarray, dims: int, seed: int) -> np.ndarray:
    if dims and x.shape[1] > dims and x.shape[0] > dims:
        from sklearn.decomposition import PCA

        return PCA(n_components=dims, random_state=seed).fit_transform(x)
    return x


def cluster_features(
    features: Tensor,
    method: str = "kmeans",
    n_clusters: int = 10,
    seed: int = 0,
    pca_dims: int = 50,
    perplexity: float = 30.0,
    dbscan_eps: float | None = None,
    dbscan_min_samples: int = 5,
) -> Tensor:
    """(N,) cluster labels of (N, D) features (scikit-learn; −1 = DBSCAN noise).

    "kmeans": k-means (k-means++, 10 restarts, seeded) on the features reduced to `pca_dims` by PCA;
    "tsne_dbscan" (the paper): PCA to `pca_dims`, 2-D t-SNE, DBSCAN with `dbscan_eps` and
    `dbscan_min_samples` (eps default, our choice: the 0.9 quantile of the distance of each point
    to its `dbscan_min_samples`-th nearest neighbour, itself included, so 90% of the points are
    core points: the k-distance rule of the DBSCAN paper, automated).
    """
    if method not in CLUSTERINGS:
        raise ValueError(f"method must be one of {CLUSTERINGS}, got {method!r}")
    x = torch.as_tensor(features).detach().double().cpu()
    if x.dim() != 2 or len(x) < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("non-finite features: the feature extractor diverged")
    x = _reduce_dims(x.numpy(), pca_dims, seed)
    if method == "kmeans":
        if isinstance(n_clusters, bool) or not isinstance(n_clusters, int) or not 1 <= n_clusters <= len(x):
            raise ValueError(
                f"n_clusters must be an integer in [1, {len(x)}] (the sample count), got {n_clusters!r}"
            )
        from sklearn.cluster import KMeans

        labels = KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit_predict(x)
    else:
        from sklearn.cluster import DBSCAN
        from sklearn.manifold import TSNE

        perplexity = min(perplexity, (len(x) - 1) / 3)
        emb = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
        if dbscan_eps is None:  # 90% of the points are DBSCAN core points (a k-distance-plot rule)
            from sklearn.neighbors import NearestNeighbors

            k = min(dbscan_min_samples, len(emb))
            kdist = NearestNeighbors(n_neighbors=k).fit(emb).kneighbors(emb)[0][:, -1]
            dbscan_eps = max(float(np.quantile(kdist, 0.9)), 1e-12)
        if not dbscan_eps > 0:
            raise ValueError(f"dbscan_eps must be > 0, got {dbscan_eps}")
        labels = DBSCAN(eps=dbscan_eps, min_samples=dbscan_min_samples).fit_predict(emb)
    return torch.from_numpy(np.asarray(labels)).long()
