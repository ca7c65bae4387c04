"""How a trainer evaluates during a run: top-1/top-5 of student and teacher (k-NN top-1 for
methods without a classifier), best.pt at the best evaluation, and the result of a run that was
already finished. A mixin of `Trainer`, which holds the attributes used here (as TrainerState)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from simmatch import distributed as dist
from simmatch.engine.evaluate import evaluate
from simmatch.engine.metrics import eval_progress
from simmatch.engine.representation import knn_accuracy
from simmatch.run.jsonl import read_records


@dataclass
class TrainResult:
    status: str  # "finished" | "interrupted" | "already_finished" (nothing left to train)
    iteration: int
    signum: int | None = None
    metrics: dict = field(default_factory=dict)
    start_iteration: int = 0


class TrainerEvaluation:
    def evaluate(self) -> dict[str, float]:
        """Classifier top-1/top-5, or k-NN top-1 for methods that train no classifier: of the student,
        of the student with rank 0's own BN statistics (`student_rank0bn_*`: what the SimMatch authors
        evaluate; the student's own numbers with one rank) and of the teacher."""
        out, images = {}, 0
        for name, model in (("student", self.method.student), ("teacher", self.method.teacher.module)):
            res = self._evaluate_model(name, model)
            out.update({f"{name}_{k}": v for k, v in res.items() if k != "count"})
            images = res["count"]  # every validation image once, over all ranks
            if name == "student":  # one rank: its statistics are rank 0's, its numbers these
                own = self._evaluate_rank0_bn() if self.rank0_bn is not None else res
                out.update({f"student_rank0bn_{k}": v for k, v in own.items() if k != "count"})
        self.metrics_file.write({"kind": "eval", "iteration": self.iteration, **out, "val_images": images})
        self.log.info("eval it %d: %s", self.iteration, " ".join(f"{k} {v:.2f}" for k, v in out.items()))
        self._keep_best(out)
        return out

    def _evaluate_model(self, name: str, model) -> dict[str, float]:
        t = self.cfg.train
        n_val, n_mem = self._eval_batches()
        val = eval_progress(self.streams.val(), n_val, f"eval {name}", self.rank == 0)
        if self.method.trains_classifier:
            res = evaluate(model, val, self.autocast(), t.channels_last)
            return {"top1": res["top1"], "top5": res["top5"], "count": res["count"]}
        memory = eval_progress(self.streams.labeled_eval(), n_mem, f"eval {name} memory", self.rank == 0)
        res = knn_accuracy(model, memory, val, self.cfg.data.num_classes, t.knn_k, t.knn_temperature,
                           self.autocast(), t.channels_last)
        return {"knn_top1": res["knn_top1"], "count": res["count"]}

    def _evaluate_rank0_bn(self) -> dict[str, float]:
        """The student with the BN statistics rank 0 alone keeps (a collective: rank 0's are sent to
        every process first)."""
        own = self.rank0_bn
        dist.broadcast_tensors(own.tensors(), src=0)
        own.swap()
        try:
            res = self._evaluate_model("student (rank 0's BN statistics)", self.method.student)
        finally:
            own.swap()
        return res

    def _eval_batches(self) -> tuple[int, int]:
        """Validation and labeled-memory batches this rank reads in one pass (contiguous slices)."""
        from simmatch.data.streams import val_batch

        vb = val_batch(self.cfg, self.derived)

        def batches(n: int) -> int:
            share = n * (self.rank + 1) // self.processes - n * self.rank // self.processes
            return -(-share // vb)

        return batches(self.streams.num_val), batches(self.streams.num_labeled)

    def _keep_best(self, scores: dict[str, float]) -> None:
        """Write checkpoints/best.pt when the validation top-1 (k-NN top-1 for methods without a
        classifier) of the model `train.best_by` names, the EMA teacher or the student, beats every
        earlier evaluation; its record says which (`by`). A collective like `save`."""
        by = self.cfg.train.best_by
        metric = f"{by}_top1" if f"{by}_top1" in scores else f"{by}_knn_top1"
        value = scores.get(metric)
        if value is None or (self.best and self.best.get("metric") == metric and value <= self.best["value"]):
            return
        self.best = {"metric": metric, "value": value, "iteration": self.iteration, "by": by}
        state = self.state_dict()
        if self.rank == 0:
            self.saver.save_best(state, self.best)
            self.log.info("best %s %.2f at iteration %d: checkpoints/best.pt", metric, value, self.iteration)

    def already_finished(self) -> TrainResult:
        """A re-run of a finished run trains nothing and appends nothing: it reports the final
        evaluation (run only if the previous process stopped between the last save and it)."""
        last = last_eval(self.run_dir.metrics)
        # the checkpoint's own iteration: another world size re-expresses it (elastic resume)
        saved = self.resumed_from[0] if self.resumed_from else self.iteration
        if last.get("iteration") not in (self.iteration, saved):
            last = self.evaluate()
        self.saver.wait()  # a best.pt that evaluation may have started
        self.metrics_file.close()
        self.log.info("run %s already finished at iteration %d", self.run_dir, self.iteration)
        return TrainResult("already_finished", self.iteration, None,
                           {k: v for k, v in last.items() if k not in ("kind", "iteration", "time")},
                           self.iteration)


def last_eval(path: Path) -> dict:
    """The last evaluation record of a metrics.jsonl file ({} when there is none)."""
    return next((r for r in reversed(read_records(path)) if r.get("kind") == "eval"), {})
