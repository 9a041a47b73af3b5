"""Grafana dashboards as code: built with grafana-foundation-sdk from the alarm profile, queried in InfluxQL.

`dashboards.build` renders the JSON (committed under `dashboards/generated/` for the example profile);
`dashboards.push` uploads it to an existing Grafana. See docs/dashboards.md.
"""
