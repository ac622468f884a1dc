"""Metric learning: `multi_similarity` (oracle: pytorch-metric-learning), `soft_infonce`,
`one_to_k_contrastive`, Recall@K, the class-balanced P×K sampler, `EmbeddingModule` and the
`metric_learning` task of `recipes.train`."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from recipes import train
from toolkit import registry
from toolkit.data import ClassBalancedSampler, DigitsDataModule
from toolkit.functional import (
    ms_mine,
    multi_similarity_loss,
    one_to_k_contrastive_embeddings,
    one_to_k_contrastive_loss,
    recall_at_k,
    soft_infonce_embeddings,
    soft_infonce_loss,
    soft_infonce_weights,
)
from toolkit.modules import ClassificationModule
from toolkit.modules.metric_learning import EmbeddingModule
from toolkit.terms import Step
from toolkit.types import Batch, ModelOutput


def pml():
    """pytorch-metric-learning (a dev extra): (losses, miners), the oracle of the MS loss."""
    pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning import losses, miners

    return losses, miners


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pk_batch(seed, p=6, k=4, d=16):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(p).repeat_interleave(k)[torch.randperm(p * k, generator=g)]
    return torch.randn(p * k, d, generator=g), labels


def step_of(embeddings, labels):
    return Step(Batch(torch.zeros(len(labels), 1), labels), ModelOutput(embeddings, embeddings))


# -- multi-similarity -------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    "alpha,beta,base,eps", [(2.0, 50.0, 0.5, 0.1), (2.0, 40.0, 1.0, 0.3), (1.0, 10.0, 0.2, 0.5)]
)
def test_ms_loss_and_gradient_equal_pytorch_metric_learning(seed, alpha, beta, base, eps):
    pml_losses, pml_miners = pml()
    emb, labels = pk_batch(seed)
    ours = emb.clone().requires_grad_(True)
    ref = emb.clone().requires_grad_(True)
    loss = multi_similarity_loss(ours, labels, alpha, beta, base, eps)
    miner = pml_miners.MultiSimilarityMiner(epsilon=eps)
    oracle = pml_losses.MultiSimilarityLoss(alpha=alpha, beta=beta, base=base)(
        ref, labels, miner(ref, labels)
    )
    loss.backward()
    oracle.backward()
    assert loss.item() == pytest.approx(oracle.item(), rel=1e-6)
    assert torch.allclose(ours.grad, ref.grad, atol=1e-7)
    # without mining: every pair, as the library's loss without a miner
    everything = multi_similarity_loss(emb, labels, alpha, beta, base, eps, mining=False)
    oracle_all = pml_losses.MultiSimilarityLoss(alpha=alpha, beta=beta, base=base)(emb, labels)
    assert everything.item() == pytest.approx(oracle_all.item(), rel=1e-6)


def test_ms_miner_keeps_the_pairs_of_pytorch_metric_learning():
    _, pml_miners = pml()
    for seed in range(4):
        emb, labels = pk_batch(seed, p=5, k=3)
        a1, p, a2, n = pml_miners.MultiSimilarityMiner(epsilon=0.2)(emb, labels)
        s = F.normalize(emb, dim=-1) @ F.normalize(emb, dim=-1).T
        pos, neg = ms_mine(s, labels, 0.2)
        want_pos = torch.zeros_like(pos)
        want_pos[a1, p] = True
        want_neg = torch.zeros_like(neg)
        want_neg[a2, n] = True
        assert torch.equal(pos, want_pos) and torch.equal(neg, want_neg)


def ms_loop(emb, labels, alpha, beta, lam, eps):
    """The paper's MS loss anchor by anchor (NumPy, mining as in Section 4: hardest pairs ± ε)."""
    e = emb.double().numpy()
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    s = e @ e.T
    y = labels.numpy()
    out = []
    for i in range(len(y)):
        pos = [s[i, j] for j in range(len(y)) if y[j] == y[i] and j != i]
        neg = [s[i, j] for j in range(len(y)) if y[j] != y[i]]
        mined_neg = [v for v in neg if pos and v > min(pos) - eps]
        mined_pos = [v for v in pos if neg and v < max(neg) + eps]
        lp = math.log1p(sum(math.exp(-alpha * (v - lam)) for v in mined_pos)) / alpha
        ln = math.log1p(sum(math.exp(beta * (v - lam)) for v in mined_neg)) / beta
        out.append(lp + ln)
    return np.array(out)


def test_ms_per_anchor_values_against_the_paper_formula():
    emb, labels = pk_batch(5, p=4, k=3, d=8)
    per = multi_similarity_loss(emb, labels, 2.0, 50.0, 0.5, 0.1, reduction="none")
    np.testing.assert_allclose(per.numpy(), ms_loop(emb, labels, 2.0, 50.0, 0.5, 0.1), rtol=1e-5)
    assert torch.allclose(multi_similarity_loss(emb, labels), per.mean())
    assert torch.allclose(multi_similarity_loss(emb, labels, reduction="sum"), per.sum())
    term = registry.build("loss", "multi_similarity")
    assert torch.allclose(term(step_of(emb, labels)), per)


def test_ms_is_zero_for_tight_classes_far_apart():
    # classes at ±e1 / ±e2 (pairwise cosine ≤ 0), positives identical: the miner keeps nothing
    centres = torch.tensor([[1.0, 0, 0], [-1.0, 0, 0], [0, 1.0, 0], [0, -1.0, 0]])
    labels = torch.arange(4).repeat_interleave(3)
    emb = centres[labels] * 5
    assert multi_similarity_loss(emb, labels).item() == 0.0
    # without mining the same embeddings still pay the (small) positive term
    assert multi_similarity_loss(emb, labels, mining=False).item() > 0


def test_ms_finite_for_extreme_and_bf16_embeddings():
    emb, labels = pk_batch(6)
    big = (emb * 1e4).requires_grad_(True)
    loss = multi_similarity_loss(big, labels)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(big.grad).all()
    assert torch.isfinite(multi_similarity_loss(emb.bfloat16(), labels))
    assert torch.isfinite(multi_similarity_loss(torch.zeros(6, 4), torch.tensor([0, 0, 1, 1, 2, 2])))


def test_ms_bad_inputs():
    emb = torch.randn(4, 8)
    with pytest.raises(ValueError, match="single sample.*samples_per_class"):
        multi_similarity_loss(emb, torch.arange(4))
    with pytest.raises(ValueError, match="integer class labels"):
        multi_similarity_loss(emb, torch.zeros(4))
    with pytest.raises(ValueError, match=r"labels must be \(B,\)"):
        multi_similarity_loss(emb, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, D\) embeddings"):
        multi_similarity_loss(torch.randn(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="alpha"):
        registry.build("loss", "multi_similarity", alpha=0.0)
    with pytest.raises(ValueError, match="beta"):
        multi_similarity_loss(emb, torch.tensor([0, 0, 1, 1]), beta=-1.0)
    with pytest.raises(ValueError, match="epsilon"):
        multi_similarity_loss(emb, torch.tensor([0, 0, 1, 1]), epsilon=-0.1)


# -- soft-InfoNCE ----------------------------------------------------------------------------


def official_soft_infonce(scores, sim, alpha, beta, t):
    """A transcription of the official `--softinfonce` branch (UniXCoder/run.py): diagonal
    positives, the N − 1 off-diagonal keys as negatives."""
    n = scores.shape[0]
    mask = torch.eye(n)
    sim_neg = sim[mask != 1].view(n, -1)
    weights = torch.softmax(sim_neg / t, dim=1)
    weights = torch.clip((beta - alpha * weights) / (beta - alpha / weights.size(1)), min=0.1)
    weights = torch.cat([torch.ones((n, 1)), weights], dim=1)
    scores = torch.cat([scores[mask == 1].unsqueeze(1), scores[mask != 1].view(n, -1)], dim=1)
    maxes = torch.max(scores, 1, keepdim=True)[0]
    x_exp = torch.exp(scores - maxes)
    probs = x_exp / torch.sum(weights * x_exp, 1, keepdim=True)
    return -torch.log(probs[:, 0] + 1e-15)


@pytest.mark.parametrize("alpha,beta,t", [(1.0, 1.0, 1.0), (2.0, 1.5, 0.5), (0.5, 3.0, 2.0)])
def test_soft_infonce_equals_the_official_computation(alpha, beta, t):
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(8, 8, generator=g) * 3
    sim = torch.randn(8, 8, generator=g)
    got = soft_infonce_loss(scores, sim, alpha, beta, t, reduction="none")
    assert torch.allclose(got, official_soft_infonce(scores, sim, alpha, beta, t), atol=1e-5)
    assert torch.allclose(soft_infonce_loss(scores, sim, alpha, beta, t), got.mean())


def test_soft_infonce_alpha_zero_is_infonce_and_weights_properties():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(6, 6, generator=g)
    sim = torch.randn(6, 6, generator=g)
    assert torch.allclose(
        soft_infonce_loss(scores, sim, alpha=0.0), F.cross_entropy(scores, torch.arange(6)), atol=1e-6
    )
    neg = ~torch.eye(6, dtype=torch.bool)
    w = soft_infonce_weights(sim * 0.1, neg, alpha=1.0, beta=2.0)
    # unclipped weights average to 1 over the negatives; the positive gets no weight here
    assert torch.allclose(w.sum(1) / 5, torch.ones(6), atol=1e-6) and (w.diagonal() == 0).all()
    assert (w[neg] >= 0.1).all()
    # a uniform estimate gives w ≡ 1 for any α < β·n
    assert torch.allclose(soft_infonce_weights(torch.zeros(6, 6), neg, 3.0, 1.0)[neg], torch.ones(30))
    # related negatives (large estimate) are weighted down
    sim2 = torch.zeros(6, 6)
    sim2[0, 1] = 5.0
    w2 = soft_infonce_weights(sim2, neg, 1.0, 1.0)
    assert w2[0, 1] < w2[0, 2]


def test_soft_infonce_gradient_closed_form_and_no_gradient_through_the_estimate():
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(5, 5, generator=g, requires_grad=True)
    soft_infonce_loss(scores, reduction="sum").backward()  # estimate = the detached scores
    s = scores.detach()
    neg = ~torch.eye(5, dtype=torch.bool)
    w = soft_infonce_weights(s, neg)
    d = s.diagonal().exp() + (w * s.exp()).sum(1)
    want = w * s.exp() / d.unsqueeze(1)
    want[range(5), range(5)] = s.diagonal().exp() / d - 1
    assert torch.allclose(scores.grad, want, atol=1e-6)


def test_soft_infonce_on_a_labelled_batch_against_a_loop():
    emb, labels = pk_batch(3, p=3, k=4, d=8)
    per = soft_infonce_embeddings(emb, labels, temperature=0.2, alpha=1.0, beta=1.0, t=0.5, reduction="none")
    e = F.normalize(emb.double(), dim=-1)
    cos = e @ e.T
    want = []
    for i in range(len(labels)):
        same = [j for j in range(len(labels)) if labels[j] == labels[i]]
        partner = next(j for j in [(i + d) % len(labels) for d in range(1, len(labels))] if j in same)
        negs = [j for j in range(len(labels)) if j not in (i, partner)]
        pi = torch.softmax(cos[i, negs] / 0.5, 0)
        w = torch.clamp((1.0 - pi) / (1.0 - 1.0 / len(negs)), min=0.1)
        s = cos[i] / 0.2
        want.append(-(s[partner] - torch.log(s[partner].exp() + (w * s[negs].exp()).sum())).item())
    np.testing.assert_allclose(per.numpy(), want, rtol=1e-5)
    # the labels estimator weights same-class negatives down
    lab = soft_infonce_embeddings(emb, labels, alpha=1.0, beta=1.0, estimator="labels", reduction="none")
    assert lab.shape == (12,) and torch.isfinite(lab).all()
    term = registry.build("loss", "soft_infonce", temperature=0.2, t=0.5)
    assert torch.allclose(term(step_of(emb, labels)), per)
    # a sample alone in its class contributes 0 and leaves the mean
    odd = torch.tensor([0, 0, 1, 1, 2])
    per_odd = soft_infonce_embeddings(emb[:5], odd, reduction="none")
    assert per_odd[4] == 0 and torch.allclose(soft_infonce_embeddings(emb[:5], odd), per_odd[:4].mean())


def test_soft_infonce_finite_and_errors():
    emb, labels = pk_batch(4)
    big = (emb * 1e4).requires_grad_(True)
    loss = soft_infonce_embeddings(big, labels)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(big.grad).all()
    assert torch.isfinite(soft_infonce_embeddings(emb.bfloat16(), labels))
    assert torch.isfinite(soft_infonce_loss(torch.randn(4, 4) * 1e4))
    with pytest.raises(ValueError, match="single sample"):
        soft_infonce_embeddings(emb[:4], torch.arange(4))
    with pytest.raises(ValueError, match="beta must exceed alpha/n"):
        soft_infonce_loss(torch.randn(2, 2), alpha=1.0, beta=1.0)
    with pytest.raises(ValueError, match="estimator"):
        registry.build("loss", "soft_infonce", estimator="bm25")
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        soft_infonce_loss(torch.randn(3, 3), alpha=-1.0)
    with pytest.raises(ValueError, match="similarity must have the scores' shape"):
        soft_infonce_loss(torch.randn(3, 3), torch.randn(3, 4))
    with pytest.raises(ValueError, match="positive indices"):
        soft_infonce_loss(torch.randn(3, 3), positive=torch.tensor([0, 1, 5]))


# -- 1-to-K contrastive ----------------------------------------------------------------------


def official_one_to_k(image_feat, text_feat, temp):
    """A transcription of `get_unialign_contrastive_loss` (idx None, need_divm 0, one process)."""
    bsz = image_feat.shape[0]
    tsz = text_feat.shape[0] // bsz
    logits = image_feat @ text_feat.t() / temp
    labels_i2t = torch.zeros((bsz, tsz * bsz))
    for i in range(bsz):
        labels_i2t[i][tsz * i : tsz * i + tsz] = 1
    labels_t2i = labels_i2t.t()
    loss_i2t = -torch.sum(F.log_softmax(logits, dim=1) * labels_i2t, dim=1).mean()
    loss_t2i = -torch.sum(F.log_softmax(logits.t(), dim=1) * labels_t2i, dim=1).mean()
    return (loss_i2t + loss_t2i) / 2 / tsz


@pytest.mark.parametrize("k", [1, 2, 5])
def test_one_to_k_equals_the_official_computation(k):
    g = torch.Generator().manual_seed(k)
    a = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    c = F.normalize(torch.randn(4 * k, 8, generator=g), dim=-1)
    got = one_to_k_contrastive_loss(a, c, temperature=0.1)
    assert got.item() == pytest.approx(official_one_to_k(a, c, 0.1).item(), rel=1e-5)
    per = one_to_k_contrastive_loss(a, c, temperature=0.1, reduction="none")
    assert per.shape == (4 + 4 * k,) and torch.allclose(per.mean(), got)


def test_one_to_k_with_k_one_is_the_clip_loss_and_permutation_invariant():
    g = torch.Generator().manual_seed(7)
    a, c = torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g)
    logits = F.normalize(a, dim=-1) @ F.normalize(c, dim=-1).T / 0.07
    clip = (F.cross_entropy(logits, torch.arange(5)) + F.cross_entropy(logits.T, torch.arange(5))) / 2
    assert torch.allclose(one_to_k_contrastive_loss(a, c), clip, atol=1e-5)
    # permuting the K candidates inside each group changes nothing
    c3 = torch.randn(15, 6, generator=g)
    perm = torch.cat([torch.randperm(3, generator=g) + 3 * i for i in range(5)])
    assert torch.allclose(one_to_k_contrastive_loss(a, c3), one_to_k_contrastive_loss(a, c3[perm]), atol=1e-6)
    # explicit owners give the grouped result
    owner = torch.arange(5).repeat_interleave(3)
    assert torch.allclose(one_to_k_contrastive_loss(a, c3, owner=owner), one_to_k_contrastive_loss(a, c3))


def test_one_to_k_on_a_labelled_batch():
    emb, labels = pk_batch(8, p=4, k=3, d=8)
    per = one_to_k_contrastive_embeddings(emb, labels, temperature=0.1, reduction="none")
    first = [int((labels == c).nonzero()[0]) for c in labels.unique(sorted=False)]
    first = sorted(first)
    anchors = emb[first]
    order = {int(labels[i]): r for r, i in enumerate(first)}
    cand = [i for i in range(12) if i not in first]
    owner = torch.tensor([order[int(labels[i])] for i in cand])
    want = one_to_k_contrastive_loss(anchors, emb[cand], temperature=0.1, owner=owner)
    assert torch.allclose(per.mean(), want, atol=1e-6)
    term = registry.build("loss", "one_to_k_contrastive", temperature=0.1)
    assert torch.allclose(term(step_of(emb, labels)), per)
    big = (emb * 1e4).requires_grad_(True)
    loss = one_to_k_contrastive_embeddings(big, labels)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(big.grad).all()
    assert torch.isfinite(one_to_k_contrastive_embeddings(emb.bfloat16(), labels))


def test_one_to_k_errors():
    with pytest.raises(ValueError, match="single sample"):
        one_to_k_contrastive_embeddings(torch.randn(3, 4), torch.arange(3))
    with pytest.raises(ValueError, match="N = M·K"):
        one_to_k_contrastive_loss(torch.randn(3, 4), torch.randn(7, 4))
    with pytest.raises(ValueError, match="one width"):
        one_to_k_contrastive_loss(torch.randn(3, 4), torch.randn(6, 5))
    with pytest.raises(ValueError, match="temperature"):
        registry.build("loss", "one_to_k_contrastive", temperature=0.0)
    with pytest.raises(ValueError, match="owner indices"):
        one_to_k_contrastive_loss(torch.randn(2, 4), torch.randn(3, 4), owner=torch.tensor([0, 1, 2]))


@settings(max_examples=30, deadline=None)
@given(scale=st.floats(1e-3, 1e4), seed=st.integers(0, 2**16), bf16=st.booleans())
def test_property_metric_losses_finite(scale, seed, bf16):
    emb, labels = pk_batch(seed, p=3, k=3, d=5)
    emb = (emb * scale).requires_grad_(True)
    x = emb.bfloat16() if bf16 else emb
    total = multi_similarity_loss(x, labels) + soft_infonce_embeddings(x, labels)
    total = total + one_to_k_contrastive_embeddings(x, labels)
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(emb.grad).all()


# -- Recall@K ---------------------------------------------------------------------------------


def test_recall_at_k_against_a_loop():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(40, 6, generator=g)
    labels = torch.randint(0, 5, (40,), generator=g)
    labels[0] = 9  # alone in its class: left out
    got = recall_at_k(emb, labels, (1, 3, 8), chunk=7)
    e = F.normalize(emb.double(), dim=-1).numpy()
    want = []
    for k in (1, 3, 8):
        hits = []
        for i in range(40):
            if (labels == labels[i]).sum() < 2:
                continue
            d = [(-(e[i] @ e[j]), j) for j in range(40) if j != i]
            nn_ = [j for _, j in sorted(d)[:k]]
            hits.append(any(labels[j] == labels[i] for j in nn_))
        want.append(np.mean(hits))
    np.testing.assert_allclose(got.numpy(), want, atol=1e-6)
    with pytest.raises(ValueError, match="more than 40 items"):
        recall_at_k(emb, labels, (40,))
    with pytest.raises(ValueError, match="two or more items"):
        recall_at_k(emb[:3], torch.arange(3), (1,))


# -- sampler ----------------------------------------------------------------------------------


def test_class_balanced_sampler_batches_are_p_by_k_and_seeded():
    labels = torch.arange(10).repeat_interleave(30)[
        torch.randperm(300, generator=torch.Generator().manual_seed(0))
    ]
    s = ClassBalancedSampler(labels, 4, 5, seed=3)
    batches = s.batches()
    assert len(batches) == 300 // 20 and len(list(iter(s))) == len(s) == 300
    for b in batches:
        counts = torch.bincount(labels[b], minlength=10)
        assert (counts > 0).sum() == 4 and set(counts[counts > 0].tolist()) == {5}
    assert s.batches() == batches  # a pure function of (seed, epoch)
    s.set_epoch(1)
    assert s.batches() != batches
    # without replacement inside a class until its samples are used up
    s.set_epoch(0)
    flat = torch.tensor([i for b in batches for i in b])
    for c in range(10):
        mine = flat[labels[flat] == c]
        assert len(mine[:30].unique()) == min(30, len(mine))


def test_class_balanced_sampler_gives_each_rank_its_own_batches():
    labels = torch.arange(6).repeat_interleave(20)
    one = ClassBalancedSampler(labels, 3, 4, seed=1, batches_per_epoch=10, num_replicas=1, rank=0)
    r0 = ClassBalancedSampler(labels, 3, 4, seed=1, batches_per_epoch=10, num_replicas=2, rank=0)
    r1 = ClassBalancedSampler(labels, 3, 4, seed=1, batches_per_epoch=10, num_replicas=2, rank=1)
    assert len(r0) == len(r1) == 5 * 12
    everything = one.batches()
    assert r0.batches() == everything[0::2] and r1.batches() == everything[1::2]
    # an odd count is rounded up so that every rank gets as many batches
    odd = [ClassBalancedSampler(labels, 3, 4, batches_per_epoch=5, num_replicas=2, rank=r) for r in (0, 1)]
    assert len(odd[0]) == len(odd[1]) == 3 * 12
    keyed = ClassBalancedSampler(labels, 3, 4, with_epoch=True, views=2)
    keyed.set_epoch(3)
    assert {e for _, e in keyed} == {1}


def test_class_balanced_sampler_errors():
    labels = torch.arange(3).repeat_interleave(4)
    with pytest.raises(ValueError, match="data has 3 classes"):
        ClassBalancedSampler(labels, 4, 2)
    with pytest.raises(ValueError, match="samples_per_class must be >= 2"):
        ClassBalancedSampler(labels, 2, 1)
    with pytest.raises(ValueError, match="integer classes"):
        ClassBalancedSampler(labels.float(), 2, 2)
    with pytest.raises(ValueError, match="samples_per_class must be an integer >= 2"):
        DigitsDataModule(batch_size=8, samples_per_class=8)


def test_datamodule_option_draws_p_by_k_batches():
    dm = DigitsDataModule(batch_size=32, samples_per_class=4, seed=0, train_subset=400)
    loader = dm.train_dataloader()
    assert len(loader) == 400 // 32
    for batch in loader:
        counts = torch.bincount(batch.target, minlength=10)
        assert (counts > 0).sum() == 8 and set(counts[counts > 0].tolist()) == {4}
        break
    # train_targets are the labels of the training positions, in order
    assert torch.equal(dm.train_targets, dm.train_set.targets[dm.train_indices])


# -- module and recipe ------------------------------------------------------------------------


def test_embedding_module_trains_evaluates_and_reloads(tmp_path, make_trainer):
    dm = DigitsDataModule(batch_size=32, samples_per_class=4, seed=0, val_split=0.1, test_subset=100)
    module = EmbeddingModule(
        "convnet", embedding_dim=16, loss="multi_similarity", in_chans=1, model_kwargs={"width": 8}
    )
    trainer = make_trainer(max_epochs=1, limit_train_batches=4)
    trainer.fit(module, datamodule=dm)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert (
        0
        <= float(trainer.callback_metrics["val/recall@1"])
        <= float(trainer.callback_metrics["val/recall@8"])
        <= 1
    )
    (metrics,) = trainer.test(module, datamodule=dm, verbose=False)
    emb, labels = module.embed(dm.test_dataloader())
    assert emb.shape == (100, 16)
    assert metrics["test/recall@1"] == pytest.approx(float(recall_at_k(emb, labels, (1,))[0]), abs=1e-6)
    ckpt = tmp_path / "e.ckpt"
    trainer.save_checkpoint(ckpt)
    loaded = EmbeddingModule.load_from_checkpoint(ckpt)
    assert torch.allclose(loaded.embed(dm.test_dataloader())[0], emb)


def test_embedding_module_uses_the_penultimate_features_and_terms_aux_in_a_classifier():
    module = EmbeddingModule(
        "convnet", loss={"ms": {"loss": "multi_similarity"}}, in_chans=1, model_kwargs={"width": 8}
    )
    assert module.embedding_dim == module.model.num_features and isinstance(
        module.model.fc, torch.nn.Identity
    )
    x = torch.randn(8, 1, 8, 8)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    out = module.compute_loss(Step(Batch(x, labels), module.student_output(Batch(x, labels))))
    assert torch.isfinite(out["loss"]) and out["per_sample_loss"].shape == (8,)
    # as an auxiliary term of a classifier: it reads the penultimate embedding
    clf = ClassificationModule(
        "convnet",
        num_classes=10,
        in_chans=1,
        model_kwargs={"width": 8},
        loss={"ce": "cross_entropy", "ms": {"loss": "multi_similarity", "weight": 0.5}},
    )
    b = Batch(x, labels)
    step = Step(b, clf.student_output(b))
    assert step.student.embedding.shape[1] == clf.model.num_features
    assert torch.isfinite(clf.compute_loss(step)["loss"])


@pytest.mark.parametrize("loss", ["multi_similarity", "soft_infonce", "one_to_k_contrastive"])
def test_recipe_runs_each_metric_loss_on_digits(loss, tmp_path):
    res = train.main(
        [
            "--loss",
            loss,
            "--data",
            "digits",
            "--fast",
            "--out",
            str(tmp_path),
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    assert res["metric"] == "recall@1" and 0 < res["recall@1"] <= 1 and res["higher_is_better"]
    assert set(res["extra_per_seed"][0]) == {"recall@1", "recall@2", "recall@4", "recall@8"}
    assert res["config"]["sampler"] == {"classes_per_batch": 8, "samples_per_class": 8}


@pytest.mark.slow
def test_ddp_each_rank_trains_on_its_own_p_by_k_batches(tmp_path):
    """Real 2-process DDP (gloo): rank r trains on batches r, r + 2, ... of the one global
    sequence of (seed, epoch), the replicas stay identical, and Recall@K is computed on the
    embeddings gathered from both ranks (the same value on each)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    r = subprocess.run(
        [sys.executable, str(here / "ddp_metric.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=here.parent,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    pool = ranks[0]["train_indices"]
    sampler = ClassBalancedSampler(
        torch.tensor(ranks[0]["train_targets"]), 8, 4, seed=0, num_replicas=1, rank=0
    )
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        everything = [[pool[p] for p in b] for b in sampler.batches()]
        assert len(everything) == 10
        for rank, rk in enumerate(ranks):
            assert rk["seen"][str(epoch)] == everything[rank::2]
    assert ranks[0]["digest"] == pytest.approx(ranks[1]["digest"], rel=1e-9)
    assert ranks[0]["recall"] == ranks[1]["recall"] and 0 < ranks[0]["recall"]["test/recall@1"] <= 1
