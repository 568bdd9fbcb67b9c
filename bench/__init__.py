"""InvoiceIQ's benchmark harness (issue 8): ``python -m bench`` / ``python -m bench --quick``.

Layout:

* :mod:`bench.reference_app` - the bare Quart JSON-POST endpoint on hypercorn (the yardstick);
* :mod:`bench.sink` - a tiny fake Graph API / Africa's Talking (/ later Daraja) HTTP server that
  the daemon's outbox talks to, counting what it receives;
* :mod:`bench.bodies` - pre-generated, pre-signed, unique WhatsApp webhook bodies;
* :mod:`bench.cycle.lua` + :mod:`bench.wrk` - wrk driving those bodies, and wrk's output parsed;
* :mod:`bench.pyload` - a small async httpx load generator used when wrk is not installed;
* :mod:`bench.servers` - starting, pinning, probing and stopping every process by its PID;
* :mod:`bench.durability` - counting what the daemon stored against what wrk saw accepted;
* :mod:`bench.scenarios` - the scenarios, including the hooks for end-to-end and state at scale;
* :mod:`bench.runner` - the command line, the JSON report and the table.
"""
