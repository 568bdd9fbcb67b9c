"""InvoiceIQ's benchmark harness (issue 8): ``python -m bench`` / ``python -m bench --quick``.

Layout:

* :mod:`bench.reference_app` - the bare Quart JSON-POST endpoint on hypercorn (the yardstick);
* :mod:`bench.sink` - a tiny fake Graph API / Africa's Talking HTTP server that the daemon's
  outbox talks to during the ingest scenarios, counting what it receives;
* :mod:`bench.bodies` - pre-generated, pre-signed, unique WhatsApp webhook bodies;
* :mod:`bench.cycle.lua` + :mod:`bench.wrk` - wrk driving those bodies, and wrk's output parsed;
* :mod:`bench.pyload` - a small async httpx load generator used when wrk is not installed;
* :mod:`bench.servers` - starting, pinning, probing and stopping every process by its PID;
* :mod:`bench.durability` - counting what the daemon stored against what wrk saw accepted;
* :mod:`bench.simhost` - the sandbox simulators (``invoiceiq.sandbox``) as their own process on the
  load core, with the daemon's https public URL rewritten to its loopback port;
* :mod:`bench.e2e` - end to end and state at scale: the simulators + daemon stack, the async
  driver playing merchant and customers, the counts afterwards, the database seed, py-spy;
* :mod:`bench.scenarios` - the scenarios: ingest, end to end, state at scale;
* :mod:`bench.runner` - the command line, the JSON report and the table.
"""
