"""Hook specifications, the plugin registry and the built-in transports and stores.

Plugins depend on :mod:`pacsfetch` core models only; they never import the API or the
workers. Workers hand them a :class:`~pacsfetch.plugins.contracts.RetrieveContext`.
"""
