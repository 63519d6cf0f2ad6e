"""One model called from several Python threads at once: the concurrency tests' shared driver."""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch


def call_from_threads(model: Callable[[torch.Tensor], torch.Tensor], inputs: list[torch.Tensor],
                      nthreads: int) -> list[torch.Tensor | None]:
    """``model(inputs[i])`` (cloned) for every i, thread ``t`` taking ``i = t, t + nthreads, ...``, all
    released at once by a barrier; the first exception of any thread is re-raised here."""
    results: list[torch.Tensor | None] = [None] * len(inputs)
    errors: list[BaseException] = []
    start = threading.Barrier(nthreads)

    def work(t: int) -> None:
        try:
            start.wait()
            with torch.inference_mode():
                for i in range(t, len(inputs), nthreads):
                    results[i] = model(inputs[i]).clone()
        except BaseException as exc:  # reported below, with the thread's traceback
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(nthreads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not any(th.is_alive() for th in threads), "a thread hung"
    if errors:
        raise errors[0]
    return results
