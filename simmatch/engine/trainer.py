"""The training loop shared by every method.

Per step: draw the labeled (and unlabeled) batch, let the method compute its losses
(teacher without grad, student with), backward through AMP's scaler, SGD step, average the
student's BN buffers over ranks, let the method update its teacher and bank. Metrics stay on
the device until `log_every`; checkpoints are atomic and hold everything exact resume needs.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from simmatch import distributed as dist
from simmatch.checkpoint import store
from simmatch.checkpoint.elastic import describe
from simmatch.checkpoint.saver import CheckpointSaver
from simmatch.config import Config, Derived, derive_scale, intervals_text, to_dict, with_steps
from simmatch.distributed import average_buffers
from simmatch.engine import rng
from simmatch.engine.capacity import refuse_banks_beyond_memory
from simmatch.engine.guard import DivergedError, NonFiniteGuard
from simmatch.engine.metrics import (
    MetricsFile,
    MetricWindow,
    Progress,
    close_logging,
    format_eta,
    setup_logging,
)
from simmatch.engine.optim import build_optimizer, lr_at, set_lr
from simmatch.engine.stop import StepDataError, StopRequest
from simmatch.engine.tracking import build_trackers
from simmatch.engine.trainer_eval import TrainerEvaluation, TrainResult
from simmatch.engine.trainer_state import TrainerState
from simmatch.errors import CheckpointError, ConfigError, DataError
from simmatch.files.atomic import atomic_write_text
from simmatch.methods import build_method
from simmatch.methods.base import StepTargets, merge
from simmatch.models.bn_stats import RankBNStats, RankZeroBNStats
from simmatch.models.group_bn import convert_group_bn
from simmatch.run.change import judge_checkpoint
from simmatch.run.dropped import read_dropped
from simmatch.run.jsonl import read_records
from simmatch.run.results import LAST_EVALUATIONS, evaluation_summary
from simmatch.run.rundir import SPLIT_NAMES, RunDir
from simmatch.run.world_sizes import running_text


def amp_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    mode = cfg.train.amp
    if mode == "auto":
        mode = "bf16" if device.type == "cuda" else "none"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None, "none": None}[mode]


def move_batch(batch: dict | None, device: torch.device, channels_last: bool) -> dict | None:
    if batch is None:
        return None
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def move(t):
        if isinstance(t, (list, tuple)):
            return [move(v) for v in t]
        t = t.to(device, non_blocking=True)
        return t.contiguous(memory_format=fmt) if t.ndim == 4 else t

    return {k: move(v) for k, v in batch.items()}


class Trainer(TrainerState, TrainerEvaluation):
    def __init__(self, cfg: Config, run_dir: Path | RunDir, device: torch.device):
        from simmatch.data import build_streams  # the data layer imports DALI: keep it lazy

        run_dir = RunDir(run_dir)
        self.cfg, self.run_dir, self.device = cfg, run_dir, device
        if device.type == "cuda":
            # fixed crop sizes: cuDNN picks its fastest kernels once per input shape
            torch.backends.cudnn.benchmark = True
        self.rank, self.processes = dist.rank(), dist.world_size()
        self.log = setup_logging(run_dir.log(self.rank), console=self.rank == 0)
        # The run's recipe at this many processes, derived once: its ranks (train.virtual_world_size,
        # else the processes) and the ones this process runs in turn each step (one, or its virtual ranks).
        scale = derive_scale(cfg, self.processes)
        self.ranks = list(scale.ranks_of(self.rank))
        # A run that has saved a checkpoint trains on the split it started with (RUN_DIR/splits).
        resuming = run_dir.has_checkpoints()
        self.streams = build_streams(cfg, scale, self.ranks, self.rank, device,
                                     frozen_splits=run_dir.splits if resuming else None)
        self.derived: Derived = with_steps(cfg, scale, self.streams.num_labeled, self.streams.num_unlabeled)
        self.world = self.derived.world_size
        if cfg.data.check_images:
            self._check_images()
        if self.rank == 0:
            write_splits(self.streams.split_lists, run_dir, overwrite=not resuming)
            dropped = read_dropped(self.run_dir.splits) if resuming else []
            if dropped:
                self.log.info("%d unlabeled image(s) dropped (%s): each one's place in the list is taken by "
                              "the next image of the list", len(dropped), self.run_dir.split("dropped"))

        refuse_banks_beyond_memory(cfg, self.derived, device)  # before anything is allocated
        rng.seed_all(cfg.train.seed)  # identical initial weights and bank on every rank
        group, mine = self.derived.bn_group_ranks, len(self.ranks)
        # A BN group's ranks within this process share one forward; a group beyond it pools
        # its statistics with the processes that run its other ranks.
        self.method = build_method(cfg, self.derived, self.streams.bank_labels.cpu(),
                                   ranks_per_forward=min(group, mine))
        if self.method.targets_in_forward and mine > 1:
            raise ConfigError(f"{cfg.method.name} makes its targets in the student's forward, its global means "
                              f"taken there once per process: it runs one rank per process, not {mine} (train."
                              f"virtual_world_size={cfg.train.virtual_world_size} on {self.processes} process(es))")
        if group > mine:
            convert_group_bn(self.method, dist.bn_group(group // mine), device.type)
        if group > 1:
            self.log.info("BN statistics pooled over groups of %d ranks (%d images per BN batch)",
                          group, self.derived.bn_group_images)
        self.method.to(device)
        if cfg.train.channels_last:
            self.method.to(memory_format=torch.channels_last)
        rng.seed_all(cfg.train.seed * 1000 + self.ranks[0])  # augmentations differ per global rank

        self.student: nn.Module = self.method.student
        self.ddp: DDP | None = None
        if self.processes > 1:
            # find_unused_parameters=True is what keeps resume exact above 2 ranks: without it DDP
            # reduces a process's first step in one bucket and re-lays the buckets out afterwards,
            # and the ring all-reduce sums an element of 3+ ranks in an order that depends on its
            # place in its bucket, so a resumed process would add the same gradients differently
            # at its first step. With it the buckets are never rebuilt: one layout for every step
            # of every process (docs/RELIABILITY.md). The reducer's warning that no parameter was
            # unused is expected.
            self.ddp = DDP(self.method.student, device_ids=[device.index] if device.type == "cuda" else None,
                           forward_sync_buffers=False, find_unused_parameters=True)
            self.student = self.ddp
        if cfg.train.compile:
            self.student = torch.compile(self.student)
        # rank 0's own BN statistics (the SimMatch authors' evaluated student), kept by the process running it
        self.rank0_bn = RankZeroBNStats(self.method.student) if self.world > 1 else None
        self.optimizer = build_optimizer(self.method.student, cfg, self.derived.lr)
        self.dtype = amp_dtype(cfg, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.saver = CheckpointSaver(run_dir.checkpoints, cfg.train.keep_ckpts, background=cfg.train.async_ckpt)
        trackers = build_trackers(cfg, run_dir) if self.rank == 0 else []
        self.metrics_file = MetricsFile(run_dir.metrics, enabled=self.rank == 0, trackers=trackers)
        self.iteration = 0
        self.world_history = [self._world_entry(0)]  # each world size the run has had
        self.resumed_from: tuple[int, int] | None = None  # (iteration, world size) of the checkpoint
        self.resumed_processes = self.processes  # processes that wrote it
        self.best = store.best_record(run_dir.checkpoints)  # what best.pt holds, if any
        self.stop = StopRequest()  # the per-step agreement on signals and data errors (a collective)
        self.saved_at: int | None = None  # the iteration of the newest checkpoint this run has
        self.began = False  # the loop has started: a failure from now on is a stop, not a refusal
        self.start_iteration = 0  # the iteration this process's loop started at

    def _check_images(self) -> None:
        """Decode every val and labeled image before the first step, each rank a share, so that
        a corrupt file stops the run now and not at the final evaluation (a collective)."""
        from simmatch.images.decode import find_undecodable, raise_if_undecodable

        files = self.streams.check_files
        started = time.perf_counter()
        mine = find_undecodable(files[self.rank::self.processes], self.cfg.data.num_threads)
        problems = [p for share in dist.all_gather_objects(mine) for p in share]
        raise_if_undecodable(problems, "val or labeled images")
        if self.rank == 0 and files:
            self.log.info("decoded %d val and labeled images in %.1f s (data.check_images)",
                          len(files), time.perf_counter() - started)

    # ------------------------------------------------------------------ state
    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def resume(self) -> bool:
        found = store.find_checkpoint(self.run_dir.root, required=False)
        if found is None:
            return False
        path, state = found
        judge_checkpoint(state.get("config"), to_dict(self.cfg), str(path))
        self.load_state_dict(state, path)
        old_it, old_world = self.resumed_from
        if old_world != self.world:
            self.log.info("%s", describe(self.cfg, old_world, self.world, old_it, self.derived.total_iters))
        elif self.resumed_processes != self.processes:
            self.log.info("the same %d-rank run continued on %d process(es) (was %d): %d virtual rank(s) "
                          "per process", self.world, self.processes, self.resumed_processes, len(self.ranks))
        self.log.info("resumed from %s at iteration %d", path, self.iteration)
        return True

    def _init_from(self, source: str) -> None:
        """A fresh run starts from another run's (or an export's) trunk; a resumed one does not
        need the source any more."""
        from simmatch.weights.init import init_student_from

        report = init_student_from(self.method, source, self.cfg.model.arch)
        self.method.teacher.module.load_state_dict(self.method.student.state_dict())
        for line in report.lines():
            self.log.info(line)
        self.log.info("student and teacher trunks initialised from %s", source)

    def save(self, at_mark: bool = False) -> None:
        """A checkpoint of the current iteration (a collective; only rank 0 writes); `at_mark`: of
        the data positions before the step that could not draw its batches (state_dict)."""
        state = self.state_dict(at_mark)  # every rank takes part; only rank 0 writes
        if self.rank == 0:
            self.saver.save(state, self.iteration)
        self.saved_at = self.iteration

    def save_at_stop(self, why: str, at_mark: bool = False) -> None:
        """A stop the run decides on (a data error, divergence) keeps the last completed step: a
        checkpoint of it unless one exists, atomic and with its digest like every other. A failed
        write is named and the stop's own error stands."""
        try:
            self.saver.wait()
            if self.saved_at != self.iteration:
                self.save(at_mark)
                self.saver.wait()
                if self.rank == 0:
                    self.log.info("%s: saved iteration %d (%s)", why, self.iteration,
                                  self.run_dir.checkpoint(self.iteration).name)
        except CheckpointError as exc:
            self.log.warning("%s: the checkpoint of iteration %d could not be written: %s", why,
                             self.iteration, exc)

    # ------------------------------------------------------------------ loop
    def step(self) -> dict[str, torch.Tensor]:
        """One optimizer step at the current iteration (the loop advances the iteration and the lr).

        Every rank this process runs (one, or its virtual ranks) draws its batches; the method
        makes all their targets; then each rank's forward and backward in turn (a BN group's
        ranks in one forward), its loss divided by the forwards so that the accumulated gradient,
        averaged over the processes by DDP in the last backward only, is the mean over all ranks.
        """
        m, cl, timer = self.method, self.cfg.train.channels_last, self.method.timer
        for r in self.streams.train:
            r.mark()  # a draw that fails leaves the step not begun: what a stop saves (state_dict)
        self.rng_at_mark = torch.get_rng_state()  # a draw may take a seed from it (a new DataLoader epoch)
        error = None
        with timer("data"):
            try:
                labeled = [move_batch(next(r.labeled), self.device, cl) if m.needs_labeled else None
                           for r in self.streams.train]
                unlabeled = [move_batch(next(r.unlabeled), self.device, cl) if m.needs_unlabeled else None
                             for r in self.streams.train]
            except DataError as exc:
                error = exc
        failed = self.stop.agree(error)  # every rank, before the step's first collective
        if failed is not None:
            raise failed
        with timer("augment"):
            labeled, unlabeled = m.augment_views(labeled, unlabeled, self.ranks, self.iteration)
        with self.autocast():
            step = m.targets(labeled, unlabeled, self.iteration)
        k = m.ranks_per_forward
        groups = [slice(i, i + k) for i in range(0, len(labeled), k)]
        stats = RankBNStats(m.student, len(groups))
        own = self.rank0_bn if self.rank0_bn is not None and self.ranks[0] == 0 else None
        if own is not None:
            own.before_forward()
        self.optimizer.zero_grad(set_to_none=True)
        parts = []
        for i, g in enumerate(groups):
            last = i == len(groups) - 1
            with contextlib.nullcontext() if last or self.ddp is None else self.ddp.no_sync():
                with self.autocast():
                    losses = m.student_losses(self.student, merge(labeled[g]), merge(unlabeled[g]),
                                              merge(step.ranks[g]), self.iteration)
                if "memory" in losses:  # made by the student's forward (targets_in_forward): one group
                    step = StepTargets(step.ranks, memory=losses.pop("memory"))
                with timer("backward"):
                    loss = losses["loss"] if len(groups) == 1 else losses["loss"] / len(groups)
                    self.scaler.scale(loss).backward()
            if i == 0 and own is not None:  # rank 0's forward (its BN group's, with virtual ranks)
                own.after_forward()
            stats.after_forward()
            parts.append({name: v.detach() for name, v in losses.items()})
        with timer("optimizer"):
            self.scaler.step(self.optimizer)
            self.scaler.update()
            average_buffers(m.student)
        m.after_step(step)
        if len(parts) == 1:
            return parts[0]
        return {name: torch.stack([p[name] for p in parts]).mean() for name in parts[0]}

    def fit(self) -> TrainResult:
        d, t = self.derived, self.cfg.train
        if self.rank == 0:
            listed = self.streams.split_lists.get("unlabeled")
            used = len(set(listed)) if listed else d.num_unlabeled  # a dropped image's place is another's
            dropped = f" ({d.num_unlabeled - used:,} dropped)" if used != d.num_unlabeled else ""
            self.log.info("run %s: %s, %s labeled / %s unlabeled images%s, %s iterations (%s per epoch), lr %.4g",
                          self.run_dir, running_text(self.world, self.processes), f"{d.num_labeled:,}",
                          f"{used:,}", dropped, f"{d.total_iters:,}", f"{d.steps_per_epoch:,}", d.lr)
            self.log.info("intervals: %s", intervals_text(d.log_every, d.ckpt_every, d.eval_every, d.total_iters))
            for note in d.interval_notes:
                self.log.info("note: %s", note)
        if not self.resume() and self.cfg.model.init_from:
            self._init_from(self.cfg.model.init_from)
        if self.iteration >= d.total_iters:
            return self.already_finished()
        if self.resumed_from is not None:
            self.metrics_file.write({"kind": "resume", "iteration": self.iteration, "world_size": self.world,
                                     "processes": self.processes,
                                     "from_iteration": self.resumed_from[0],
                                     "from_world_size": self.resumed_from[1],
                                     "from_processes": self.resumed_processes})
        stop = self.stop
        stop.install()
        self.began = True
        window = MetricWindow()
        guard = NonFiniteGuard(t.max_nonfinite_steps, self.device)
        ckpt_dir = self.run_dir.checkpoints
        progress = Progress(d.total_iters, self.rank == 0, initial=self.iteration)
        # images drawn per step (an unlabeled image counts once, however many views it has)
        per_step = d.global_batch * (self.method.needs_labeled + t.mu * self.method.needs_unlabeled)
        t_window, n_window = time.perf_counter(), 0
        t_start, start_it = time.perf_counter(), self.iteration
        self.start_iteration = start_it
        status, last = "finished", {}
        self.method.train()
        ended = False  # the loop ended on every rank together (not by an error of this rank alone)
        try:
            while self.iteration < d.total_iters:
                lr = lr_at(self.iteration, d.lr, d.warmup_iters, d.total_iters, self.cfg.optim.schedule,
                           d.steps_per_epoch if self.cfg.optim.lr_step == "epoch" else 0)
                set_lr(self.optimizer, lr)
                losses = self.step()
                guard.update(losses["loss"])
                window.add(losses)
                self.iteration += 1
                n_window += 1
                progress.step()
                done = self.iteration == d.total_iters
                interrupted = stop.stopping
                if self.iteration % d.log_every == 0 or done or interrupted:
                    # A window cut by an interruption (ended by the stop, or begun by a resume
                    # in its middle) is logged as such, with the number of steps it averages.
                    partial = (self.iteration - n_window) % d.log_every != 0 or \
                        not (self.iteration % d.log_every == 0 or done)
                    last = self._log(window.reduce(), lr, per_step * n_window / (time.perf_counter() - t_window),
                                     (time.perf_counter() - t_start) / (self.iteration - start_it), progress,
                                     n_window, partial)
                    t_window, n_window = time.perf_counter(), 0
                    guard.check(self.iteration, ckpt_dir)  # the host has synced anyway
                if interrupted or self.iteration % d.ckpt_every == 0 or done:
                    guard.check(self.iteration, ckpt_dir, self.method)  # never save NaN weights
                    self.save()
                if d.eval_every and self.iteration % d.eval_every == 0 and not done:
                    last.update(self.evaluate())
                if interrupted:
                    status = "interrupted"
                    self.log.info("signal %s: saved at iteration %d, stopping", stop.signum, self.iteration)
                    break
            if status == "finished":
                # every rank decides alike: by what it saved, not by the files (rank 0 may still be
                # writing the last one while the others look for it)
                if self.saved_at != self.iteration:
                    self.save()
                last.update(self.evaluate())
                # the run's end, for tools/status.py: "finished (iteration N of N, top-1 ...)"
                summary = evaluation_summary(read_records(self.run_dir.metrics)) if self.rank == 0 else {}
                self.metrics_file.write({"kind": "finished", "iteration": self.iteration,
                                         "total_iters": d.total_iters, **summary})
                if summary:
                    self.log.info("%s: final %.2f, best %.2f, median of the last %d evaluations %.2f",
                                  summary["metric"], summary["final"], summary["best"],
                                  min(LAST_EVALUATIONS, summary["evaluations"]),
                                  summary[f"median_last{LAST_EVALUATIONS}"])
            ended = True
        except StepDataError as exc:  # every rank has it, at the same step
            progress.close()
            self.save_at_stop(f"stopped on rank {exc.rank}'s data error" if self.processes > 1 else "stopped",
                              at_mark=True)
            ended = True
            raise
        except DataError:  # outside a step's draw: agreed only when this process is the whole run
            if self.processes == 1:
                progress.close()
                self.save_at_stop("stopped")
            raise
        except DivergedError:  # a verdict of every rank; weights never saved unless finite
            progress.close()
            if guard.weights_finite(self.method):
                self.save_at_stop("stopped: the loss diverged but the weights are still finite")
            ended = True
            raise
        finally:
            stop.restore()
            progress.close()
            self.metrics_file.close()
            self.saver.wait()
            if ended:  # a rank that fails alone must not wait here for peers still in the step
                dist.barrier()
        return TrainResult(status, self.iteration, stop.signum, last, start_it)

    def close(self) -> None:
        """Release what the trainer holds outside itself: data workers or pipelines, trackers, log files."""
        self.streams.close()
        self.metrics_file.close()
        close_logging(self.log)

    def _log(self, values: dict[str, float], lr: float, img_s: float, s_per_it: float,
             progress: Progress, steps: int, partial: bool) -> dict:
        record = {"kind": "train", "iteration": self.iteration, "lr": lr, "img_s": img_s * 1.0,
                  "steps": steps, "world_size": self.world, **values}
        if partial:
            record["partial"] = True
        self.metrics_file.write(record)
        eta = format_eta(s_per_it * (self.derived.total_iters - self.iteration))
        parts = " ".join(f"{k} {v:.4f}" for k, v in values.items())
        text = f"it {self.iteration}/{self.derived.total_iters} {parts} lr {lr:.4g} img/s {img_s:.1f} eta {eta}"
        if partial:
            text += f" (partial window: {steps} steps)"
        progress.update(self.iteration, values)
        self.log.info(text)  # above the bar on a terminal (tqdm.write), a plain line elsewhere
        return dict(values)


def write_splits(lists: dict[str, list[str]], run_dir: RunDir, overwrite: bool) -> None:
    """Keep the labeled and unlabeled lists of a run in RUN_DIR/splits/; a resumed run reads
    them back (`overwrite` only before the run's first checkpoint, when it starts afresh)."""
    run_dir.splits.mkdir(exist_ok=True)
    for name, files in lists.items():
        assert name in SPLIT_NAMES, name
        target = run_dir.split(name)
        if overwrite or not target.exists():
            atomic_write_text(target, "".join(f + "\n" for f in files))
