"""``bamcountd serve``: the watch-folder daemon (see README.md, "Service mode").

Modules: ``config`` (flags, environment, TOML), ``watch`` (finding BAMs), ``ledger`` (SQLite
state), ``results`` (result files), ``daemon`` (the event loop), ``notify`` (systemd),
``metrics`` (Prometheus, /healthz).  Nothing in the counting core imports this package.
"""
