"""The checkpoint writer of a training: recovery checkpoints every N steps (the newest `keep`
kept, `last.pt` pointing at the newest) and best.pt at the best evaluation, written in a
background thread after a host copy so that training stalls only for the copy."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from simmatch.checkpoint.store import save_checkpoint, to_cpu
from simmatch.errors import CheckpointError
from simmatch.files.atomic import atomic_write_text, digest_path, replace_symlink, unlink_quiet
from simmatch.run.rundir import (
    BEST,
    BEST_RECORD,
    LAST,
    checkpoint_iteration,
    checkpoint_name,
    free_best_name,
    list_best,
    list_checkpoints,
)


class CheckpointSaver:
    """Writes `ckpt_{iteration}.pt` and prunes all but the newest `keep`.

    With `background=True` the file is written by a thread after the state has been copied
    to the host, so training stalls only for the copy. `wait()` joins the pending write.
    """

    def __init__(self, ckpt_dir: str | Path, keep: int = 3, background: bool = True):
        self.dir = Path(ckpt_dir)
        self.keep = keep
        self.background = background
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_stall_s = 0.0
        self.last_write_s = 0.0

    def path_for(self, iteration: int) -> Path:
        return self.dir / checkpoint_name(iteration)

    def save(self, state: dict, iteration: int) -> Path:
        t0 = time.perf_counter()
        self.wait()
        host_state = to_cpu(state)
        path = self.path_for(iteration)
        self.last_stall_s = time.perf_counter() - t0
        if self.background:
            self._thread = threading.Thread(target=self._write, args=(host_state, path), daemon=False)
            self._thread.start()
        else:
            self._write(host_state, path)
            self._raise_pending()
        return path

    def _write(self, state: dict, path: Path) -> None:
        t0 = time.perf_counter()
        try:
            save_checkpoint(state, path)
            if checkpoint_iteration(path.name) is not None:  # a recovery checkpoint: `last` follows it, old ones go
                replace_symlink(self.dir / LAST, path.name)
                self._prune()
        except BaseException as exc:  # surfaced by wait()
            self._error = exc
        self.last_write_s = time.perf_counter() - t0

    def save_best(self, state: dict, record: dict) -> Path:
        """Write the whole training state at the best evaluation as `best_<iteration>.pt` with its
        digest (written once, like every checkpoint), then point the links `best.pt.sha256` and
        `best.pt` at them, write `best.json` describing it and remove the previous best; in the
        writer thread like `save`. No name is ever rewritten in place, so a kill at any moment
        leaves `best.pt` a whole file whose digest `sha256sum -c best.pt.sha256` confirms."""
        t0 = time.perf_counter()
        self.wait()
        host_state = to_cpu(state)
        self.last_stall_s = time.perf_counter() - t0

        def write() -> None:
            try:
                name = free_best_name(self.dir, int(record["iteration"]))
                save_checkpoint(host_state, self.dir / name)
                replace_symlink(digest_path(self.dir / BEST), digest_path(Path(name)).name)
                replace_symlink(self.dir / BEST, name)
                atomic_write_text(self.dir / BEST_RECORD, json.dumps(record) + "\n")
                for old in list_best(self.dir):
                    if old.name != name:
                        unlink_quiet(old)
                        unlink_quiet(digest_path(old))
            except BaseException as exc:  # surfaced by wait()
                self._error = exc

        if self.background:
            self._thread = threading.Thread(target=write, daemon=False)
            self._thread.start()
        else:
            write()
            self._raise_pending()
        return self.dir / BEST

    def _prune(self) -> None:
        for _, old in list_checkpoints(self.dir)[:-self.keep]:
            unlink_quiet(old)
            unlink_quiet(digest_path(old))

    def _raise_pending(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            if isinstance(err, CheckpointError):
                raise err
            raise CheckpointError(f"writing a checkpoint into {self.dir} failed: {err}")

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._raise_pending()
