-- wrk script: POST one single-row INSERT as JSON to the URL's path
-- (/v1/actors/{key}/sql on shardlite and on the no-op app alike).
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local n = 0
request = function()
  n = n + 1
  return wrk.format(nil, nil, nil,
    '{"sql":"INSERT INTO t(tenant, v) VALUES (?, ?)","params":[1,' .. n .. ']}')
end
