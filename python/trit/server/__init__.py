"""`trit serve`: an OpenAI-compatible HTTP server for one Generator.

    app = create_app(generator, model_name="bitnet-2b")
    uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints: POST /v1/chat/completions, POST /v1/completions (both streamed as
server-sent events with `"stream": true`), GET /v1/models, GET /health.

One Generator holds one model and one KV cache, so requests are served one at
a time (queued, not batched): a FIFO queue admits at most `max_concurrency`
requests, running and waiting together; one more gets a 503. Generation runs in
a worker thread (the engine releases the GIL), so the event loop stays free for
/health and for new requests, and a client that goes away is noticed at once:
its generation stops at the next token.

Errors have OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`.
Request fields that trit does not implement (tools, response_format, n > 1, ...)
are refused with a 400 naming the field, never silently ignored. A bad value
of any kind is a 400 naming its field; a 500 says only "internal error" (the
details go to the server's log).

A request is admitted to the queue (or refused with a 503) before its prompt
is tokenized, and refused before that if its size alone shows it cannot fit
the context; bodies, JSON nesting, max_tokens and stop strings are bounded,
and a client that stalls while sending a request is disconnected
(`connections`).

The package in four parts: `protocol` (OpenAI's request checks and response
bodies, pure functions), `scheduler` (the queue and the worker thread),
`app` (the HTTP routes and streams) and `connections` (uvicorn's settings).
"""

from trit.server.app import create_app
from trit.server.protocol import APIError, GenerationRequest, ParsedRequest, PromptContext
from trit.server.scheduler import Scheduler

__all__ = [
    "APIError",
    "GenerationRequest",
    "ParsedRequest",
    "PromptContext",
    "Scheduler",
    "create_app",
]
