"""One thread for all the server's tensor work: loading the model and adapters, and every forward pass.

Why one thread. PyTorch's CPU wheels run intra-op parallelism on GNU OpenMP (libgomp), which keeps a
pool of helper threads for every thread that ever started a parallel region, for as long as that
thread lives. Between regions a helper spins briefly before it sleeps, unless libgomp manages more
threads than the machine has CPUs: then it hardly spins, and every parallel region must wake its
helpers from a futex. So once one thread has loaded the model (and owns a pool), a second thread that
computes pays a wake-up on every operator. Measured on a 2-core AMD EPYC, torch 2.13, fp32:

    x (16, 576) @ A^T (576, 16), one call                      6 us alone     56-116 us beside a pool
    the default model, one decode step of 16 rows: base          80 ms          100 ms
                                      with a LoRA adapter        92 ms          160 ms

A decode step of a small model is hundreds of small operators, so the engine lost a fifth of its speed
on the base and more with adapters (three more operators per adapted layer). OpenMP 5.0's
`omp_pause_resource_all` frees the calling thread's pool but did not free every helper here, and other
runtimes shut down entirely on it; a process whose tensor work all runs on one thread has one pool and
nothing to wake. Hence this thread: the server loads the model through `call`, the engine runs its loop
on it (`submit`), and the HTTP handlers hand it adapter loads (`call` from a helper thread); a long job
such as the engine's loop runs the jobs handed in meanwhile between its steps (`run_pending`), after a
`waker` has interrupted its wait.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Callable


class ComputeThread:
    """A thread that runs the jobs handed to it, one at a time, in order; see the module docstring."""

    def __init__(self, name: str = "tunesmith-compute"):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._wakers: list[Callable[[], None]] = []
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def on_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def submit(self, fn, *args, **kwargs) -> Future:
        """Run fn(*args, **kwargs) on the thread; its Future. A long job running there is told (its wakers)."""
        future: Future = Future()
        self._jobs.put((future, fn, args, kwargs))
        for wake in list(self._wakers):
            wake()
        return future

    def call(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) run on the thread, waited for: its result, or its exception raised here."""
        if self.on_thread():
            return fn(*args, **kwargs)
        return self.submit(fn, *args, **kwargs).result()

    def run_pending(self) -> None:
        """Run the jobs handed in so far (on the thread, from a long job between its steps)."""
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if job is None:  # close() while a long job ran: stop after it
                self._jobs.put(None)
                return
            self._run(job)

    def add_waker(self, wake: Callable[[], None]) -> None:
        """wake() is called after each submit, from the submitting thread (to interrupt a long job's wait)."""
        self._wakers.append(wake)

    def remove_waker(self, wake: Callable[[], None]) -> None:
        if wake in self._wakers:
            self._wakers.remove(wake)

    def close(self, timeout: float = 5.0) -> None:
        """Stop after the jobs handed in before."""
        self._jobs.put(None)
        if not self.on_thread():
            self._thread.join(timeout)

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            self._run(job)

    @staticmethod
    def _run(job) -> None:
        future, fn, args, kwargs = job
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as e:  # handed back to the caller of call() or to whoever reads the Future
            future.set_exception(e)
