"""ReMixMatch's training step as its official code computes it, transcribed for
tests/authors/test_remixmatch_transcription.py.

Source: github google-research/remixmatch (Apache-2.0), commit f7061ebf055227cbeb5c6fced1ce054e0ceecfcd,
the published variant (cta/cta_remixmatch.py: CTAReMixMatch = remixmatch_no_cta.ReMixMatch +
cta.lib.train.CTAClassifySemi, redux '1st'):
- remixmatch_no_cta.py: `ReMixMatch.classifier_rot` (a dense layer of 4, glorot-normal kernel, zero
  bias, on the classifier's `embeds`), `guess_label` (redux '1st': the first view's softmax tiled
  K + 1 times; use_dm: p * (1e-6 + p_data) / (1e-6 + p_model), renormalised; sharpened by 1 / T,
  renormalised), `model` (`random_rotate`; the ramp clip(step / (warmup_kimg << 10), 0, 1) on w_match
  and w_kl; the rotation loss; the guess forwards of y_in[:, 0] and y_in[:, 1]; loss_kl against
  ly[:batch]; MixMode 'xxy.yxy' over [xt] + the K + 1 views with labels [onehot] + split(ly);
  `layers.interleave`, one forward per interleaved batch, the UPDATE_OPS of the last one only
  (post_ops); the losses with use_xe; ExponentialMovingAverage of utils.model_vars(); p_model and
  p_data updates; `v * (1 - wd * lr)` on the 'kernel' variables of model_vars('classify') (the
  rotation head's `classify_rot` matches too); AdamOptimizer(lr).minimize(loss_xe + w_kl loss_kl +
  w_match loss_xeu + w_rot loss_rot), post_ops after it), and its flag defaults (wd 0.02, beta 0.75,
  w_kl 0.5, w_match 1.5, w_rot 0.5, warmup_kimg 1024, use_dm, use_xe; batch 64, lr 0.002);
- cta/lib/train.py: `CTAClassifySemi.train_step` (classify_op, the EMA's softmax on the probes, in the
  same session.run as train_op; per sample: error = |p - onehot(label)|_1, update_rates(policy,
  1 - 0.5 error)), flags adepth 2, ath 0.80, adecay 0.99;
- libml/layers.py: `interleave_offsets`, `interleave`, `PMovingAverage`, `PData` (a variable, the
  datasets giving no p_labeled / p_unlabeled), `MixMode.augment_pair` / `augment` / mode 'xxy.yxy';
- libml/train.py: `Model.__init__` (the global step counts images: update_step = assign_add(step,
  batch), run with train_op); libml/models.py `ResNet.classifier` (embeds: the pooled feature the
  logits' dense layer reads; batch_normalization with training=True/False); libml/utils.py
  `model_vars` (the trainable variables) and `getter_ema` (the EMA's averages for the variables that
  have one: the trainables; the BN moving statistics are the model's own);
- TensorFlow 1.x itself: batch_normalization's moving averages (moving -= (moving - batch
  statistic)(1 - momentum), the Bessel-corrected batch variance) in UPDATE_OPS,
  softmax_cross_entropy_with_logits_v2.

The state the step carries from one step to the next beyond the network (TensorFlow's AdamOptimizer
and ExponentialMovingAverage, libml/ctaugment.py's OPS and rates with `update_rates`) is transcribed
in tests/authors/official_remixmatch_training.py, which this module uses.

Everything is written anew in this module's own classes and those of
official_remixmatch_training.py; nothing of the project is used here. Given
rather than drawn here, as the test documents: the images (the official data pipeline and
AugmentPoolCTA draw them: the labeled training image, its probe and the probe's policy, the weak view
and the K CTAugment'ed strong views), MixMode's draws (`np.random.beta(beta, beta, n)` as float32 and
`tf.random_shuffle(range(n))`), and the network (`Classifier`, the test's architecture, with this
module's own BatchNorm that keeps its moving-average assignments as pending update ops).

Where TensorFlow leaves an order open, this module takes one (the test says which the project takes):
- the ramp reads the global step in the session.run that also increments it: the step before
  (`it` steps done, it * batch images), so ramp = clip(it / warmup_steps, 0, 1) with warmup_steps =
  (warmup_kimg << 10) / batch;
- classify_op (the probes through the EMA) runs beside train_op and its post_ops with no dependency:
  the EMA and BN statistics as they were before this step;
- post_ops carry no order among themselves: here the last forward's BN updates, then the decay of
  the kernels, then the EMA (of the decayed kernels), then p_model and p_data.

Above one process (the official code is single-device) `OfficialReMixMatch` is its data-parallel
form, rank by rank as a replicated TF graph runs: each rank the official step on its own batch (its own
BN batches, MixUp and interleave within it); the gradients averaged over the ranks; the variables that
the code declares with aggregation=MEAN (p_model, p_data) and the BN moving statistics updated with the
mean of the ranks' updates; update_rates over every rank's probes, in rank order.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from official_remixmatch_training import AdamOptimizer, CTAugmentRates, ExponentialMovingAverage

# Flag defaults of cta/cta_remixmatch.py, cta/lib/train.py and libml/train.py
FLAGS = {"wd": 0.02, "beta": 0.75, "w_kl": 0.5, "w_match": 1.5, "w_rot": 0.5, "warmup_kimg": 1024,
         "redux": "1st", "use_dm": True, "use_xe": True, "batch": 64, "lr": 0.002, "T": 0.5, "dbuf": 128,
         "ema": 0.999, "mixmode": "xxy.yxy", "adepth": 2, "ath": 0.80, "adecay": 0.99,
         "adam": {"beta1": 0.9, "beta2": 0.999, "epsilon": 1e-8}}


def world() -> int:
    return tdist.get_world_size() if tdist.is_initialized() else 1


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """aggregation=MEAN: the replicas' values averaged."""
    if world() == 1:
        return t
    t = t.clone()
    tdist.all_reduce(t)
    return t / world()


# --------------------------------------------------------------------------- libml/layers.py

def interleave_offsets(batch: int, nu: int) -> list[int]:
    groups = [batch // (nu + 1)] * (nu + 1)
    for x in range(batch - sum(groups)):
        groups[-x - 1] += 1
    offsets = [0]
    for g in groups:
        offsets.append(offsets[-1] + g)
    assert offsets[-1] == batch
    return offsets


def interleave(xy: list[torch.Tensor], batch: int) -> list[torch.Tensor]:
    nu = len(xy) - 1
    offsets = interleave_offsets(batch, nu)
    xy = [[v[offsets[p]:offsets[p + 1]] for p in range(nu + 1)] for v in xy]
    for i in range(1, nu + 1):
        xy[0][i], xy[i][i] = xy[i][i], xy[0][i]
    return [torch.cat(v, dim=0) for v in xy]


class PMovingAverage:
    """A [buf_size, nclass] variable, every row uniform at the start; the value is the normalised
    mean of the rows; `update` drops the oldest row and appends the entry's mean (aggregation MEAN)."""

    def __init__(self, nclass: int, buf_size: int):
        self.ma = torch.ones(buf_size, nclass, dtype=torch.float32) / nclass

    def __call__(self) -> torch.Tensor:
        v = self.ma.mean(dim=0)
        return v / v.sum()

    def update(self, entry: torch.Tensor) -> None:
        entry = mean_over_ranks(entry.mean(dim=0))
        self.ma = torch.cat([self.ma[1:], entry[None]], dim=0)


class PData:
    """has_update (no p_labeled / p_unlabeled given): a variable, uniform at the start, the
    normalised value used; `update` p_data <- p_data * decay + mean(entry) * (1 - decay)."""

    def __init__(self, nclass: int):
        ones = torch.ones(nclass, dtype=torch.float32)
        self.p_data = ones / ones.sum()  # renorm(tf.ones([nclass]))
        self.has_update = True

    def __call__(self) -> torch.Tensor:
        return self.p_data / self.p_data.sum()

    def update(self, entry: torch.Tensor, decay: float = 0.999) -> None:
        entry = mean_over_ranks(entry.mean(dim=0))
        self.p_data = self.p_data * decay + entry * (1 - decay)


class MixMode:
    """MixMode with its draws given: `mix` the np.random.beta(beta, beta, n) draws (float32) and
    `index` the tf.random_shuffle(range(n)) permutation of augment_pair's single call."""

    MODES = "xx.yy xxy.yxy xx.yxy xx.yx xx. .yy xxy. .yxy .".split()

    def __init__(self, mode: str):
        assert mode in self.MODES
        self.mode = mode

    @staticmethod
    def augment_pair(x0, l0, x1, l1, mix: torch.Tensor, index: torch.Tensor):
        n = x0.shape[0]
        mix = torch.maximum(mix, 1 - mix).reshape(n, 1, 1, 1)  # NHWC's [n, 1, 1, 1]: broadcast alike
        xs = x1[index]
        ls = l1[index]
        xmix = x0 * mix.to(x0.dtype) + xs * (1 - mix.to(x0.dtype))
        lmix = l0 * mix[:, :, 0, 0] + ls * (1 - mix[:, :, 0, 0])
        return xmix, lmix

    @staticmethod
    def augment(x, labels, mix, index):
        return MixMode.augment_pair(x, labels, x, labels, mix, index)

    def __call__(self, xl: list, ll: list, mix: torch.Tensor, index: torch.Tensor):
        assert len(xl) == len(ll) >= 2
        if self.mode == "xxy.yxy":
            mx, ml = self.augment(torch.cat(xl, 0), torch.cat(ll, 0), mix, index)
            return list(mx.chunk(len(xl))), list(ml.chunk(len(ll)))
        raise NotImplementedError(self.mode)  # the other modes draw twice; ReMixMatch uses this one


# --------------------------------------------------------------------------- the network

class BatchNorm(nn.BatchNorm2d):
    """tf.layers.batch_normalization on NCHW: training=True normalises with the batch's mean and
    biased variance and appends its moving-average assignments (the batch mean, the Bessel-corrected
    batch variance) to `update_ops` (TF's UPDATE_OPS collection) without running them; training=False
    normalises with the moving statistics. `momentum` in torch's convention (TF's is 1 - it): the
    network's own value (the test's architecture)."""

    update_ops: list | None = None  # the classifier's collection, shared by its layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        y = F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        with torch.no_grad():
            var, mean = torch.var_mean(x.detach(), dim=(0, 2, 3), unbiased=True)
        self.update_ops.append((self, mean, var))
        return y


def run_update_ops(ops: list) -> None:
    """assign_moving_average: moving -= (moving - value) * (1 - decay), for each pending op; above
    one rank the update's mean over the ranks (the statistics' aggregation MEAN)."""
    with torch.no_grad():
        for bn, mean, var in ops:
            for moving, value in ((bn.running_mean, mean), (bn.running_var, var)):
                new = moving - (moving - value) * bn.momentum
                moving.copy_(mean_over_ranks(new))


class Classifier(torchvision.models.ResNet):
    """The test's architecture (a torchvision BasicBlock ResNet with the 3x3 stride-1 stem of small
    images) in the shape of libml/models.py's classifiers: forward gives {'logits', 'embeds'}, embeds
    being the pooled feature the dense classifier reads; `classify_rot` is remixmatch_no_cta.py's
    `classifier_rot` layer. Its BN layers are `BatchNorm` (the moving averages as update ops)."""

    def __init__(self, layers: list[int], num_classes: int):
        super().__init__(torchvision.models.resnet.BasicBlock, layers, num_classes=num_classes, norm_layer=BatchNorm)
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.maxpool = nn.Identity()
        self.classify_rot = nn.Linear(self.fc.in_features, 4)
        nn.init.xavier_normal_(self.classify_rot.weight)  # tf.glorot_normal_initializer
        nn.init.zeros_(self.classify_rot.bias)
        self.update_ops: list = []
        for m in self.modules():
            if isinstance(m, BatchNorm):
                m.update_ops = self.update_ops

    def kernels(self) -> list[nn.Parameter]:
        """The variables named '.../kernel' of the 'classify*' scopes: conv2d and dense kernels."""
        return [m.weight for m in self.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]

    def forward(self, x: torch.Tensor, training: bool) -> dict:
        return self.classifier(x, training)

    def classifier(self, x: torch.Tensor, training: bool) -> dict:
        self.train(training)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        embeds = torch.flatten(self.avgpool(x), 1)
        return {"logits": self.fc(embeds), "embeds": embeds}

    def classifier_rot(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify_rot(x)


# --------------------------------------------------------------------------- remixmatch_no_cta.py

def softmax_cross_entropy_with_logits_v2(labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    return -(labels * F.log_softmax(logits, dim=1)).sum(dim=1)


def random_rotate(x: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`random_rotate` on NCHW: TF's x is NHWC, so its axis 1 (H) is dim 2 here, axis 2 (W) dim 3,
    and transpose [0, 2, 1, 3] (H <-> W) is transpose(2, 3). x[b4:, ::-1, ::-1] flips H and W,
    xt[:b4, ::-1] flips H of the transposed rows, xt[b4:, :, ::-1] their W."""
    b4 = batch // 4
    x, xt = x[:2 * b4], x[2 * b4:].transpose(2, 3)
    zeros = np.zeros(b4, np.int32)  # its `l`
    labels = torch.from_numpy(np.concatenate([zeros, zeros + 1, zeros + 2, zeros + 3], axis=0)).long()
    return torch.cat([x[:b4], x[b4:].flip(2, 3), xt[:b4].flip(2), xt[b4:].flip(3)], dim=0), labels


def guess_label(logits_y: list[torch.Tensor], p_data: torch.Tensor, p_model: torch.Tensor, T: float,
                use_dm: bool, redux: str) -> dict:
    if redux != "1st":
        raise NotImplementedError(redux)  # the CTA variant's
    p_model_y = torch.softmax(logits_y[0], dim=1)
    p_model_y = p_model_y.repeat(len(logits_y), 1)  # tf.tile(p, [len(logits_y), 1])
    if use_dm:
        p_ratio = (1e-6 + p_data) / (1e-6 + p_model)
        p_weighted = p_model_y * p_ratio
        p_weighted = p_weighted / p_weighted.sum(dim=1, keepdim=True)
    else:
        p_weighted = p_model_y
    p_target = torch.pow(p_weighted, 1.0 / T)
    p_target = p_target / p_target.sum(dim=1, keepdim=True)
    return {"p_target": p_target, "p_model": p_model_y}


class OfficialReMixMatch:
    """CTAReMixMatch's graph and train_step, one call of `step` per session.run. Hyper-parameters as
    its flags (FLAGS), `warmup_steps` = (warmup_kimg << 10) / batch. `net` is the student (its
    initial weights set by the caller); `ema_decay` the EMA's. Switches for the test's controls:
    `ramp_ahead` (the ramp read one step later), `decay_all` (the decay on every variable, BN
    scales and offsets and biases too), `bn_every_forward` (every train-mode forward's UPDATE_OPS run,
    in graph order, instead of the last interleaved one's)."""

    def __init__(self, net: Classifier, nclass: int, batch: int, K: int, lr: float = FLAGS["lr"],
                 wd: float = FLAGS["wd"], T: float = FLAGS["T"], w_kl: float = FLAGS["w_kl"],
                 w_match: float = FLAGS["w_match"], w_rot: float = FLAGS["w_rot"], warmup_steps: int = 16384,
                 dbuf: int = FLAGS["dbuf"], ema_decay: float = FLAGS["ema"], use_dm: bool = FLAGS["use_dm"],
                 adepth: int = FLAGS["adepth"], ath: float = FLAGS["ath"], adecay: float = FLAGS["adecay"],
                 ramp_ahead: int = 0, decay_all: bool = False, bn_every_forward: bool = False):
        self.net, self.nclass, self.batch, self.K = net, nclass, batch, K
        self.lr, self.wd, self.T, self.use_dm = lr, wd * lr, T, use_dm  # model(): wd *= lr
        self.w_kl, self.w_match, self.w_rot, self.warmup_steps = w_kl, w_match, w_rot, warmup_steps
        self.ramp_ahead, self.decay_all, self.bn_every_forward = ramp_ahead, decay_all, bn_every_forward
        self.augment = MixMode(FLAGS["mixmode"])
        self.p_model = PMovingAverage(nclass, dbuf)
        self.p_target = PMovingAverage(nclass, dbuf)  # only plotted
        self.p_data = PData(nclass)
        self.ema = ExponentialMovingAverage(net, ema_decay)
        a = FLAGS["adam"]
        self.optimizer = AdamOptimizer(list(net.parameters()), lr, a["beta1"], a["beta2"], a["epsilon"])
        self.augmenter = CTAugmentRates(adepth, ath, adecay)
        self.step_count = 0  # self.step / batch: steps done

    def ramp(self) -> torch.Tensor:
        step = torch.tensor(float(self.step_count + self.ramp_ahead), dtype=torch.float32)
        return torch.clamp(step / self.warmup_steps, 0, 1)

    @torch.no_grad()
    def classify_op(self, x: torch.Tensor, buffers: dict | None = None) -> torch.Tensor:
        """softmax(classifier(x, getter=ema_getter, training=False)): the EMA's trainables; the BN
        moving statistics the student's (getter_ema finds no average for them), or `buffers`."""
        state = {**self.ema.shadow, **(buffers or {})}
        out = torch.func.functional_call(self.net, state, (x,), {"training": False}, strict=False)
        return torch.softmax(out["logits"], dim=1)

    def step(self, xt: torch.Tensor, label: torch.Tensor, y: list[torch.Tensor], probe: torch.Tensor,
             policy: list, mix: torch.Tensor, index: torch.Tensor, probe_buffers: dict | None = None,
             applied_grads: dict | None = None) -> dict:
        """One train_step on this rank's batch: xt the labeled images, label their labels, y the K + 1
        views (y_in[:, 0] the weak one, y_in[:, 1:] the strong ones), probe and policy the labeled
        images' probes and their policies (lists of (op, values)), mix and index MixMode's draws.
        `probe_buffers`: BN statistics for classify_op in place of the student's (see classify_op).
        `applied_grads` (by parameter name): the gradients Adam applies in place of this step's own
        (which are still computed and returned), so that a caller can check the optimizer and the
        gradients each from the same inputs."""
        net, batch, K = self.net, self.batch, self.K
        assert xt.shape[0] == batch and len(y) == K + 1
        net.update_ops.clear()
        ramp = self.ramp()
        w_match = self.w_match * ramp
        out: dict = {"ramp": ramp}

        if self.w_rot > 0:
            rot_y, rot_l = random_rotate(y[1], batch)
            rot_logits = net.classifier_rot(net.classifier(rot_y, training=True)["embeds"])
            loss_rot = softmax_cross_entropy_with_logits_v2(F.one_hot(rot_l, 4).float(), rot_logits).mean()
            out["rot_logits"] = rot_logits
        else:
            loss_rot = torch.zeros(())

        # redux '1st': the forward of y_in[:, 0] (and with w_kl > 0 of y_in[:, 1]); the weak one reaches
        # the loss only through stop_gradient (its gradient is zero): computed without one here
        with torch.no_grad():
            logits_weak = net.classifier(y[0], training=True)["logits"]
        if self.w_kl <= 0:
            logits_y = [logits_weak] * (K + 1)
        else:
            logits_y = [logits_weak, net.classifier(y[1], training=True)["logits"]]
            logits_y += logits_y[:1] * (K - 1)
        guess = guess_label(logits_y, self.p_data(), self.p_model(), self.T, self.use_dm, "1st")
        ly = guess["p_target"].detach()
        if self.w_kl > 0:
            w_kl = self.w_kl * ramp
            loss_kl = softmax_cross_entropy_with_logits_v2(ly[:batch], logits_y[1]).mean()
            out["logits_kl"] = logits_y[1]
        else:
            w_kl, loss_kl = 0, torch.zeros(())
        out.update(logits_weak=logits_weak, p_model_y=guess["p_model"][:batch], guess=ly[:batch],
                   p_model=self.p_model(), p_data=self.p_data())
        del logits_y

        lx = F.one_hot(label, self.nclass).float()
        xy, labels_xy = self.augment([xt] + [y[i] for i in range(K + 1)], [lx] + list(ly.chunk(K + 1)), mix, index)
        x, yy = xy[0], xy[1:]
        labels_x, labels_y = labels_xy[0], torch.cat(labels_xy[1:], 0)
        del xy, labels_xy

        batches = interleave([x] + yy, batch)
        logits = [net.classifier(yi, training=True)["logits"] for yi in batches[:-1]]
        skip_ops = list(net.update_ops)
        logits.append(net.classifier(batches[-1], training=True)["logits"])
        post_ops = list(net.update_ops) if self.bn_every_forward else net.update_ops[len(skip_ops):]
        out["interleaved_logits"] = logits
        logits = interleave(logits, batch)
        logits_x = logits[0]
        logits_yy = torch.cat(logits[1:], 0)
        del batches, logits

        loss_xe = softmax_cross_entropy_with_logits_v2(labels_x, logits_x).mean()
        loss_xeu = softmax_cross_entropy_with_logits_v2(labels_y, logits_yy).mean()  # use_xe
        loss = loss_xe + w_kl * loss_kl + w_match * loss_xeu + self.w_rot * loss_rot
        out.update(loss_xe=loss_xe.detach(), loss_kl=loss_kl.detach(), loss_xeu=loss_xeu.detach(),
                   loss_rot=loss_rot.detach(), loss=loss.detach())

        # classify_op, in the same session.run: the EMA (and BN statistics) before this step's post_ops
        lx_probe = self.classify_op(probe, probe_buffers)
        out["probe_p"] = lx_probe

        # AdamOptimizer.minimize: the gradients (the ranks' mean above one), applied
        params = list(net.parameters())
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        out["unused"] = [n for (n, _), g in zip(net.named_parameters(), grads) if g is None]
        grads = {p: mean_over_ranks(torch.zeros_like(p) if g is None else g) for p, g in zip(params, grads)}
        out["grads"] = {n: grads[p] for n, p in net.named_parameters()}
        if applied_grads is not None:
            grads = {p: applied_grads[n] for n, p in net.named_parameters()}
        self.optimizer.apply_gradients(grads)

        # post_ops (the order this module takes: the module docstring)
        run_update_ops(post_ops)
        with torch.no_grad():
            decayed = list(net.parameters()) if self.decay_all else net.kernels()
            for v in decayed:
                v.mul_(1 - self.wd)
        self.ema.apply(net)
        self.p_model.update(guess["p_model"])
        self.p_target.update(guess["p_target"])
        if self.p_data.has_update:
            self.p_data.update(lx)
        self.step_count += 1  # update_step

        # train_step: update_rates from classify_op, per sample, every rank's in rank order
        lx_np = lx_probe.float().numpy()
        labels = label.numpy()
        accuracy = []
        for p in range(lx_np.shape[0]):
            error = lx_np[p].copy()
            error[labels[p]] -= 1
            error = np.abs(error).sum()  # a float32 scalar
            accuracy.append(1 - 0.5 * float(error))  # NumPy 1.x: float64 (CTAugmentRates)
        out["accuracy"] = np.array(accuracy, "f")
        gathered = [(policy, accuracy)]
        if world() > 1:
            gathered = [None] * world()
            tdist.all_gather_object(gathered, (policy, accuracy))
        for pol, acc in gathered:
            for p in range(len(pol)):
                self.augmenter.update_rates(pol[p], acc[p])
        return out


def mixmode_draws(generator: np.random.Generator, beta: float, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What MixMode.augment_pair draws, from a given numpy generator: np_beta's `beta(beta, beta, n)`
    as float32, then the shuffle of range(n) (the order the project's spec draws them in)."""
    mix = generator.beta(beta, beta, n).astype("f")
    index = generator.permutation(n)
    return torch.from_numpy(mix), torch.from_numpy(index)

