{
  "port": 8125,
  "mgmt_port": 8126,
  "flushInterval": 1000,
  "graphiteHost": "127.0.0.1",
  "graphitePort": 2003,
  "backends": ["./backends/graphite"],
  "graphite": {
    "legacyNamespace": true
  },
  "servers": [
    {"server": "./servers/udp", "address": "0.0.0.0", "port": 8125}
  ]
}
