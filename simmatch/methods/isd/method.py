"""ISD (iterative similarity distillation), self-supervised: the student matches the teacher's
soft similarities to a queue of past teacher embeddings. No labels are used in training."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from simmatch.methods.base import Batch, Method, StepTargets, Targets
from simmatch.methods.card import register
from simmatch.methods.losses import fp32
from simmatch.methods.queue import EmbeddingQueue
from simmatch.models import Network, network_for


def isd_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor, queue: torch.Tensor,
             t_student: float, t_teacher: float) -> torch.Tensor:
    """KL(softmax(k.Q/T_t) || softmax(q.Q/T_s)), averaged over the batch."""
    log_p_t = F.log_softmax(teacher_emb.float() @ queue.T / t_teacher, dim=1)
    log_p_s = F.log_softmax(student_emb.float() @ queue.T / t_student, dim=1)
    return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean")


@register("isd")
class ISD(Method):
    def __init__(self, student: Network, ema_momentum: float, queue_size: int, t_student: float = 0.1,
                 t_teacher: float = 0.01, teacher: str = "eman", seed: int = 0):
        super().__init__(student, ema_momentum, teacher, seed)
        if student.head is None or student.predictor is None:
            raise ValueError("ISD needs a projection head and a predictor")
        self.queue = EmbeddingQueue(queue_size, student.head[-1].out_features, seed)
        self.t_student, self.t_teacher = t_student, t_teacher

    @classmethod
    def from_config(cls, cfg, params, derived, bank_labels: torch.Tensor) -> ISD:
        m = params
        return cls(network_for(cfg, head=True, predictor=(m.predictor_hidden, m.predictor_bn)), derived.ema_momentum,
                   m.queue_size, m.t_student, m.t_teacher, teacher=cls.card.teacher(cfg), seed=cfg.train.seed)

    @torch.no_grad()
    def targets(self, labeled: list[Batch | None], unlabeled: list[Batch], iteration: int) -> StepTargets:
        with self.timer("teacher_forward"):
            outs = self.teacher_forward([u["weak"] for u in unlabeled], iteration, predict=False)
        keys = [k.float() for _, k in outs]
        # enqueued after the loss, in after_step (all ranks' rows)
        return StepTargets([{"k": k} for k in keys], memory=torch.cat(keys))

    def student_losses(self, student, labeled: Batch | None, unlabeled: Batch | None, targets: Targets,
                       iteration: int) -> dict[str, torch.Tensor]:
        assert unlabeled is not None
        k = targets["k"]
        with self.timer("student_forward"):
            logits, q = student(unlabeled["strong"][0])
        with fp32(q.device), self.timer("losses"):
            loss = isd_loss(q, k, self.queue.features, self.t_student, self.t_teacher)
            agree = (q.detach() * k).sum(dim=1).mean()
        # the classifier is not trained here; the zero term keeps DDP's used-parameter set fixed
        return {"loss": loss + 0.0 * logits.sum(), "loss_isd": loss.detach(), "cos_q_k": agree}

    @torch.no_grad()
    def after_step(self, step: StepTargets) -> None:
        super().after_step(step)
        if step.memory is not None:
            with self.timer("bank_update"):
                self.queue.push(step.memory)
