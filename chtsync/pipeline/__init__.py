"""The model pipeline: models.yaml -> views, materialized views and tables, kept fresh.

models.py reads and checks the file, kinds.py says per kind how a model is created, refreshed
and rebuilt, graph.py resolves dependencies and order, apply.py makes
the schema match (plan / apply), refresh.py keeps models up to date (refresh_once / loop),
shadow.py rebuilds one beside the old version and swaps them.
"""

from chtsync.pipeline.apply import Plan, Step, apply, plan
from chtsync.pipeline.graph import Model, Pipeline, load
from chtsync.pipeline.refresh import RefreshResult, initial_sync, refresh_loop, refresh_once
from chtsync.pipeline.shadow import rebuild

__all__ = [
    "Model", "Pipeline", "Plan", "RefreshResult", "Step", "apply", "initial_sync", "load", "plan", "rebuild",
    "refresh_loop", "refresh_once",
]
