-- wrk script: POST the file named by BENCH_BODY with the Content-Type in BENCH_CONTENT_TYPE
-- (or, with BENCH_METHOD=GET, a plain GET), and print one JSON line of results (latencies in
-- microseconds) when the run is done.
wrk.method = os.getenv("BENCH_METHOD") or "POST"
if wrk.method ~= "GET" then
  local f = assert(io.open(os.getenv("BENCH_BODY"), "rb"))
  wrk.body = f:read("*a")
  f:close()
  wrk.headers["Content-Type"] = os.getenv("BENCH_CONTENT_TYPE")
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, ' ..
    '"max_us": %d, "non_2xx": %d, "socket_errors": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, e.status, e.connect + e.read + e.write + e.timeout))
end
