"""Built-in kservice plugins: transports and policies, each registered through the ``kservice`` entry-point group."""
