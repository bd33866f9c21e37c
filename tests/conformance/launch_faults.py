"""Rank functions for the launcher's fault tests, in a module of their own: every rank imports the module of the
function it runs, and this one imports no pytest (which costs each of the 60 rank starts of the 20-trial test more
than the trial itself)."""

import ctypes
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist


def _die(how):
    if how == "exit":
        os._exit(3)
    if how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    ctypes.string_at(0)  # reads address 0: SIGSEGV


def die_mid_collective(victim, how):
    t = torch.ones(1024)
    for step in range(1000):
        if step == 3 and dist.get_rank() == victim:
            _die(how)
        dist.all_reduce(t)  # the survivors are inside this all-reduce, waiting for the victim, when it dies
    return "survived"


def report_and_block(out):
    """Rank 0 waits in an all-reduce that rank 1 never joins; rank 1 sleeps. Both report their pid."""
    Path(out, f"rank{dist.get_rank()}").write_text(str(os.getpid()))
    if dist.get_rank() == 0:
        dist.all_reduce(torch.ones(1))
    time.sleep(3600)


def stop_mid_collective(victim):
    """The victim stops itself (SIGSTOP) at step 3; its peers wait for it inside the next all-reduce."""
    t = torch.ones(16)
    for step in range(1000):
        if step == 3 and dist.get_rank() == victim:
            os.kill(os.getpid(), signal.SIGSTOP)
        dist.all_reduce(t)
    return "survived"


def report_and_stop(out):
    """Rank 1 stops itself (SIGSTOP: it can run no code, so it cannot notice its caller die) while rank 0 waits in
    an all-reduce for it. Both report their pid."""
    Path(out, f"rank{dist.get_rank()}").write_text(str(os.getpid()))
    if dist.get_rank() == 1:
        os.kill(os.getpid(), signal.SIGSTOP)
    dist.all_reduce(torch.ones(1))
    time.sleep(3600)
