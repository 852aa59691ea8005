"""digits-FD, the classifier behind it, and teacher_rmse."""
import numpy as np
import pytest
import torch

from ld3_ext.metrics import digits_fd, digits_features, digits_reference_stats, frechet_distance, gaussian_stats, teacher_rmse
from ld3_ext.models.digits import real_digits
from ld3_ext.models.digits_classifier import classifier_sha256, digits_split, load_digits_classifier


def test_classifier_heldout_accuracy():
    net = load_digits_classifier()
    assert not any(p.requires_grad for p in net.parameters()) and not net.training
    _, _, xte, yte = digits_split(seed=0)
    with torch.no_grad():
        acc = float((net(xte).argmax(1) == yte).float().mean())
    assert xte.shape[0] == 449
    assert acc >= 0.95, acc
    assert len(classifier_sha256()) == 64


def test_frechet_distance_closed_form():
    # diagonal Gaussians: FD = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    a, b = np.array([1.0, 4.0, 0.25]), np.array([4.0, 1.0, 1.0])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    got = frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(want, rel=1e-10)
    assert frechet_distance(mu1, np.diag(a), mu1, np.diag(a)) == pytest.approx(0.0, abs=1e-10)


def test_frechet_distance_decomposes_cov1_once_and_matches_scipy_sqrtm(monkeypatch):
    """cov1's eigendecomposition serves both its positive semi-definiteness check and C1^1/2 (it was computed twice);
    the value equals the textbook tr(sqrtm(C1 C2)) form, by scipy."""
    sqrtm = pytest.importorskip("scipy.linalg").sqrtm
    rng = np.random.default_rng(0)
    d = 7
    a, b = rng.standard_normal((d, 3 * d)), rng.standard_normal((d, 3 * d))
    c1, c2 = a @ a.T / (3 * d), b @ b.T / (3 * d) + 0.1 * np.eye(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    seen = []
    for fn in ("eigh", "eigvalsh", "eig", "eigvals", "svd", "cholesky"):
        def spy(m, *args, _real=getattr(np.linalg, fn), _fn=fn, **kw):
            seen.append((_fn, np.array(m, copy=True)))
            return _real(m, *args, **kw)
        monkeypatch.setattr(np.linalg, fn, spy)
    got = frechet_distance(mu1, c1, mu2, c2)
    monkeypatch.undo()
    of_cov1 = [fn for fn, m in seen if m.shape == c1.shape and np.allclose(m, c1, rtol=1e-13, atol=0)]
    assert of_cov1 == ["eigh"], of_cov1
    want = ((mu1 - mu2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2.0 * np.trace(sqrtm(c1 @ c2)).real
    assert got == pytest.approx(want, rel=1e-10)
    assert frechet_distance(mu2, c2, mu1, c1) == pytest.approx(want, rel=1e-10)


def test_digits_features_of_a_single_image_are_its_row_of_a_batch():
    """Features need no covariance: one image works (it was refused as 'need at least 2 samples'), and is the
    same row as in a batch; digits_fd still asks for two, naming samples or reference."""
    real = real_digits()[:5]
    one = digits_features(real[2:3])
    assert one.shape == (1, 64)
    torch.testing.assert_close(one, digits_features(real)[2:3], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="samples: need at least 2 samples"):
        digits_fd(real[:1])
    with pytest.raises(ValueError, match="reference: need at least 2 samples"):
        digits_fd(real, reference=real[:1])
    with pytest.raises(ValueError, match="samples: need at least 1 sample"):
        digits_features(real[:0])


def test_the_cached_reference_stats_cannot_be_changed_through_what_is_returned():
    a = real_digits()[:300]
    before = digits_fd(a)
    mu, cov = digits_reference_stats()
    mu += 5.0
    cov *= 3.0
    assert digits_fd(a) == before
    mu2, cov2 = digits_reference_stats()
    assert not np.array_equal(mu2, mu) and mu2.flags.writeable  # fresh copies, the user's to edit


def test_digits_fd_real_vs_itself_and_symmetry():
    real = real_digits()
    assert digits_fd(real, reference=real) == pytest.approx(0.0, abs=1e-6)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(real.shape[0], generator=g)
    a, b = real[perm[:600]], real[perm[600:1200]]
    ab, ba = digits_fd(a, reference=b), digits_fd(b, reference=a)
    assert ab == pytest.approx(ba, rel=1e-6)  # the Fréchet distance is symmetric
    noise = torch.rand(600, 1, 8, 8, generator=g) * 2 - 1
    assert ab < 0.05 * digits_fd(noise, reference=b)
    # against the cached full-set statistics: disjoint halves of real digits are close
    assert digits_fd(a) < 15.0
    # [B, 64] input is accepted as well
    assert digits_fd(a.reshape(600, 64)) == pytest.approx(digits_fd(a), rel=1e-9)


@pytest.mark.parametrize("bad, exc, message", [
    (np.zeros((4, 1, 8, 8)), TypeError, "samples must be a torch.Tensor"),   # not a tensor
    (torch.zeros(4, 1, 8, 8, dtype=torch.int64), TypeError, "samples must be floating point"),
    (torch.zeros(4, 3, 8, 8), ValueError, r"samples must have shape \[B, 1, 8, 8\]"),  # wrong shape
    (torch.zeros(4, 1, 16, 16), ValueError, r"samples must have shape \[B, 1, 8, 8\]"),
    (torch.zeros(1, 1, 8, 8), ValueError, "need at least 2 samples"),       # one sample: no covariance
    (torch.full((4, 1, 8, 8), float("nan")), ValueError, "samples contains NaN or Inf"),
])
def test_digits_fd_rejects_bad_input(bad, exc, message):
    with pytest.raises(exc, match=message):
        digits_fd(bad)


def test_teacher_rmse():
    target = torch.zeros(3, 1, 2, 2)
    pred = torch.stack([torch.zeros(1, 2, 2), torch.ones(1, 2, 2), torch.tensor([[[2.0, 0.0], [0.0, 0.0]]])])
    r = teacher_rmse(pred, target)
    assert r.dtype == torch.float64 and r.shape == (3,)
    assert torch.allclose(r, torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="pred and target must have the same shape"):
        teacher_rmse(pred, torch.zeros(3, 4))
    with pytest.raises(TypeError, match="pred and target must be torch.Tensors"):
        teacher_rmse(pred.numpy(), target)



def test_teacher_rmse_refuses_samples_without_values():
    """[B, 0] samples gave a NaN RMSE per sample, which the docstring reads as a diverged solve."""
    with pytest.raises(ValueError, match=r"no values per sample, got shape \(3, 0\)"):
        teacher_rmse(torch.zeros(3, 0), torch.zeros(3, 0))
    assert torch.equal(teacher_rmse(torch.ones(1, 3), torch.zeros(1, 3)), torch.ones(1, dtype=torch.float64))

def test_gaussian_stats_float64():
    feats = torch.randn(10, 3, generator=torch.Generator().manual_seed(0))
    mu, cov = gaussian_stats(feats)
    assert mu.dtype == np.float64 and cov.shape == (3, 3)
    # textbook mean and unbiased covariance, summed by hand in float64 (the FID convention: divide by B - 1)
    rows = feats.double().tolist()
    mean = [sum(r[j] for r in rows) / 10 for j in range(3)]
    want = [[sum((r[i] - mean[i]) * (r[j] - mean[j]) for r in rows) / 9 for j in range(3)] for i in range(3)]
    np.testing.assert_allclose(mu, mean, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(cov, want, rtol=1e-12, atol=1e-15)


def test_metric_inputs_are_checked_and_named():
    with pytest.raises(ValueError, match=r"reference must have shape \[B, 1, 8, 8\]"):
        digits_fd(torch.rand(8, 64) * 2 - 1, reference=torch.zeros(4, 65))
    for bad in (torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.complex64)):
        with pytest.raises(TypeError, match=f"pred must be a real floating tensor, got {bad.dtype}"):
            teacher_rmse(bad, torch.ones(2, 3))
    nan = teacher_rmse(torch.tensor([[1.0, float("nan")], [1.0, 2.0]]), torch.ones(2, 2))
    assert torch.isnan(nan[0]) and nan[1].item() == pytest.approx(0.5 ** 0.5)  # a diverged sample shows as NaN
    with pytest.raises(ValueError, match=r"frechet_distance: mu2 has shape \(3,\)"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(2))
    with pytest.raises(ValueError, match=r"feats must be a \[B, D\] tensor with B >= 2"):
        gaussian_stats(torch.randn(1, 4))
