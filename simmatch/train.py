"""Train in this process: the distributed environment comes from torchrun, SLURM or tools/train.py."""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time

import torch

from simmatch import distributed as dist
from simmatch.checkpoint import store
from simmatch.config import Config, load_config, to_dict
from simmatch.engine.metrics import close_logging, format_eta
from simmatch.engine.tracking import check_available as check_trackers
from simmatch.engine.trainer import Trainer, TrainResult
from simmatch.errors import DataError, UserError, descriptor_limit
from simmatch.run.change import ALLOW_FLAG, differences, judge
from simmatch.run.lock import RunLock, RunLocked
from simmatch.run.rundir import RunDir, remove_leftovers, run_dir_of

log = logging.getLogger("simmatch")


def lock_run_dir(cfg: Config) -> RunLock | None:
    """Rank 0 takes the run directory's lock (one writer per run) and removes what a dead
    writer left; every rank learns the outcome, so a refused run stops on all of them."""
    lock, refused = None, None
    if dist.is_main():
        run_dir = run_dir_of(cfg)
        try:
            run_dir.ensure_writable()
            lock = RunLock(run_dir).acquire()
        except UserError as exc:  # in use by another writer, or not a usable directory
            refused = str(exc)
        except OSError as exc:
            refused = f"train.run_dir={run_dir} cannot hold a lock file: {exc.strerror or exc}"
        if lock is not None:
            removed = remove_leftovers(run_dir.root, run_dir.splits, run_dir.checkpoints)
            if removed:
                mb = sum(size for _, size in removed) / 2**20
                print(f"note: removed {len(removed)} temporary file(s) ({mb:.1f} MB) left in {run_dir} "
                      f"by a writer that died" + (f" ({lock.previous})" if lock.previous else ""),
                      file=sys.stderr, flush=True)
    refused = dist.broadcast_object(refused)
    if refused:
        raise RunLocked(refused)
    return lock


def prepare_run_dir(cfg: Config, allow_config_change: bool = False) -> RunDir:
    """Check the config against the run directory's and create the directory.

    A run directory with checkpoints is resumed only with a config that trains the same way
    (simmatch/run/change.py): otherwise one error line names the differing keys. A path
    that is a file, under a file or in a read-only place is one line too. The config itself
    is saved by `save_run_config`, once the run is set up.
    """
    run_dir = run_dir_of(cfg)
    if run_dir.has_checkpoints():
        old, source = store.run_config(run_dir.root)  # config.yaml, or the newest checkpoint's own
        if old is not None:
            judge(old, to_dict(cfg), str(run_dir), allow_config_change,  # every rank: a refusal stops all
                  "" if source == str(run_dir.config) else source)
            if source != str(run_dir.config) and dist.is_main():
                print(f"note: judged against {source}", file=sys.stderr, flush=True)
            mapped = run_dir.earlier_keys()
            if mapped and dist.is_main():
                print(f"note: {run_dir.config} names the method's keys as an earlier version did; read as "
                      f"{', '.join(mapped)} (docs/RUNS.md), and written so again", file=sys.stderr, flush=True)
    if dist.is_main():
        run_dir.ensure_writable()
    dist.barrier()
    return run_dir


def save_run_config(cfg: Config, run_dir: RunDir) -> None:
    """Save the resolved config as RUN_DIR/config.yaml.

    Called after the data, the split and the derived values have been checked, so a run that
    fails its checks leaves no config for the next run to inherit. Accepted changes (log
    intervals, data location, a longer schedule with --allow-config-change) rewrite the saved
    config so that it describes what is trained from now on.
    """
    if not dist.is_main():
        return
    saved = run_dir.config
    resuming = run_dir.has_checkpoints()
    try:
        old = run_dir.saved_config()
    except UserError:
        if resuming:
            raise
        old = None  # a damaged config.yaml of a run that never saved a checkpoint: replaced
    changed = differences(old, to_dict(cfg)) if old is not None else []
    if old is None or changed or run_dir.earlier_keys():
        run_dir.save_config(cfg)
    shown = [k for k in changed if k not in ("train.run_dir", "name")]
    if shown:
        print(f"note: {saved} updated ({', '.join(shown[:8])} changed"
              f"{'' if resuming else '; no checkpoint yet, so the run starts afresh'})",
              file=sys.stderr, flush=True)


def pick_device() -> torch.device:
    """cuda:(LOCAL_RANK mod visible GPUs) where CUDA is present, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", dist.local_device_index())
    return torch.device("cpu")


def _report(result: TrainResult, run_dir: RunDir) -> None:
    """The line a user reads at the end: the accuracy, or that the run had already finished."""
    m = result.metrics
    kind = "" if "student_top1" in m or "teacher_top1" in m else "knn_"
    label = "validation top-1" if not kind else "validation k-NN top-1"
    scores = (f"{label}: student {m.get(f'student_{kind}top1', float('nan')):.2f}%  "
              f"teacher {m.get(f'teacher_{kind}top1', float('nan')):.2f}%")
    if result.status == "already_finished":
        print(f"{run_dir} is already finished (iteration {result.iteration}); its result: {scores} "
              f"(metrics.jsonl, checkpoints/); nothing trained. To train again use a new train.run_dir "
              f"(or {ALLOW_FLAG} with a longer optim.iters / optim.epochs to continue it)", flush=True)
    elif result.status == "finished" and m:
        print(f"{scores}  ({run_dir})", flush=True)


class FreshRunDir:
    """What a run directory held before this start, so that a refused start (a failed check
    before the first step) leaves it as it found it: no .lock, logs, splits/ or config.yaml of
    a run that never began. A directory that already held a run is never touched."""

    def __init__(self, run_dir: RunDir) -> None:
        self.run_dir = run_dir
        self.held_run = run_dir.holds_run()
        self.before = set(os.listdir(run_dir.root)) if run_dir.root.is_dir() else None

    def undo(self) -> None:
        """Remove what this start created (rank 0, after its lock is released)."""
        if self.held_run or self.run_dir.has_checkpoints() or not self.run_dir.root.is_dir():
            return
        if self.before is None:
            shutil.rmtree(self.run_dir.root, ignore_errors=True)
            return
        for name in set(os.listdir(self.run_dir.root)) - self.before:
            path = self.run_dir.root / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def run(cfg_path: str | None, overrides: list[str] | tuple[str, ...] = (),
        allow_config_change: bool = False) -> TrainResult:
    """Load the config, join the process group, train (resuming if possible), leave the group."""
    started = time.time()
    cfg = load_config(cfg_path, list(overrides))
    dist.init()
    try:
        device = pick_device()
        if cfg.model.init_from and not run_dir_of(cfg).has_checkpoints():
            from simmatch.weights.init import check_init_source

            check_init_source(cfg)  # before the run directory is created or written
        check_trackers(cfg)  # an uninstalled tracker is refused before the run directory is written
        fresh = FreshRunDir(run_dir_of(cfg)) if dist.is_main() else None
        lock = lock_run_dir(cfg)  # one writer per run directory, before anything in it is written
        began, trained = False, 0
        try:
            run_dir = prepare_run_dir(cfg, allow_config_change)
            while True:  # again after a data.max_bad_images drop, from the checkpoint the stop saved
                trainer = Trainer(cfg, run_dir, device)
                try:
                    save_run_config(cfg, run_dir)
                    result = trainer.fit()
                    break
                except DataError as exc:
                    if not drop_and_go_on(exc, cfg, run_dir):
                        raise
                    trained += trainer.iteration - trainer.start_iteration
                finally:
                    began = began or trainer.began
                    trainer.close()
        except BaseException:  # a refusal (or any failure) before the first step: leave no trace
            if lock is not None:
                lock.release()
                lock = None
            if fresh is not None and not began:
                close_logging(log)  # a trainer that failed to build keeps its log file open
                fresh.undo()
            raise
        finally:
            if lock is not None:
                lock.release()
        if dist.is_main():
            _report(result, run_dir)
            print(f"total time {format_eta(time.time() - started)} "
                  f"({trained + result.iteration - result.start_iteration} iterations trained in this process)",
                  flush=True)
        return result
    finally:
        dist.shutdown()


def drop_and_go_on(exc: DataError, cfg: Config, run_dir: RunDir) -> bool:
    """data.max_bad_images: an unlabeled image that stopped the run (every rank stopped at the same
    step and the stop saved it) is dropped, as by --drop-images, while the run's dropped images stay
    within the budget; True: every rank then goes on from that checkpoint. Rank 0 decides and
    records it (it holds the run's lock); the others follow its word."""
    from simmatch.engine.stop import StepDataError
    from simmatch.run.dropped import drop, read_dropped

    rel = getattr(exc, "droppable", None)
    agreed = isinstance(exc, StepDataError) or dist.world_size() == 1
    if rel is None or cfg.data.max_bad_images <= 0 or not agreed:
        return False
    count = None
    if dist.is_main():
        dropped = read_dropped(run_dir.splits)
        if len(dropped) < cfg.data.max_bad_images and run_dir.has_checkpoints():
            drop(run_dir.root, [rel], reason=f"data.max_bad_images={cfg.data.max_bad_images}: {exc}",
                 lock_held=True)
            count = len(dropped) + 1
            print(f"note: {rel} does not decode; dropped ({count} of data.max_bad_images="
                  f"{cfg.data.max_bad_images}), going on from the checkpoint the stop saved", file=sys.stderr,
                  flush=True)
    return dist.broadcast_object(count) is not None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train one process of a (possibly distributed) run.")
    parser.add_argument("--cfg", required=True, help="YAML config file")
    parser.add_argument(ALLOW_FLAG, dest="allow_config_change", action="store_true",
                        help="resume a run directory whose saved config has another schedule length")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    try:
        result = run(args.cfg, args.overrides, args.allow_config_change)
    except UserError as exc:
        if dist.rank() == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except (OSError, ImportError) as exc:
        limit = descriptor_limit(exc)
        if limit is None:
            raise
        if dist.rank() == 0:
            print(f"error: {limit}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:  # before training started, or a second Ctrl-C
        if dist.rank() == 0:
            print("interrupted: stopped without saving", file=sys.stderr, flush=True)
        return 130
    return 0 if result.status in ("finished", "interrupted", "already_finished") else 1

if __name__ == "__main__":
    from simmatch.launch.local import watch_launcher
    from simmatch.launch.process import run_cli

    watch_launcher()  # a rank of tools/train.py --nproc N: never outlive the launcher for long
    run_cli(main, heavy=("torch", "torchvision"))
