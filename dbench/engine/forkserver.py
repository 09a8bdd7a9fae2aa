"""The fork server the distributed engine's module processes are forked from (``launch.context`` says why).

No torch here: ``dbench run`` starts the server before it imports torch itself (``start``), so that the
server's imports and the launcher's run at the same time, on two cores, instead of one after the other.
"""
from __future__ import annotations

import multiprocessing as mp
from multiprocessing import forkserver

# torch.optim.Optimizer's first construction imports torch._dynamo (its ``_disable_dynamo`` wrapper): about
# 1.4 s of CPU on the 2-core machine, paid by every module process, since each builds its optimizer. Imported
# once in the server, each forked process has it. The import starts no thread (a fork server must have none).
ALSO_PRELOADED = ("torch._dynamo",)


def context(module: str):
    """multiprocessing's fork server context, whose server has imported ``module`` (the application's: the
    one that holds what the workers run) and ``ALSO_PRELOADED``. Once the server runs (one per launcher
    process, for its lifetime), a later preload list is ignored: every caller passes the same module."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([module, *ALSO_PRELOADED])
    return ctx


def start(module: str) -> None:
    """Start the server now, without waiting for its imports (about 3 s of CPU): the first worker started
    later waits for them only if they are not done by then."""
    context(module)
    forkserver.ensure_running()
