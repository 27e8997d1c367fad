"""The broker's pure core: the descriptor model and schema, the lookup rules, the index as state
fed with what the edges read, resolution, Spawn options, policy decisions, the error vocabulary
and the bus names. Imports nothing of the project outside itself, and no I/O modules (``os``,
``asyncio``, ``socket``, ``subprocess``, ``dbus_fast``): docs/architecture.md."""
