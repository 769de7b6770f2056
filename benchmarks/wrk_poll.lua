-- wrk script (one thread, one connection): poll a job's metrics (BENCH_PATH) for the steps
-- after the last one seen, BENCH_RATE_HZ polls a second, the schedule starting BENCH_PHASE_MS
-- after the first answer; print one JSON line of results (latencies in microseconds) when
-- stopped. After each answer the next poll waits for the next slot of the schedule, so the rate
-- holds however long the polls take.
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clock_id, bench_timespec *tp);
]]
local CLOCK_MONOTONIC = 1
local ts = ffi.new("bench_timespec")
local function now_ms()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, ts)
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end

local path = os.getenv("BENCH_PATH")
local period_ms = 1000 / tonumber(os.getenv("BENCH_RATE_HZ"))
local phase_ms = tonumber(os.getenv("BENCH_PHASE_MS") or "0")
local next_slot = nil
local after = 0

request = function()
  return wrk.format("GET", path .. "?after_step=" .. after)
end

response = function(status, headers, body)
  local seen = body:match('"next_after_step":(%d+)')
  if seen then
    after = math.max(after, tonumber(seen))
  end
end

delay = function()
  local now = now_ms()
  if next_slot == nil then
    next_slot = now + phase_ms
  end
  local slot = math.max(next_slot, now) -- behind: no bursts to catch up
  next_slot = slot + period_ms
  return slot - now
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "p50_us": %d, "non_2xx": %d, "socket_errors": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), e.status,
    e.connect + e.read + e.write + e.timeout))
end
