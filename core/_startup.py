"""What loading kservice does with the garbage collector (see :func:`collector_paused`)."""

from __future__ import annotations

import gc
from _thread import allocate_lock
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["collector_paused"]

_lock = allocate_lock()  # not threading's: it is imported (with its objects) inside the first block
_depth = 0


@contextmanager
def collector_paused() -> Iterator[None]:
    """Run the block with the cyclic garbage collector paused; then let it resume without a pass.

    Importing kservice and registering its plugins creates some fifteen
    thousand objects (modules, classes, functions, hook tables) that live as
    long as the process. The collector would scan them about twenty times
    during a caller's start and free nothing (some 2.5 ms of a ~30 ms start).
    So the block runs with the collector disabled and, at its end, what the
    collector tracks is moved to its oldest generation unscanned
    (``gc.freeze()`` then ``gc.unfreeze()``, both constant time): where two
    ordinary passes would have moved it anyway. Garbage cycles made before
    the block are then freed by the next full collection instead of a young
    one (``gc.collect()`` frees them as usual).

    A collector the program disabled stays disabled and is not touched; a
    program that froze objects (``gc.get_freeze_count()``, before forking)
    keeps them frozen (the collector then only resumes). Blocks nest, in one
    thread or several: the collector resumes when the last one ends.
    """
    global _depth
    with _lock:
        paused = _depth > 0 or gc.isenabled()
        if paused:
            _depth += 1
            gc.disable()
    try:
        yield
    finally:
        if paused:
            with _lock:
                _depth -= 1
                if _depth == 0:
                    if gc.get_freeze_count() == 0:
                        gc.freeze()
                        gc.unfreeze()
                    gc.enable()
