"""The Kiln console: a live web page of the served models, their rollouts, monitoring and lineage,
served by the running ``kiln serve`` instance under ``/console/`` (see README: The Kiln console).

``server`` answers the page's requests inside the root app's replica (the API key's rules, the
static files, the JSON it polls, the rollout buttons); ``state`` gathers what the page shows from
the existing status functions (rollout status and history, the replicas' monitor reports, the
registry); ``metrics`` turns Prometheus snapshots into per-version time series. Everything the page
loads is packaged under ``static/`` (uPlot, vendored with its license and version): no CDN.
"""
