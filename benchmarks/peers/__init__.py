"""The peers trioserve is measured against, each a script of its own
(``python benchmarks/peers/trio_peer.py --tcp HOST:PORT``, with the
repository on ``PYTHONPATH``, as ``run.py`` starts them), and the handlers
of the ``trioserve-lines`` server (``trioserve_lines``)."""
