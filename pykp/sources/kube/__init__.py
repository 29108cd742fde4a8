"""The Kubernetes source: Services and EndpointSlices from the API server.

`translate` is pure (API JSON to a `Catalog`); `watch` keeps a cache equal to the API
with list and watch; `source` puts the two together behind the agent's source protocol.
The `kubernetes` client is imported only by `client` and `source`, so translation works
without it.
"""
