-- wrk script: cycle through pre-signed, unique WhatsApp webhook bodies.
--
-- Usage: wrk -t1 -c64 -d10s --latency -s bench/cycle.lua URL -- BODIES_FILE NTHREADS
-- BODIES_FILE has one request per line: <X-Hub-Signature-256 value> TAB <raw JSON body>.
-- Thread k of NTHREADS sends lines k, k+NTHREADS, ... so that no two threads share a body.
-- Every body is sent at most once; if a thread runs out it starts again from its first body
-- (a repeat), and done() reports it, so the harness can mark the run as invalid.
-- done() prints "BENCH tid=<k> sent=<requests built> bodies=<bodies loaded>" per thread.

local threads = {}
local next_tid = 0

function setup(thread)
  thread:set("tid", next_tid)
  next_tid = next_tid + 1
  table.insert(threads, thread)
end

function init(args)
  local path = args[1]
  local nthreads = tonumber(args[2] or "1")
  local me = tid or 0
  requests = {}
  local i = 0
  for line in io.lines(path) do
    if i % nthreads == me then
      local tab = string.find(line, "\t", 1, true)
      local headers = {}
      headers["Content-Type"] = "application/json"
      headers["X-Hub-Signature-256"] = string.sub(line, 1, tab - 1)
      requests[#requests + 1] = wrk.format("POST", nil, headers, string.sub(line, tab + 1))
    end
    i = i + 1
  end
  bodies = #requests
  sent = 0
  if bodies == 0 then
    error("no bodies for thread " .. me .. " in " .. path)
  end
end

function request()
  sent = sent + 1
  return requests[((sent - 1) % bodies) + 1]
end

function done(summary, latency, reqs)
  for _, t in ipairs(threads) do
    io.write(string.format("BENCH tid=%d sent=%d bodies=%d\n", t:get("tid"), t:get("sent"), t:get("bodies")))
  end
end
