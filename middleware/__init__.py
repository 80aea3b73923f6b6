"""Built-in ServiceMiddleware plugins, each registered through the ``kservice`` entry-point group."""
