"""The embeddable Trio job client: drive a queen from any Trio program.

Example (a plain Trio program)::

    import trio
    from rbee.client import open_job_stream
    from rbee.narration import Token

    async def main():
        request = {"operation": "infer", "node": "localhost", "model": "gemma3-270m",
                   "prompt": "write a short story", "max_tokens": 20}
        with trio.fail_after(300):
            async with open_job_stream("http://127.0.0.1:8080", request) as job:
                async for event in job:
                    if isinstance(event, Token):
                        print(event.t, end="", flush=True)

    trio.run(main)
"""

from .jobs import JobStream as JobStream
from .jobs import JobSubmission as JobSubmission
from ..errors import QueenUnreachableError as QueenUnreachableError
from .jobs import cancel_job as cancel_job
from .jobs import error_from_response as error_from_response
from .jobs import iter_sse_events as iter_sse_events
from .jobs import open_http_client as open_http_client
from .jobs import open_job_stream as open_job_stream
from .jobs import submit_job as submit_job
