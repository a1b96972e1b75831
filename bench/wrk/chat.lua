-- wrk script of the bench: POST chat completions, one JSON summary line at the end.
-- Arguments (after `--`): model; "unique" (a new prompt per request, so no cache can answer)
-- or "same" (one identical body, for the cache-hit series); a nonce unique to this run; the
-- bearer key to send (LiteLLM's master key; the router and the fakes ignore it).

local threads = {}

function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end

function init(args)
  model = args[1] or "dummy"
  unique = (args[2] or "unique") ~= "same"
  nonce = args[3] or tostring(os.time())
  counter = 0
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["Authorization"] = "Bearer " .. (args[4] or "bench")
  same_body = string.format(
    '{"model":"%s","messages":[{"role":"user","content":"bench cache probe"}],"temperature":0,"max_tokens":16}',
    model)
end

function request()
  if not unique then
    return wrk.format(nil, nil, nil, same_body)
  end
  counter = counter + 1
  local body = string.format(
    '{"model":"%s","messages":[{"role":"user","content":"bench %s-%d-%d"}],"max_tokens":16}',
    model, nonce, id, counter)
  return wrk.format(nil, nil, nil, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"status_errors":%d,"connect_errors":%d,' ..
    '"read_errors":%d,"write_errors":%d,"timeouts":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,' ..
    '"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50.0), latency:percentile(90.0), latency:percentile(99.0),
    latency.max, latency.mean))
end
