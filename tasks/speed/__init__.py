"""Speed benchmarks (docs/protocol.md sections 4 and 6): pytest-benchmark over providers x cases.

- cases.py: SpeedParams (params.yaml `speed`) and the grid of cases (device, n, batch, dtype,
  direction) one pytest process measures;
- providers.py: every implementation as one data entry (devices, directions, dtypes, factory,
  flops and bytes models);
- checks.py: the float64 oracles and tolerances every provider passes before it is timed;
- conftest.py / test_speed.py: the pytest-benchmark side (machine info, recorded skips, timing).

`suite speed` runs this folder in a subprocess and turns its JSON into reports/speed/<device>.json.
"""
