"""Narration: what a component tells the user about what it is doing (sans-I/O codec).

The public names are re-exported here; ``sse`` and ``jsonlines`` are the two wire forms
(``rbee.narration.sse.encode`` ...), ``wire`` their shared JSON mapping.
"""

from . import jsonlines as jsonlines
from . import sse as sse
from . import wire as wire
from .events import DONE as DONE
from .events import EVENT_TYPES as EVENT_TYPES
from .events import LEVELS as LEVELS
from .events import Done as Done
from .events import End as End
from .events import Error as Error
from .events import Event as Event
from .events import Loading as Loading
from .events import Metrics as Metrics
from .events import NarrationEvent as NarrationEvent
from .events import Prefill as Prefill
from .events import Ready as Ready
from .events import Started as Started
from .events import Token as Token
from .events import UnknownEvent as UnknownEvent
from .events import WorkerChange as WorkerChange
from .narrate import Sink as Sink
from .narrate import current_correlation_id as current_correlation_id
from .narrate import current_job_id as current_job_id
from .narrate import emit as emit
from .narrate import get_process_sink as get_process_sink
from .narrate import narrate as narrate
from .narrate import narration_context as narration_context
from .narrate import outside_jobs as outside_jobs
from .narrate import set_process_sink as set_process_sink
from .narrate import stdout_sink as stdout_sink
from .redact import REDACTED as REDACTED
from .redact import redact_event as redact_event
from .redact import redact_text as redact_text
from .render import RENDER_MODES as RENDER_MODES
from .render import NarrationRenderer as NarrationRenderer
