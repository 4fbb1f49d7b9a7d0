"""Every head's loss against an independent float64 reference written from the formulas.

The references below deliberately use plain numpy loops (no code from ``qualiface.heads``), so a
shared helper bug cannot hide in both sides.
"""

from __future__ import annotations

import copy
import math
import threading

import numpy as np
import pytest
import torch

from qualiface.heads import HEADS, build_head
from qualiface.heads.base import ClassReducer

B, D, C, FEAT = 12, 16, 9, 10
EPS = 1e-6  # the cosine clamp before acos


# ----------------------------------------------------------------------------------------------
# Independent reference maths (float64 numpy, loops)
# ----------------------------------------------------------------------------------------------
def cosines(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    out = np.zeros((x.shape[0], w.shape[0]))
    for i in range(x.shape[0]):
        for j in range(w.shape[0]):
            out[i, j] = x[i] @ w[j] / (np.linalg.norm(x[i]) * np.linalg.norm(w[j]))
    return out


def arc(c: float, m: float) -> float:
    """cos(theta + m), or the fallback cos(theta) - sin(pi - m) m when theta + m > pi."""
    theta = math.acos(min(max(c, -1 + EPS), 1 - EPS))
    if theta + m < math.pi:
        return math.cos(theta + m)
    return c - math.sin(math.pi - m) * m


def logsumexp(values) -> float:
    values = np.asarray(values, dtype=np.float64)
    top = values.max()
    return float(top + np.log(np.exp(values - top).sum()))


def softmax_ce(rows: list[np.ndarray], targets) -> float:
    return float(np.mean([logsumexp(r) - r[t] for r, t in zip(rows, targets, strict=True)]))


def ref_combined(x, y, w, m1, m2, m3, s=64.0, row_scale=None):
    cos = cosines(x, w)
    rows = []
    for i in range(len(y)):
        logits = cos[i].copy()
        logits[y[i]] = m1 * arc(cos[i, y[i]], m2) - m3
        rows.append(logits * s * (1.0 if row_scale is None else row_scale[i]))
    return softmax_ce(rows, y)


def ref_curricular(x, y, w, t_old, m=0.5, s=64.0, momentum=0.01):
    cos = cosines(x, w)
    t = momentum * np.mean([cos[i, y[i]] for i in range(len(y))]) + (1 - momentum) * t_old
    rows = []
    for i in range(len(y)):
        target = arc(cos[i, y[i]], m)
        logits = np.empty(w.shape[0])
        for j in range(w.shape[0]):
            if j == y[i]:
                logits[j] = target
            elif cos[i, j] > target:
                logits[j] = cos[i, j] * (t + cos[i, j])
            else:
                logits[j] = cos[i, j]
        rows.append(s * logits)
    return softmax_ce(rows, y), t


def ref_mv(x, y, w, m_arc=0.5, m_cos=0.0, t=1.2, s=64.0):
    cos = cosines(x, w)
    rows = []
    for i in range(len(y)):
        target = arc(cos[i, y[i]], m_arc) - m_cos
        logits = np.empty(w.shape[0])
        for j in range(w.shape[0]):
            if j == y[i]:
                logits[j] = target
            elif cos[i, j] > target:
                logits[j] = t * cos[i, j] + t - 1
            else:
                logits[j] = cos[i, j]
        rows.append(s * logits)
    return softmax_ce(rows, y)


def ref_magface(x, y, w, l_a=10.0, u_a=110.0, l_m=0.45, u_m=0.8, lam=35.0, s=64.0):
    cos = cosines(x, w)
    rows, reg = [], []
    for i in range(len(y)):
        a = min(max(np.linalg.norm(x[i]), l_a), u_a)
        m = (u_m - l_m) / (u_a - l_a) * (a - l_a) + l_m
        logits = cos[i].copy()
        logits[y[i]] = arc(cos[i, y[i]], m)
        rows.append(s * logits)
        reg.append(1 / a + a / u_a**2)
    return softmax_ce(rows, y) + lam * np.mean(reg)


def ref_adaface_z(norms, mu_old, sigma_old, h=0.333, alpha=0.01, training=True):
    mu, sigma = mu_old, sigma_old
    if training:
        mu = alpha * np.mean(norms) + (1 - alpha) * mu_old
        sigma = alpha * np.std(norms, ddof=1) + (1 - alpha) * sigma_old
    z = np.clip(h * (norms - mu) / (sigma + 1e-3), -1, 1)
    return z, mu, sigma


def adaface_target(c, z, m=0.4, eps=1e-3):
    theta = math.acos(min(max(c, -1 + EPS), 1 - EPS))
    return math.cos(min(max(theta - m * z, eps), math.pi - eps)) - (m + m * z)


def ref_adaface(x, y, w, mu_old=20.0, sigma_old=100.0, s=64.0):
    cos = cosines(x, w)
    z, mu, sigma = ref_adaface_z(np.linalg.norm(x, axis=1), mu_old, sigma_old)
    rows = []
    for i in range(len(y)):
        logits = cos[i].copy()
        logits[y[i]] = adaface_target(cos[i, y[i]], z[i])
        rows.append(s * logits)
    return softmax_ce(rows, y), mu, sigma


def qc_constants(u_a=100.0, l_a=1.0):
    mid = (u_a + l_a) / 2
    return (mid**2 / l_a**2 - 1) / (1 - mid**2 / u_a**2)


def qc_f(a, p, u_a=100.0, l_a=1.0, eps=1e-3):
    k = qc_constants(u_a, l_a)
    return k * p * (1 / (a + eps) + a / u_a**2) + (1 - p) * (1 / (a + eps) + a / l_a**2)


def qc_zstar(p, u_a=100.0, l_a=1.0, eps=1e-3):
    k = qc_constants(u_a, l_a)
    return math.sqrt(((k - 1) * p + 1) / ((k / u_a**2 - 1 / l_a**2) * p + 1 / l_a**2 + eps))


def ref_qcface_regulariser(x, y, w, s=64.0):
    cos = cosines(x, w)
    gaps = []
    for i in range(len(y)):
        p = math.exp(s * cos[i, y[i]] - logsumexp(s * cos[i]))
        a = np.linalg.norm(x[i])
        gaps.append(qc_f(a, p) - qc_f(qc_zstar(p), p))
    return float(np.mean(gaps))


def ref_eqface_branch(features, params, bn_eps=1e-5):
    w1, b1, gamma, beta, mean, var, w2, b2 = params
    out = []
    for f in features:
        hidden = w1 @ f + b1
        hidden = (hidden - mean) / np.sqrt(var + bn_eps) * gamma + beta
        hidden = np.maximum(hidden, 0)
        out.append(1 / (1 + math.exp(-(w2 @ hidden + b2)[0])))
    return np.array(out)


def ref_qgface(x, y, w, second, queue, tau=0.5, s=64.0, mu_old=20.0, sigma_old=100.0,
               queue_size=4096, enqueue_first=True, classify_both_views=True, split_by="min",
               symmetric=True, training=True):
    """queue: list of (embedding, label, proxy_at_enqueue), oldest first (at most queue_size)."""
    n = len(y)
    views = [x, second] if classify_both_views else [x]
    rows_x = np.concatenate(views)
    rows_y = np.concatenate([y] * len(views))
    z_rows, mu, sigma = ref_adaface_z(np.linalg.norm(rows_x, axis=1), mu_old, sigma_old,
                                      training=training)
    cos = cosines(rows_x, w)
    rows = []
    for r in range(len(rows_y)):
        gate = 1 / (1 + math.exp(-s * (z_rows[r] + 2 * (0.5 - tau))))
        logits = cos[r].copy()
        logits[rows_y[r]] = adaface_target(cos[r, rows_y[r]], z_rows[r])
        rows.append(s * gate * logits)
    cls = softmax_ce(rows, rows_y)
    if classify_both_views:
        z_second = z_rows[n:]
    else:  # read-only statistics (already updated with the first view)
        z_second = np.clip(0.333 * (np.linalg.norm(second, axis=1) - mu) / (sigma + 1e-3), -1, 1)
    q_first, q_second = (z_rows[:n] + 1) / 2, (z_second + 1) / 2
    pair_q = {"first": q_first, "min": np.minimum(q_first, q_second),
              "mean": (q_first + q_second) / 2, "max": np.maximum(q_first, q_second)}[split_by]
    queue = list(queue)
    if training and enqueue_first:
        queue = (queue + [(e, label, w[label]) for e, label in zip(rows_x, rows_y)])[-queue_size:]
    directions = [(x, second), (second, x)] if symmetric else [(x, second)]
    con = []
    for queries, keys in directions:
        for i in range(n):
            if pair_q[i] >= tau:
                continue
            u = queries[i] / np.linalg.norm(queries[i])
            k = keys[i] / np.linalg.norm(keys[i])
            values = [s * (u @ k)]
            for e, label, old in queue:
                if label == y[i]:
                    continue
                e2 = e + np.linalg.norm(e) / np.linalg.norm(old) * (w[label] - old)
                values.append(s * (u @ e2) / np.linalg.norm(e2))
            con.append(logsumexp(values) - values[0])
    return cls + (np.mean(con) if con else 0.0)


# ----------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------
def make_inputs(seed: int = 0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (B,), generator=gen)
    centres = torch.randn(C, D, generator=gen, dtype=dtype)
    # Pull embeddings towards their centres so targets span easy and hard cases, with norms
    # spread over 3..60 so the norm-dependent heads see varied behaviour.
    direction = centres[labels] * torch.rand(B, 1, generator=gen, dtype=dtype) * 2
    direction = direction + torch.randn(B, D, generator=gen, dtype=dtype)
    norms = 3 + 57 * torch.rand(B, 1, generator=gen, dtype=dtype)
    x = direction / direction.norm(dim=1, keepdim=True) * norms
    features = torch.randn(B, FEAT, generator=gen, dtype=dtype)
    second = x + 2 * torch.randn(B, D, generator=gen, dtype=dtype)
    return x, labels, centres, features, second


def make_head(name: str, num_classes: int = C, **params):
    if name == "eqface":
        params = {"feature_dim": FEAT, "hidden": 8, **params}
    return build_head(name, D, num_classes, **params)


ALL_HEADS = ["arcface", "cosface", "combined", "curricular", "mv-softmax", "magface", "adaface",
             "qcface", "qcface-cur", "qcface-mv", "eqface", "qgface"]


def test_registry_lists_every_head():
    build_head("arcface", D, C)  # loads the registry
    assert set(ALL_HEADS) <= set(HEADS.names())


def run(head, x, y, *, features=None, second=None, **kwargs):
    return head(x, y, features=features, second_view=second, **kwargs)


# ----------------------------------------------------------------------------------------------
# Loss == formula, in float64 (tight) and float32 (loose)
# ----------------------------------------------------------------------------------------------
def reference_loss(name, head, x, y, w, features, second):
    x, w = x.double().numpy(), w.double().numpy()
    y = y.numpy()
    if name == "arcface":
        return ref_combined(x, y, w, 1.0, 0.5, 0.0)
    if name == "cosface":
        return ref_combined(x, y, w, 1.0, 0.0, 0.35)
    if name == "combined":
        return ref_combined(x, y, w, 1.0, 0.3, 0.2)
    if name == "curricular":
        return ref_curricular(x, y, w, t_old=float(head.t))[0]
    if name == "mv-softmax":
        return ref_mv(x, y, w)
    if name == "magface":
        return ref_magface(x, y, w)
    if name == "adaface":
        return ref_adaface(x, y, w)[0]
    if name == "qcface":
        return ref_combined(x, y, w, 1.0, 0.5, 0.0) + ref_qcface_regulariser(x, y, w)
    if name == "qcface-cur":
        return ref_curricular(x, y, w, t_old=0.0)[0] + ref_qcface_regulariser(x, y, w)
    if name == "qcface-mv":
        return ref_mv(x, y, w) + ref_qcface_regulariser(x, y, w)
    if name == "eqface":  # stage 1: s_i = 1
        return ref_combined(x, y, w, 1.0, 0.3, 0.2)
    if name == "qgface":
        return ref_qgface(x, y, w, second.double().numpy(), queue=[])
    raise AssertionError(name)


@pytest.mark.parametrize("name", ALL_HEADS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_loss_matches_formula(name, dtype):
    x, y, centres, features, second = make_inputs(1, torch.float64)
    head = make_head(name).to(dtype).train()
    with torch.no_grad():
        head.weight.copy_(centres.to(dtype))
    expected = reference_loss(name, copy.deepcopy(head), x, y, centres, features, second)
    x_in = x.to(dtype).requires_grad_()
    out = run(head, x_in, y, features=features.to(dtype), second=second.to(dtype))
    tolerance = 1e-5 if dtype == torch.float64 else 2e-4
    assert float(out.loss.detach()) == pytest.approx(expected, rel=tolerance, abs=tolerance)
    out.loss.backward()
    assert torch.isfinite(x_in.grad).all() and torch.isfinite(head.weight.grad).all()
    assert out.quality.shape == (B,) and not out.quality.requires_grad
    assert out.logits.shape == (B, C)
    assert "norm" in out.extras
    # Metrics are Python floats (host-known settings) or detached 0-d tensors (no host sync).
    for key, value in out.metrics.items():
        assert isinstance(value, float) or (
            isinstance(value, torch.Tensor) and value.dim() == 0 and not value.requires_grad
        ), key


def test_arcface_fallback_past_pi_is_used():
    # A target cosine of -0.99 (theta ~ 3.0 rad) + m = 0.5 passes pi: the fallback must apply.
    head = make_head("arcface").double()
    centres = torch.eye(C, D, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(centres)
    x = torch.zeros(1, D, dtype=torch.float64)
    x[0, 0], x[0, 1] = -0.99, math.sqrt(1 - 0.99**2)
    out = head(x, torch.tensor([0]))
    expected = 64 * (-0.99 - math.sin(math.pi - 0.5) * 0.5)
    assert float(out.logits[0, 0].detach()) == pytest.approx(expected, rel=1e-6)


def test_margin_heads_on_a_hand_made_case():
    # Two classes, embedding at 60 degrees from class 0 and 30 degrees from class 1.
    centres = torch.tensor([[1.0, 0.0], [math.cos(math.pi / 2), 1.0]], dtype=torch.float64)
    angle = math.radians(60)
    x = torch.tensor([[math.cos(angle), math.sin(angle)]], dtype=torch.float64) * 7
    for name, target in [("arcface", math.cos(angle + 0.5)), ("cosface", math.cos(angle) - 0.35)]:
        head = build_head(name, 2, 2).double()
        with torch.no_grad():
            head.weight.copy_(centres)
        out = head(x, torch.tensor([0]))
        assert out.logits[0, 0].item() == pytest.approx(64 * target, rel=1e-9)
        assert out.logits[0, 1].item() == pytest.approx(64 * math.cos(math.radians(30)), rel=1e-9)


@pytest.mark.parametrize("name", ALL_HEADS)
def test_autocast_bfloat16_runs_and_stays_close(name):
    x, y, centres, features, second = make_inputs(2, torch.float32)
    head = make_head(name).eval()
    with torch.no_grad():
        head.weight.copy_(centres)
    reference = float(run(head, x, y, features=features, second=second).loss.detach())
    x_in = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(head, x_in, y, features=features, second=second)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(x_in.grad).all()
    assert float(out.loss.detach()) == pytest.approx(reference, rel=0.05, abs=0.5)


# ----------------------------------------------------------------------------------------------
# Subsets and shards
# ----------------------------------------------------------------------------------------------
def same_state(source, target, rows):
    """Copy every parameter / buffer from ``source`` to ``target`` except the centres."""
    state = {k: v for k, v in source.state_dict().items() if k != "weight"}
    target.load_state_dict({**state, "weight": source.weight.detach()[rows]})


@pytest.mark.parametrize("name", ALL_HEADS)
def test_subset_weight_equals_smaller_head(name):
    x, y, centres, features, second = make_inputs(3, torch.float64)
    subset = torch.tensor([7, 2, 5, 0, 8, 4])
    y = subset[torch.arange(B) % len(subset)]  # every label inside the subset
    big = make_head(name).double().train()
    with torch.no_grad():
        big.weight.copy_(centres)
    small = make_head(name, num_classes=len(subset)).double().train()
    same_state(big, small, subset)
    mapped = torch.tensor([subset.tolist().index(int(label)) for label in y])
    initial_state = copy.deepcopy(big.state_dict())
    out_big = run(big, x, y, features=features, second=second, weight=big.weight[subset],
                  local_labels=mapped, class_ids=subset)
    out_small = run(small, x, mapped, features=features, second=second)
    assert float(out_big.loss.detach()) == pytest.approx(float(out_small.loss.detach()), rel=1e-10)
    torch.testing.assert_close(out_big.quality, out_small.quality)
    # Without local_labels the head maps labels through class_ids itself.
    fresh = make_head(name).double().train()
    fresh.load_state_dict(initial_state)
    again = run(fresh, x, y, features=features, second=second,
                weight=fresh.weight[subset], class_ids=subset)
    assert again.loss.item() == pytest.approx(out_small.loss.item(), rel=1e-10)


class ThreadPairReducer:
    """Two "ranks" as two threads: each reduction exchanges tensors through a barrier.

    ``sum`` returns own + other.detach(): the value of a real all-reduce, and the gradient with
    respect to a rank's *own* class centres equals the unsharded gradient, which the test checks.
    """

    def __init__(self) -> None:
        self.barrier = threading.Barrier(2, timeout=20)
        self.slots: list[torch.Tensor | None] = [None, None]

    def rank(self, rank: int) -> ClassReducer:
        pair = self

        class RankReducer(ClassReducer):
            def exchange(self, tensor):
                pair.slots[rank] = tensor.detach()
                pair.barrier.wait()
                other = pair.slots[1 - rank]
                pair.barrier.wait()
                return other

            def sum(self, tensor):
                return tensor + self.exchange(tensor)

            def max(self, tensor):
                return torch.maximum(tensor, self.exchange(tensor))

        return RankReducer()


@pytest.mark.parametrize("name", ALL_HEADS)
def test_two_shards_equal_unsharded(name):
    x, y, centres, features, second = make_inputs(4, torch.float64)
    full = make_head(name, queue_size=16).double() if name == "qgface" else make_head(name)
    full = full.double().train()
    with torch.no_grad():
        full.weight.copy_(centres)
    if name == "qgface":  # fill the queue once so the shards must agree on the corrections
        run(full, x * 0.9, y.roll(1), second=second)
        with torch.no_grad():
            full.weight.add_(0.3 * torch.randn_like(full.weight))
    shards = [torch.tensor([5, 0, 7, 3]), torch.tensor([2, 8, 1, 6, 4])]
    ranks = [copy.deepcopy(full), copy.deepcopy(full)]
    full_out = run(full, x, y, features=features, second=second)
    full_out.loss.backward()

    pair = ThreadPairReducer()
    results: list = [None, None]
    errors: list = []

    def worker(rank):
        try:
            torch.set_num_threads(1)
            head = ranks[rank]
            local_weight = head.weight.detach()[shards[rank]].clone().requires_grad_()
            out = run(head, x, y, features=features, second=second, weight=local_weight,
                      class_ids=shards[rank], reducer=pair.rank(rank))
            out.loss.backward()
            results[rank] = (out, local_weight.grad)
        except Exception as error:  # surfaced in the main thread below
            errors.append(error)
            pair.barrier.abort()

    threads = [threading.Thread(target=worker, args=(r,)) for r in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for rank in (0, 1):
        out, grad = results[rank]
        assert float(out.loss.detach()) == pytest.approx(full_out.loss.item(), rel=1e-10)
        torch.testing.assert_close(grad, full.weight.grad[shards[rank]], rtol=1e-7, atol=1e-10)
        torch.testing.assert_close(out.quality, full_out.quality)
        assert out.metrics["accuracy"] == full_out.metrics["accuracy"]


# ----------------------------------------------------------------------------------------------
# Input validation
# ----------------------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors():
    head = make_head("arcface")
    x = torch.randn(4, D)
    with pytest.raises(ValueError, match="labels must be in"):
        head(x, torch.tensor([0, 1, 2, C]))
    with pytest.raises(ValueError, match="embeddings must be"):
        head(torch.randn(4, D + 1), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="class_ids"):
        head(x, torch.tensor([0, 1, 2, 3]), weight=head.weight[:3])
    with pytest.raises(ValueError, match="features"):
        make_head("eqface")(x, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="second_view"):
        make_head("qgface").train()(x, torch.tensor([0, 1, 2, 3]))


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("arcface", {"margin": -0.1}, "m2"),
        ("arcface", {"scale": 0}, "scale"),
        ("magface", {"u_a": 5.0}, "u_a"),
        ("qcface", {"l_a": 0.0}, "l_a"),
        ("mv-softmax", {"t": 0.5}, "t must be"),
        ("qgface", {"tau": 1.5}, "tau"),
        ("qgface", {"queue_size": 0}, "queue_size"),
        ("eqface", {"stage": 4}, "stage"),
        ("arcface", {"bogus": 1}, "no parameter"),
    ],
)
def test_constructors_validate_parameters(name, params, message):
    with pytest.raises(ValueError, match=message):
        make_head(name, **params)
    with pytest.raises(ValueError, match="needs parameter"):
        build_head("eqface", D, C)


def test_label_range_check_host_and_device_paths():
    from qualiface.heads.common import CosineHead, HeadInputError

    labels = torch.tensor([0, 2, 5])
    with pytest.raises(HeadInputError, match=r"labels must be in \[0, 3\), got range \[0, 5\]"):
        CosineHead.check_index_range(labels, 0, 3, "labels", on_host=True)
    # The accelerator path is torch._assert_async: on CPU tensors it raises at once.
    with pytest.raises(RuntimeError):
        CosineHead.check_index_range(labels, 0, 3, "labels", on_host=False)
    CosineHead.check_index_range(labels, 0, 6, "labels", on_host=False)  # in range: no error
    CosineHead.check_index_range(labels[:0], 0, 1, "labels", on_host=True)  # empty: nothing


def test_easy_margin_applies_no_margin_where_cos_is_not_positive():
    from qualiface.heads.common import arc_margin

    cos = torch.linspace(-0.99, 0.99, 199, dtype=torch.float64)
    theta = torch.arccos(cos)
    got = arc_margin(cos, 0.5, easy_margin=True)
    expected = torch.where(cos > 0, torch.cos(theta + 0.5), cos)
    assert torch.allclose(got, expected, atol=1e-9)
    # the default keeps ArcFace's monotone fallback, which differs for cos <= 0
    assert not torch.allclose(arc_margin(cos, 0.5), got)


def test_qcface_easy_margin_reaches_the_loss():
    from qualiface.heads import build_head

    torch.manual_seed(0)
    x, y = torch.randn(16, 8), torch.randint(0, 5, (16,))
    heads = [build_head("qcface", embedding_size=8, num_classes=5, easy_margin=flag)
             for flag in (False, True)]
    heads[1].load_state_dict(heads[0].state_dict())
    with torch.no_grad():
        heads[0].weight.copy_(-x[:5])  # targets far from their centre: cos < 0 for some rows
        heads[1].weight.copy_(-x[:5])
    losses = [h(x, y).loss.item() for h in heads]
    assert losses[0] != pytest.approx(losses[1])
