"""The Frechet distance between Gaussian fits of two feature sets (FID when the features are Inception's).

One implementation for the package: `cdm-train eval` (Inception features) and the digits evaluator
(classifier features, cdm_train.digits.eval) both call it. Float64 throughout.

tr((C_a C_b)^(1/2)) is computed as the sum of sqrt(eig(A^(1/2) C_b A^(1/2))) with A^(1/2) the symmetric
root of C_a: the two matrices have the same eigenvalues for positive semi-definite C_a, C_b, and only
symmetric eigenproblems are solved, so there is no complex round-off (scipy.linalg.sqrtm's imaginary
residue) and no eps offset is needed when a covariance is singular (fewer samples than feature dimensions,
e.g. 1,000 samples of 2,048-d Inception features); eigenvalues within round-off of zero are zeroed before
their square root (`_drop_roundoff`).
"""

from __future__ import annotations

import numpy as np


def gaussian_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, unbiased covariance) of an (N, D) feature array, in float64."""
    a = np.asarray(feats, np.float64)
    if a.ndim != 2 or a.shape[0] < 2:
        raise ValueError(f"feats: expected an (N >= 2, D) array, got shape {a.shape}")
    return a.mean(0), np.cov(a, rowvar=False).reshape(a.shape[1], a.shape[1])


def _drop_roundoff(w: np.ndarray) -> np.ndarray:
    """Eigenvalues at or below eigh's round-off (D eps max|w|) set to 0. The square root amplifies them: each
    zero eigenvalue of a singular covariance would come back as ~sqrt(eps |w|) and 1,048 of them (1,000 samples,
    2,048-d) shift the FID of a set with itself by ~1e-4 instead of ~1e-12."""
    tol = w.shape[0] * np.finfo(np.float64).eps * max(float(np.abs(w).max(initial=0.0)), 0.0)
    return np.where(w > tol, w, 0.0)


def frechet_distance_from_stats(mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray, cov_b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2)), in float64."""
    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    cov_a, cov_b = np.asarray(cov_a, np.float64), np.asarray(cov_b, np.float64)
    d = mu_a.shape[0]
    for name, value, shape in (("mu_b", mu_b, (d,)), ("cov_a", cov_a, (d, d)), ("cov_b", cov_b, (d, d))):
        if value.shape != shape:
            raise ValueError(f"{name}: expected shape {shape} (mu_a has {d} dimensions), got {value.shape}")
    w, q = np.linalg.eigh(cov_a)
    root_a = (q * np.sqrt(_drop_roundoff(w))) @ q.T
    middle = root_a @ cov_b @ root_a
    tr_sqrt = np.sqrt(_drop_roundoff(np.linalg.eigvalsh((middle + middle.T) / 2))).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * tr_sqrt)


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """The Frechet distance between Gaussian fits of two (N, D) feature arrays."""
    return frechet_distance_from_stats(*gaussian_stats(feats_a), *gaussian_stats(feats_b))
