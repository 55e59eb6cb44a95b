"""Job operations besides ``infer``: ``download`` (a model onto a node's hive).

A download is a job like an inference, so that the keeper shows its progress bar through
the same stream and Ctrl-C cancels it the same way.
"""

from __future__ import annotations

import re
from typing import Any

import httpx

from ..errors import InvalidRequestError, JobError, error_for_code
from ..narration import narrate
from ..narration.events import Done, Error
from ..requests import NODE_NAME_PATTERN
from .hives import HiveManager
from .jobs import Job
from .nodes import LOCALHOST, NodeRegistry

ACTOR = "queen-rbee"


def validate_download(body: dict[str, Any]) -> dict[str, Any]:
    """Check a ``download`` request (``model`` required, ``node`` a node name or absent:
    localhost)."""
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise InvalidRequestError(
            "invalid download request: model",
            details=[{"field": "model", "constraint": "non-empty string", "message": "model is required"}],
        )
    node = body.get("node")
    if node is not None and (not isinstance(node, str) or not re.fullmatch(NODE_NAME_PATTERN, node)):
        message = "node must be a node name (localhost, or one added with setup add-node)"
        raise InvalidRequestError(f"invalid download request: {message}",
                                  details=[{"field": "node", "constraint": f"pattern:{NODE_NAME_PATTERN}",
                                            "message": message}])
    return {**body, "node": node or LOCALHOST}


class DownloadJob:
    """Runs one ``download`` request: the hive provisions, we relay its progress SSE."""

    def __init__(self, nodes: NodeRegistry, hives: HiveManager, http: httpx.AsyncClient) -> None:
        self.nodes, self.hives, self.http = nodes, hives, http

    async def run(self, job: Job) -> None:
        """The job's body."""
        model = job.request["model"]
        node = self.nodes.get(job.request["node"])
        narrate(ACTOR, "route_job", f"Routing download of {model} to node {node.name}", target=node.name, node=node.name)
        hive = self.hives.get(node.name) or await self.hives.ensure(node, job.sink)
        started = await hive.request("POST", "/v1/models/download", json={"model": model})
        download_id = started["download_id"]
        async with hive.open_sse(f"/v1/models/download/{download_id}/progress") as events:
            async for event in events:
                if isinstance(event, Done):
                    narrate(ACTOR, "download_complete", f"{model} is on node {node.name}", target=model, node=node.name)
                    return
                if isinstance(event, Error):
                    raise error_for_code(event.code, event.message)
                job.sink(event)
        raise JobError(f"the download progress stream of {model} on {node.name} stopped without [DONE]")
