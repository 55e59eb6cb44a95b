"""`rbee-hive`: one per node — model catalog, provisioning, preflight, spawns and watches workers.

``main`` is the CLI, ``server.serve(config)`` runs a hive, ``app`` holds its HTTP routes and
``service`` what they do; see docs/hive.md.
"""
