"""What the test modules share; no test module imports another.

- :mod:`support.servers`: servers run in the test's own Trio run, Trio
  clients for them, TLS contexts, and host checks (IPv6, open descriptors).
- :mod:`support.cli`: a child process read line by line with timeouts;
  ``python -m trioserve`` run so, and blocking clients for it.
- :mod:`support.examples`: the examples in ``examples/`` run so.
- :mod:`support.systemd`: a stand-in for systemd's notify socket.
- :mod:`support.haproxy`: a real HAProxy in front of a server.
- :mod:`support.reliability`: the reliability tests' harness;
  :mod:`support.reliability_server` is the service it runs.
- :mod:`support.real_clients`: real clients against a server stopped
  mid-load; :mod:`support.counting_handlers` is what that server serves.

Fixtures the modules share (``short_tmp``) are in ``conftest.py``.
"""
