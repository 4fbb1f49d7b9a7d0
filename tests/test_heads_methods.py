"""Method-specific behaviour of the heads: QCFace's norm prior, MagFace's bound, EMA statistics,
the QGFace queue, EQFace's stages and the inference-time quality estimators."""

from __future__ import annotations

import io
import json
import math
import warnings

import numpy as np
import pytest
import torch
from test_heads import (
    FEAT,
    B,
    C,
    D,
    make_head,
    make_inputs,
    qc_f,
    qc_zstar,
    ref_adaface_z,
    ref_combined,
    ref_eqface_branch,
    ref_qgface,
)

from qualiface.heads.base import LOCAL
from qualiface.heads.quality import (
    EQFaceQuality,
    NormPrior,
    NormQuality,
    QCFaceQuality,
    QualityConfigError,
    build_quality_estimator,
)

# ----------------------------------------------------------------------------------------------
# QCFace
# ----------------------------------------------------------------------------------------------
P_GRID = [0.0, 0.1, 0.5, 0.9, 1.0]


def test_qcface_k_and_target_norms():
    prior = NormPrior()
    assert prior.k == pytest.approx(3421.93, abs=0.01)
    p = torch.tensor(P_GRID, dtype=torch.float64)
    target = prior.target_norm(p)
    for value, expected in zip(target.tolist(), P_GRID, strict=True):
        assert value == pytest.approx(qc_zstar(expected), rel=1e-12)
    assert target[0].item() == pytest.approx(1.0, abs=1e-3)
    assert target[2].item() == pytest.approx(50.5, abs=0.05)
    assert target[4].item() == pytest.approx(99.85, abs=0.01)
    assert torch.all(target.diff() > 0)  # monotone: more recognizable -> larger norm


@pytest.mark.parametrize("p", P_GRID)
def test_qcface_target_norm_minimises_f(p):
    prior = NormPrior()
    grid = torch.linspace(0.05, 150.0, 200_001, dtype=torch.float64)
    at_target = prior.objective(prior.target_norm(torch.tensor(p, dtype=torch.float64)), p)
    assert at_target.item() == pytest.approx(qc_f(qc_zstar(p), p), rel=1e-12)
    # z* differs from the exact argmin (sqrt(...) - eps, without eps in the denominator) only
    # through the eps stabiliser; the largest gap is at p = 1 (99.85 vs 99.999): ~1e-6 of f.
    assert at_target.item() <= prior.objective(grid, p).min().item() * (1 + 1e-5)


def test_qcface_recognizability_inverts_target_norm():
    prior = NormPrior()
    p = torch.linspace(0, 1, 101, dtype=torch.float64)
    torch.testing.assert_close(prior.recognizability(prior.target_norm(p)), p, atol=1e-10,
                               rtol=0)
    assert prior.recognizability(torch.tensor([0.0, 500.0], dtype=torch.float64)).tolist() == [
        0.0, 1.0]


def qcface_setup(norm_phase: bool, dtype=torch.float32):
    x, y, centres, _, _ = make_inputs(5, dtype)
    head = make_head("qcface", norm_phase=norm_phase).to(dtype)
    with torch.no_grad():
        head.weight.copy_(centres)
    x = x.clone().requires_grad_()
    return head, x, y


def test_qcface_identity_loss_has_no_radial_gradient():
    head, x, y = qcface_setup(norm_phase=False)
    out = head(x, y)
    assert out.metrics["norm_loss"] > 0  # reported although not trained
    assert out.loss.item() == pytest.approx(float(out.metrics["identity_loss"]), rel=1e-7)
    out.loss.backward()
    radial = (x.grad * x.detach()).sum(dim=1) / x.detach().norm(dim=1)
    assert torch.all(radial.abs() < 1e-6 * x.grad.norm(dim=1))


def test_qcface_regulariser_pushes_norm_towards_target():
    head, x, y = qcface_setup(norm_phase=True, dtype=torch.float64)
    out = head(x, y)
    out.loss.backward()
    norms = x.detach().norm(dim=1)
    radial = (x.grad * x.detach()).sum(dim=1) / norms
    target = out.extras["target_norm"]
    # Gradient descent moves a by -radial: towards z*(p) from either side.
    assert torch.all(torch.sign(radial) == torch.sign(norms - target))
    # And the radial gradient is exactly lambda_g / B * df/da.
    p = out.extras["p"]
    k = NormPrior().k
    dfda = k * p * (-1 / (norms + 1e-3) ** 2 + 1 / 100**2) + (1 - p) * (
        -1 / (norms + 1e-3) ** 2 + 1.0)
    torch.testing.assert_close(radial, dfda / B, rtol=1e-6, atol=1e-9)


def test_qcface_quality_is_recovered_p_and_p_is_label_softmax():
    head, x, y = qcface_setup(norm_phase=True, dtype=torch.float64)
    out = head(x, y)
    cos = torch.nn.functional.normalize(x.detach(), dim=1) @ torch.nn.functional.normalize(
        head.weight.detach(), dim=1).T
    expected_p = torch.softmax(64 * cos, dim=1)[torch.arange(B), y]
    torch.testing.assert_close(out.extras["p"], expected_p)
    # A face sitting exactly at its target norm gets its own p back as quality.
    unit = torch.nn.functional.normalize(x.detach(), dim=1)
    at_target = unit * out.extras["target_norm"][:, None]
    again = head(at_target, y)
    torch.testing.assert_close(again.quality, expected_p, atol=1e-8, rtol=0)


# ----------------------------------------------------------------------------------------------
# MagFace, AdaFace, CurricularFace statistics
# ----------------------------------------------------------------------------------------------
def test_magface_warns_below_lambda_bound():
    with pytest.warns(UserWarning, match="below the paper's bound"):
        make_head("magface", lambda_g=20.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_head("magface")  # default 35 is above the bound (~22.6)


def test_adaface_ema_updates_before_z_and_is_saved():
    x, y, centres, _, _ = make_inputs(6, torch.float64)
    head = make_head("adaface").double().train()
    norms = x.norm(dim=1).numpy()
    z1, mu1, sigma1 = ref_adaface_z(norms, 20.0, 100.0)
    out = head(x, y)
    stats = head.norm_statistic
    assert stats.batch_mean.item() == pytest.approx(mu1, rel=1e-12)
    assert stats.batch_std.item() == pytest.approx(sigma1, rel=1e-12)
    np.testing.assert_allclose(out.extras["z"].numpy(), z1, rtol=1e-12)  # z uses updated stats
    z2, mu2, sigma2 = ref_adaface_z(norms * 0.5, mu1, sigma1)
    out = head(x * 0.5, y)
    assert stats.batch_mean.item() == pytest.approx(mu2, rel=1e-12)
    assert stats.batch_std.item() == pytest.approx(sigma2, rel=1e-12)
    # Eval mode reads without updating.
    head.eval()
    z3, _, _ = ref_adaface_z(norms, mu2, sigma2, training=False)
    np.testing.assert_allclose(head(x, y).extras["z"].numpy(), z3, rtol=1e-12)
    assert stats.batch_mean.item() == pytest.approx(mu2, rel=1e-12)
    # Saved and restored through state_dict.
    state = head.state_dict()
    assert state["norm_statistic.batch_mean"].item() == pytest.approx(mu2, rel=1e-12)
    fresh = make_head("adaface").double()
    fresh.load_state_dict(state)
    assert fresh.norm_statistic.batch_std.item() == pytest.approx(sigma2, rel=1e-12)


def test_curricular_t_is_an_ema_buffer():
    x, y, centres, _, _ = make_inputs(7, torch.float64)
    head = make_head("curricular").double().train()
    with torch.no_grad():
        head.weight.copy_(centres)
    head(x, y)
    cos = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(centres, dim=1).T
    expected = 0.01 * cos[torch.arange(B), y].mean().item()
    assert head.t.item() == pytest.approx(expected, rel=1e-12)
    head.eval()
    head(x, y)
    assert head.t.item() == pytest.approx(expected, rel=1e-12)
    assert "t" in head.state_dict()


# ----------------------------------------------------------------------------------------------
# QGFace
# ----------------------------------------------------------------------------------------------
def test_qgface_queue_correction_hand_made():
    head = make_head("qgface", queue_size=2).double().eval()
    with torch.no_grad():
        head.weight.zero_()
        head.weight[3, :2] = torch.tensor([1.0, 1.0], dtype=torch.float64)  # W_now of class 3
        head.queue_embeddings[0, :2] = torch.tensor([2.0, 0.0])
        head.queue_proxies[0, :2] = torch.tensor([1.0, 0.0])  # W_old of class 3
        head.queue_labels[0] = 3
    batch = head.prepare_batch(torch.ones(1, D, dtype=torch.float64), torch.tensor([0]), None,
                               None, None, LOCAL)
    corrected = head.corrected_queue(batch)
    # e' = e + ||e|| / ||W_old|| (W_now - W_old) = (2, 0) + 2 (0, 1) = (2, 2)
    assert corrected[0, :2].tolist() == [2.0, 2.0]
    assert torch.all(corrected[0, 2:] == 0)
    # With the class absent from this subset, the entry keeps its stored value.
    subset_batch = head.prepare_batch(torch.ones(1, D, dtype=torch.float64), torch.tensor([0]),
                                      head.weight[:2], None, torch.tensor([0, 1]), batch.reducer)
    assert head.corrected_queue(subset_batch)[0, :2].tolist() == [2.0, 0.0]


def filled_qgface(seed=8, queue_size=40, stored=6, **params):
    """A float64 QGFace whose queue holds ``stored`` entries of classes 0.. with drifted centres."""
    x, y, centres, _, second = make_inputs(seed, torch.float64)
    gen = torch.Generator().manual_seed(seed)
    head = make_head("qgface", queue_size=queue_size, **params).double().train()
    with torch.no_grad():
        head.weight.copy_(centres)
        head.queue_embeddings[:stored] = torch.randn(stored, D, generator=gen) * 20
        head.queue_proxies[:stored] = centres[:stored] + 0.2 * torch.randn(stored, D,
                                                                          generator=gen)
        head.queue_labels[:stored] = torch.arange(stored)
        head.queue_ptr.fill_(stored % queue_size)
        head.queue_filled.fill_(stored)
    return head, x, y, centres, second


def stored_queue(head):
    """The head's filled queue entries, oldest first, as the reference's list of tuples."""
    count = int(head.queue_filled)
    start = int(head.queue_ptr) - count if count < head.queue_size else int(head.queue_ptr)
    slots = [(start + j) % head.queue_size for j in range(count)]
    return [(head.queue_embeddings[j].numpy().copy(), int(head.queue_labels[j]),
             head.queue_proxies[j].numpy().copy()) for j in slots]


OLD_QGFACE = {"enqueue_first": False, "classify_both_views": False, "split_by": "first",
              "symmetric": False}


@pytest.mark.parametrize("options", [
    {},
    {"enqueue_first": False},
    {"classify_both_views": False},
    {"split_by": "first"},
    {"split_by": "mean"},
    {"split_by": "max"},
    {"symmetric": False},
    {"initial_statistics": "zero"},
    OLD_QGFACE,
], ids=lambda options: ",".join(f"{k}={v}" for k, v in options.items()) or "defaults")
def test_qgface_loss_with_queue_matches_formula(options):
    head, x, y, centres, second = filled_qgface(**options)
    # Norms well below 20 for half the samples, so each option changes which pairs are LQ.
    x[: B // 2] *= 0.3
    reference_options = {k: v for k, v in options.items() if k != "initial_statistics"}
    if options.get("initial_statistics") == "zero":
        reference_options.update(mu_old=0.0, sigma_old=0.0)
        assert head.norm_statistic.batch_mean.item() == 0.0
    expected = ref_qgface(x.numpy(), y.numpy(), centres.numpy(), second.numpy(),
                          stored_queue(head), queue_size=head.queue_size, **reference_options)
    out = head(x, y, second_view=second)
    if options.get("initial_statistics") == "zero":
        # mu, sigma ~ 0.01 of the batch's: z saturates at +1, every pair is HQ at first.
        assert out.metrics["fraction_low_quality"] == 0.0
    else:
        assert out.metrics["contrastive_loss"] > 0
        assert 0 < out.metrics["fraction_low_quality"] < 1
    assert out.loss.item() == pytest.approx(expected, rel=1e-9)
    # A second step with the queue the first one left (FIFO, corrections, statistics).
    with torch.no_grad():
        head.weight.add_(0.1 * torch.randn_like(head.weight))
    mu, sigma = head.norm_statistic.batch_mean.item(), head.norm_statistic.batch_std.item()
    expected = ref_qgface(x.numpy() * 1.1, y.numpy(), head.weight.detach().numpy(),
                          second.numpy(), stored_queue(head), queue_size=head.queue_size,
                          **{**reference_options, "mu_old": mu, "sigma_old": sigma})
    assert head(x * 1.1, y, second_view=second).loss.item() == pytest.approx(expected, rel=1e-9)


def test_qgface_options_change_the_loss_and_are_validated():
    losses = {}
    for name, options in [("defaults", {}), ("old", OLD_QGFACE)]:
        head, x, y, _, second = filled_qgface(**options)
        losses[name] = head(x * 0.5, y, second_view=second).loss.item()
    assert losses["defaults"] != pytest.approx(losses["old"], rel=1e-6)
    for params, message in [({"split_by": "low"}, "split_by"),
                            ({"symmetric": 1}, "symmetric"),
                            ({"initial_statistics": "ones"}, "initial_statistics")]:
        with pytest.raises(ValueError, match=message):
            make_head("qgface", **params)


def test_qgface_split_by_min_uses_the_worse_view():
    head, x, y, _, second = filled_qgface()
    # First views of high norm (HQ alone), second views of norm 1: only "first" calls them HQ.
    x_hq = torch.nn.functional.normalize(x, dim=1) * 200
    low = torch.nn.functional.normalize(second, dim=1)
    assert head.eval()(x_hq, y, second_view=low).metrics["fraction_low_quality"] == 1.0
    head_first, *_ = filled_qgface(split_by="first")
    assert head_first.eval()(x_hq, y, second_view=low).metrics["fraction_low_quality"] == 0.0


def test_qgface_same_label_entries_are_not_negatives():
    head, x, y, centres, second = filled_qgface()
    # Norm 5 is far below the initial AdaFace mean (20): all six rows are low quality.
    x_same = torch.nn.functional.normalize(x[:6], dim=1) * 5
    y_same = torch.full((6,), int(y[0]))
    head.queue_labels.fill_(int(y_same[0]))
    out = head.eval()(x_same, y_same, second_view=second[:6])
    assert out.metrics["fraction_low_quality"] == 1.0
    # Every queue entry has the sample's label: only the positive is left, so the loss is 0.
    assert out.metrics["contrastive_loss"] == 0.0
    # One entry of another class, pointing exactly along sample 0 (and no centre drift): a
    # negative at cosine 1, at least as close as the positive, so sample 0's loss >= log 2.
    other = (int(y_same[0]) + 1) % C
    with torch.no_grad():
        head.queue_labels[0] = other
        head.queue_embeddings[0] = x_same[0] * 3
        head.queue_proxies[0] = head.weight[other]
    loss = head(x_same, y_same, second_view=second[:6]).metrics["contrastive_loss"]
    assert loss >= math.log(2) / 6


def test_qgface_queue_fifo_and_state_dict_round_trip():
    x, y, centres, _, second = make_inputs(9, torch.float64)
    head = make_head("qgface", queue_size=30, contrastive_start_step=2).double().train()
    first = head(x, y, second_view=second)
    assert first.metrics["contrastive_active"] == 0.0
    assert head.queue_filled.item() == 2 * B  # both views of every sample
    head(x * 0.8, y, second_view=second)
    assert head.queue_filled.item() == 30 and head.queue_ptr.item() == 4 * B % 30
    # Rows [x * 0.8; second] went to slots 24, 25, ...: slots 0..17 hold rows 6..23.
    stored = torch.cat([x * 0.8, second])
    torch.testing.assert_close(head.queue_embeddings[:18], stored[6:])
    torch.testing.assert_close(head.queue_proxies[:18], head.weight.detach()[y.repeat(2)[6:]])
    assert head.queue_labels[:18].tolist() == y.repeat(2)[6:].tolist()
    state = head.state_dict()
    for key in ("queue_embeddings", "queue_labels", "queue_proxies", "queue_ptr",
                "queue_filled", "step"):
        assert key in state
    restored = make_head("qgface", queue_size=30, contrastive_start_step=2).double().train()
    restored.load_state_dict(state)
    a = head(x, y, second_view=second)
    b = restored(x, y, second_view=second)
    assert a.metrics["contrastive_active"] == 1.0
    assert a.loss.item() == pytest.approx(b.loss.item(), rel=1e-12)


def test_qgface_first_view_only_enqueues_b_rows():
    x, y, _, _, second = make_inputs(9, torch.float64)
    head = make_head("qgface", queue_size=30, classify_both_views=False).double().train()
    out = head(x, y, second_view=second)
    assert head.queue_filled.item() == B and out.logits.shape == (B, C)
    torch.testing.assert_close(head.queue_embeddings[:B], x)


# ----------------------------------------------------------------------------------------------
# EQFace
# ----------------------------------------------------------------------------------------------
def eqface_setup(stage):
    x, y, centres, features, _ = make_inputs(10, torch.float64)
    head = make_head("eqface", stage=stage).double()
    with torch.no_grad():
        head.weight.copy_(centres)
        bn = head.quality_branch.layers[1]
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return head.train(), x.clone().requires_grad_(), y, centres, features.clone()


def branch_params(head):
    lin1, bn, _, lin2 = head.quality_branch.layers
    return [t.detach().numpy() for t in (lin1.weight, lin1.bias, bn.weight, bn.bias,
                                         bn.running_mean, bn.running_var, lin2.weight, lin2.bias)]


def test_eqface_stage1_uses_unit_scale_and_reports_branch():
    head, x, y, centres, features = eqface_setup(1)
    out = head(x, y, features=features)
    expected = ref_combined(x.detach().numpy(), y.numpy(), centres.numpy(), 1.0, 0.3, 0.2)
    assert out.loss.item() == pytest.approx(expected, rel=1e-9)
    s = ref_eqface_branch(features.numpy(), branch_params(head))
    np.testing.assert_allclose(out.quality.numpy(), s, rtol=1e-9)
    out.loss.backward()
    assert all(p.grad is None for p in head.quality_branch.parameters())
    assert head.trainable_parameters(1) == [head.weight]


def test_eqface_stage3_scales_logits_by_frozen_branch():
    head, x, y, centres, features = eqface_setup(3)
    mean_before = head.quality_branch.layers[1].running_mean.clone()
    s = ref_eqface_branch(features.numpy(), branch_params(head))
    out = head(x, y, features=features)
    expected = ref_combined(x.detach().numpy(), y.numpy(), centres.numpy(), 1.0, 0.3, 0.2,
                            row_scale=s)
    assert out.loss.item() == pytest.approx(expected, rel=1e-9)
    out.loss.backward()
    assert all(p.grad is None for p in head.quality_branch.parameters())
    assert x.grad is not None and head.weight.grad is not None
    torch.testing.assert_close(head.quality_branch.layers[1].running_mean, mean_before)
    assert head.trainable_parameters(3) == [head.weight]


def test_eqface_stage2_trains_only_the_branch():
    head, x, y, _, features = eqface_setup(2)
    out = head(x, y, features=features)
    out.loss.backward()
    grads = [p.grad for p in head.quality_branch.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    assert x.grad is None and head.weight.grad is None
    assert head.trainable_parameters() == list(head.quality_branch.parameters())
    assert 0 < out.quality.min() and out.quality.max() < 1


# ----------------------------------------------------------------------------------------------
# Quality estimators
# ----------------------------------------------------------------------------------------------
ESTIMATOR_HEADS = {"arcface": "norm", "magface": "norm", "adaface": "norm", "qgface": "norm",
                   "curricular": "norm", "qcface": "qcface", "qcface-mv": "qcface",
                   "eqface": "eqface"}


@pytest.mark.parametrize(("name", "kind"), sorted(ESTIMATOR_HEADS.items()))
def test_estimator_round_trip(name, kind):
    head = make_head(name)
    estimator = head.quality_estimator().eval()
    config = estimator.config()
    assert config["kind"] == kind
    rebuilt = build_quality_estimator(json.loads(json.dumps(config)), estimator.state_dict())
    x = torch.randn(5, D) * 30
    features = torch.randn(5, FEAT)
    torch.testing.assert_close(rebuilt(x, features), estimator(x, features))
    assert rebuilt.requires_features == head.requires_features


def test_estimators_match_head_quality():
    x, y, centres, features, _ = make_inputs(11, torch.float32)
    for name in ("qcface", "magface"):
        head = make_head(name).eval()
        torch.testing.assert_close(head.quality_estimator()(x), head(x, y).quality)
    head = make_head("eqface", stage=3).eval()
    torch.testing.assert_close(head.quality_estimator()(x, features),
                               head(x, y, features=features).quality)


def test_qcface_estimator_inverts_target_norm_exactly():
    estimator = build_quality_estimator({"kind": "qcface", "u_a": 100.0, "l_a": 1.0, "eps": 1e-3})
    for p in P_GRID:
        x = torch.zeros(1, D, dtype=torch.float64)
        x[0, 0] = qc_zstar(p)
        assert estimator(x).item() == pytest.approx(p, abs=1e-6)


def test_estimator_config_errors():
    with pytest.raises(QualityConfigError, match="unknown quality estimator kind"):
        build_quality_estimator({"kind": "magic"})
    with pytest.raises(QualityConfigError, match="disagrees"):
        build_quality_estimator({"kind": "qcface", "u_a": 100.0, "l_a": 1.0, "k": 5.0})
    with pytest.raises(QualityConfigError, match="bad 'eqface'"):
        build_quality_estimator({"kind": "eqface", "dim": 3})


@pytest.mark.parametrize(
    "estimator", [NormQuality(), QCFaceQuality(), EQFaceQuality(FEAT, 8)],
    ids=["norm", "qcface", "eqface"],
)
def test_estimators_export_to_onnx(estimator):
    ort = pytest.importorskip("onnxruntime")
    estimator.eval()
    x, features = torch.randn(3, D) * 30, torch.randn(3, FEAT)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(estimator, (x, features), buffer, dynamo=False,
                          input_names=["embeddings", "features"], output_names=["quality"],
                          dynamic_axes={"embeddings": {0: "batch"}, "features": {0: "batch"}})
    session = ort.InferenceSession(buffer.getvalue())
    x2, f2 = torch.randn(6, D) * 30, torch.randn(6, FEAT)
    names = [i.name for i in session.get_inputs()]
    feeds = {"embeddings": x2.numpy(), "features": f2.numpy()}
    (quality,) = session.run(None, {n: feeds[n] for n in names})
    np.testing.assert_allclose(quality, estimator(x2, f2).detach().numpy(), rtol=1e-5, atol=1e-6)
    assert math.isfinite(float(quality.sum()))
