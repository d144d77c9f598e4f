"""The contracts every layer shares, torch-free and small: the front end (container/), the worker
(handlers/) and the engines (engines/) import these and nothing of each other's internals.

    protocol  frames between the front end and a worker process
    errors    the one table from exceptions to HTTP status and error type; the one error body
    names     names both sides must spell alike (entry points, request properties)
    engine    the engine contract the handler and worker use (batch API, capabilities, TP mode)
"""
