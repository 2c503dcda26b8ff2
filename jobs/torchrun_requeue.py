"""torchrun, with two changes the SLURM requeue path needs (used by jobs/common.sh).

Same arguments as torchrun. Plain torchrun
- dies of SIGUSR1 (its default action), orphaning workers that are writing a checkpoint;
  here SIGUSR1 is forwarded to the workers, which torchrun starts in their own sessions,
  so a signal to torchrun's process group does not reach them;
- exits 1 whatever its workers exited with; here, when the workers exited
  ALIGN_EXIT_REQUEUE (75: "checkpoint written, run me again"), so does this process, and
  the batch script requeues the job. Workers torchrun stopped with SIGTERM because a peer
  had already left with 75 count as leaving with 75.

The trainers must leave together (a barrier after the checkpoint): when one worker exits,
torchrun stops the others of its node with SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main

EXIT_REQUEUE = int(os.environ.get("ALIGN_EXIT_REQUEUE", "75"))


def child_pids(parent: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # /proc/PID/stat: "pid (comm) state ppid ..."; comm may hold spaces and parentheses.
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
            pids.append(int(entry))
    return pids


def forward_to_workers(signum: int, _frame) -> None:
    for pid in child_pids(os.getpid()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


if __name__ == "__main__":
    signal.signal(signal.SIGUSR1, forward_to_workers)
    try:
        main()
    except ChildFailedError as e:
        codes = {failure.exitcode for failure in e.failures.values()}
        # A worker exits 75 only after the barrier that follows the checkpoint, and torchrun then
        # stops the workers still leaving with SIGTERM: those are requeue exits too.
        if EXIT_REQUEUE in codes and codes <= {EXIT_REQUEUE, -signal.SIGTERM}:
            print(f"torchrun_requeue: workers exited {EXIT_REQUEUE}: requeue", file=sys.stderr, flush=True)
            sys.exit(EXIT_REQUEUE)
        raise
