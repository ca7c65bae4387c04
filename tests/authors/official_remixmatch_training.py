"""The training state of ReMixMatch's official step, transcribed for tests/authors/official_remixmatch.py
(which uses it): TensorFlow's optimizer and moving average of the weights, and CTAugment's learned rates.

Source: github google-research/remixmatch (Apache-2.0), commit f7061ebf055227cbeb5c6fced1ce054e0ceecfcd
(as official_remixmatch.py):
- libml/ctaugment.py: the OPS registry (names and bins in registration order), `CTAugment.__init__`
  (rates: float32 ones per bin) and `update_rates`;
- TensorFlow 1.x itself: AdamOptimizer (training_ops ApplyAdam: alpha = lr sqrt(1 - beta2^t) / (1 -
  beta1^t), m += (g - m)(1 - beta1), v += (g^2 - v)(1 - beta2), var -= m alpha / (sqrt(v) + eps),
  the powers float32 variables multiplied after each step; eps 1e-8), ExponentialMovingAverage.apply
  (shadow initialised to the variable, then shadow -= (shadow - var)(1 - decay)).

Everything is written anew in this module's own classes; nothing of the project is used here.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

# --------------------------------------------------------------------------- TF's optimizer and EMA

class AdamOptimizer:
    """tf.train.AdamOptimizer (no Nesterov): training_ops ApplyAdam per variable, in the variable's
    dtype (float32: lr, the betas and epsilon cast to it, so 1 - beta1 is 1 - float32(0.9)), with
    beta1_power and beta2_power float32 variables (initial values the betas) multiplied by the betas
    after each step (`_finish`). The bias correction is float32 arithmetic: at t = 1,
    1 - float32(0.999) = 0.00099998713, alpha 6.4e-6 (relative) below the exact value."""

    def __init__(self, params: list[nn.Parameter], lr: float, beta1: float = 0.9, beta2: float = 0.999,
                 epsilon: float = 1e-8):
        self.params = params
        self.lr, self.beta1, self.beta2, self.epsilon = (torch.tensor(v, dtype=torch.float32)
                                                         for v in (lr, beta1, beta2, epsilon))
        self.m = {p: torch.zeros_like(p) for p in params}
        self.v = {p: torch.zeros_like(p) for p in params}
        self.beta1_power, self.beta2_power = self.beta1.clone(), self.beta2.clone()

    @torch.no_grad()
    def apply_gradients(self, grads: dict) -> None:
        one = torch.ones((), dtype=torch.float32)
        alpha = self.lr * torch.sqrt(one - self.beta2_power) / (one - self.beta1_power)
        for p in self.params:
            g, m, v = grads[p], self.m[p], self.v[p]
            dt = p.dtype
            m += (g - m) * (one - self.beta1).to(dt)
            v += (g * g - v) * (one - self.beta2).to(dt)
            p -= (m * alpha.to(dt)) / (v.sqrt() + self.epsilon.to(dt))
        self.beta1_power = self.beta1_power * self.beta1
        self.beta2_power = self.beta2_power * self.beta2


class ExponentialMovingAverage:
    """tf.train.ExponentialMovingAverage(decay) (no num_updates, no zero debias) applied to the
    trainable variables: shadows start at the variables' values; apply: assign_moving_average,
    shadow -= (shadow - var) * (1 - decay), with decay a float32 tensor there (so 1 - decay is
    float32's: 1 - float32(0.999) = 0.00099998713)."""

    def __init__(self, net: nn.Module, decay: float):
        self.one_minus_decay = torch.ones((), dtype=torch.float32) - torch.tensor(decay, dtype=torch.float32)
        self.shadow = {name: p.detach().clone() for name, p in net.named_parameters()}

    @torch.no_grad()
    def apply(self, net: nn.Module) -> None:
        for name, p in net.named_parameters():
            self.shadow[name] -= (self.shadow[name] - p) * self.one_minus_decay.to(p.dtype)


# --------------------------------------------------------------------------- libml/ctaugment.py

# the @register(*bins) decorations, in file order (OPS is a dict: insertion order)
OPS = {"autocontrast": (17,), "blur": (17,), "brightness": (17,), "color": (17,), "contrast": (17,),
       "cutout": (17,), "equalize": (17,), "invert": (17,), "identity": (), "posterize": (8,),
       "rescale": (17, 6), "rotate": (17,), "sharpness": (17,), "shear_x": (17,), "shear_y": (17,),
       "smooth": (17,), "solarize": (17,), "translate_x": (17,), "translate_y": (17,)}


class CTAugmentRates:
    """CTAugment's learned state: per op one float32 array of ones per bin; `update_rates` as there.

    The arithmetic is that of the NumPy of its time (1.x, legacy promotion): a float32 scalar times
    a Python float is a float64, so the new rate is computed in float64 and rounded to float32 when
    stored (NumPy >= 2, NEP 50, would keep float32 throughout: a last-bit difference at most). Written
    out with float() so that it does not depend on the NumPy installed."""

    def __init__(self, depth: int = 2, th: float = 0.85, decay: float = 0.99):
        self.decay, self.depth, self.th = decay, depth, th
        self.rates = {k: tuple(np.ones(x, "f") for x in bins) for k, bins in OPS.items()}

    def update_rates(self, policy, accuracy) -> None:
        for k, bins in policy:
            for p, rate in zip(bins, self.rates[k]):
                p = int(p * len(rate) * 0.999)
                rate[p] = float(rate[p]) * self.decay + float(accuracy) * (1 - self.decay)
