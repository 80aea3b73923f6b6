"""``python -m kservice.cli``: the ``kservice`` console script."""

from . import main

main()
