"""ISD (Tejankar et al., ICCV 2021): self-supervised pretraining by similarity distillation against a
queue of teacher embeddings; its card (`method.isd.*`, facts, recipe lines). The method itself,
with torch, is method.py."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from simmatch.fields import COUNT, above, num
from simmatch.methods.card import MethodCard, register_card


@dataclass
class ISDConfig:
    queue_size: int = num(128_000, COUNT)  # teacher embeddings in the queue
    t_student: float = num(0.1, above(0))
    t_teacher: float = num(0.01, above(0))
    predictor_hidden: int = num(512, COUNT)  # the student's predictor after its projection head
    predictor_bn: bool = True


def _memory(cfg: Any, m: ISDConfig, values: dict, num_labeled: int) -> dict[str, int]:
    return {"queue": m.queue_size * cfg.model.proj_dim * 4}


def _recipe(cfg: Any, m: ISDConfig, values: dict) -> tuple[list[str], dict]:
    return ([f"  queue        {m.queue_size:,} teacher embeddings; temperatures student {m.t_student:g}, "
             f"teacher {m.t_teacher:g}"], {})


CARD = register_card(MethodCard(
    "isd", ISDConfig, "simmatch.methods.isd.method", needs_labeled=False, needs_unlabeled=True,
    trains_classifier=False, configured_teacher=True,
    student_images=(0, 1, 0), teacher_images=(0, 1),  # student: the first strong view; teacher: the weak view
    renamed={"queue_size": "queue_size", "isd_t_student": "t_student", "isd_t_teacher": "t_teacher",
             "predictor_hidden": "predictor_hidden", "predictor_bn": "predictor_bn"},
    memory=_memory, recipe=_recipe))
