"""The benchmark harness: trioserve against its peers (``run.py``), a soak
test (``soak.py``) and a profiler (``profile_server.py``).

- :mod:`benchmarks.catalog`: the servers, the loads and the targets;
- :mod:`benchmarks.machine`: paths, cores, the kernel settings and ``/proc``;
- :mod:`benchmarks.driver`: a server and the C load generator, trial by trial;
- :mod:`benchmarks.records`: what a run measures, and its JSON form;
- :mod:`benchmarks.figures`: summaries, ratios, scaling and targets;
- :mod:`benchmarks.tables` and :mod:`benchmarks.report`: tables, files, chart;
- :mod:`benchmarks.cli`: the command line of ``run.py``.
"""
