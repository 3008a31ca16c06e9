"""Scores for resynthesised speech."""

from __future__ import annotations

import math

import numpy as np


def si_sdr(reference, estimate, zero_mean: bool = False) -> float:
    """Return the scale-invariant signal-to-distortion ratio of `estimate`, in dB.

    SI-SDR = 10 log10(|a s|^2 / |a s - s_hat|^2) with a = <s_hat, s> / |s|^2,
    where s is the reference and s_hat the estimate (arXiv:1811.02508). With
    `zero_mean`, both signals have their mean removed first; the default
    False matches torchmetrics' scale_invariant_signal_distortion_ratio.
    Returns inf for an estimate that is an exact multiple of the reference.

    :param reference, estimate: 1-D arrays (or CPU tensors) of equal length.
    :raises ValueError: on different shapes, or a reference of zero energy.
    """
    reference = np.asarray(reference, dtype=np.float64)
    estimate = np.asarray(estimate, dtype=np.float64)
    if reference.ndim != 1 or reference.shape != estimate.shape:
        raise ValueError(f"reference {reference.shape} and estimate {estimate.shape} must be "
                         f"1-D with the same length; crop the longer one first")
    if zero_mean:
        reference = reference - reference.mean()
        estimate = estimate - estimate.mean()

    reference_energy = np.dot(reference, reference)
    if reference_energy == 0.0:
        raise ValueError("the reference signal has zero energy, so SI-SDR is undefined")
    target = (np.dot(estimate, reference) / reference_energy) * reference
    distortion = estimate - target

    distortion_energy = np.dot(distortion, distortion)
    if distortion_energy == 0.0:
        return math.inf
    return float(10.0 * np.log10(np.dot(target, target) / distortion_energy))
