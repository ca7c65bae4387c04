"""The private parts of submitit the launcher uses still exist: an upgrade that renames them
fails here, not in a job that then cannot requeue (slurm/submitit_compat.py)."""
import inspect

import pytest

from slurm import submitit_compat as compat

pytestmark = pytest.mark.timeout(60)


def test_version_is_the_supported_one():
    assert compat.version()[:2] == compat.SUPPORTED, (
        "submitit was upgraded: re-check slurm/submitit_compat.py against it, then update SUPPORTED "
        "and the bound in setup.py")


def test_requeue_handler_and_timeout_countdown():
    from submitit.core.job_environment import SignalHandler
    from submitit.helpers import DelayedSubmission

    delayed = DelayedSubmission(print)
    delayed._timeout_countdown = 3  # what submitit sets from max_num_timeout
    delayed._timeout_min = 60
    handler = SignalHandler(None, None, delayed).checkpoint_and_try_requeue  # what USR2 is bound to
    assert compat.is_requeue_handler(handler)
    assert not compat.is_requeue_handler(print)
    assert compat.timeouts_left(handler, timed_out=True) == 2
    assert compat.timeouts_left(handler, timed_out=False) == 3
    assert compat.timeouts_left(print, timed_out=True) is None
    assert compat.has_timed_out(handler) is False  # a fresh handler, far from its time limit
    # the handler reads the same countdown when it requeues
    assert "_timeout_countdown" in inspect.getsource(SignalHandler.checkpoint_and_try_requeue)


def test_submission_script_text(tmp_path):
    from slurm.launcher import JobSpec, make_executor

    ex = make_executor(JobSpec(nodes=2, gpus_per_node=0, tasks_per_node=3), tmp_path, dry_run=True)
    text = compat.submission_script(ex)
    assert text.startswith("#!/bin/bash") and "#SBATCH --nodes=2" in text
    assert "#SBATCH --ntasks-per-node=3" in text and "submitit" in text


def test_watcher_state_cache():
    from submitit.slurm.slurm import SlurmInfoWatcher

    watcher = SlurmInfoWatcher()
    for name in compat.WATCHER_ATTRIBUTES:
        assert hasattr(watcher, name), name
    assert callable(getattr(watcher, "_make_command", None))
    assert isinstance(watcher._registered, set) and isinstance(watcher._info_dict, dict)
