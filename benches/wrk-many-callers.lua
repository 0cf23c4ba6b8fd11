-- Many callers, many data sources: every request picks a random caller token
-- ("bench-caller-0000" ... up to BENCH_CALLERS) and a random data source id (1 ... BENCH_IDS).
-- With BENCH_CALLERS=1 and BENCH_IDS=1 it sends one fixed request through the same per-request
-- Lua path, which is how bench.py measures what this script costs wrk.

local callers = tonumber(os.getenv("BENCH_CALLERS") or "1000")
local ids = tonumber(os.getenv("BENCH_IDS") or "100000")
local tokens = {}
local next_seed = 1

function setup(thread)
   thread:set("seed", next_seed)
   next_seed = next_seed + 1
end

function init(args)
   math.randomseed(os.time() * 1000 + (seed or 0))
   for i = 1, callers do
      tokens[i] = "Bearer " .. string.format("bench-caller-%04d", i - 1)
   end
end

local headers = { ["Content-Type"] = "application/json" }

function request()
   headers["Authorization"] = tokens[math.random(callers)]
   local path = "/api/v1/data_sources/" .. math.random(ids) .. "/test"
   return wrk.format("POST", path, headers, "{}")
end

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'BENCH_RESULT {"requests":%d,"duration_us":%d,"bytes":%d,'
         .. '"connect_errors":%d,"read_errors":%d,"write_errors":%d,"timeouts":%d,'
         .. '"non2xx":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f}\n',
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.timeout, e.status,
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency.max, latency.mean))
end
