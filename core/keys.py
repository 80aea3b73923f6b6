"""Named keys plugins use to pass contracts to each other: response metadata and status sections.

A plugin that sets or reads one of these imports the name from here instead of
spelling the string, so a reader can find every party to a contract with one
search, and a typo is an ImportError rather than a silently ignored key.

Response metadata (``ServiceResponse.metadata``) keys start with ``kservice.``;
status sections (``ServiceStatus.extra``) are plain words. Values are part of
the public API: a third-party plugin may set and read them with the meaning
given here.
"""

from __future__ import annotations

from ._messages import CONNECTION_CLOSED, ERROR_STATE, MAY_HAVE_RUN

__all__ = [
    "ADDRESS_IDEMPOTENT",
    "AT_CAPACITY",
    "CACHE",
    "CIRCUIT_OPEN",
    "CONNECTION_CLOSED",
    "DEGRADED",
    "ERROR_STATE",
    "FALLBACK",
    "HOST_REPLACING",
    "MAY_HAVE_RUN",
    "REPLICA_DOWN",
    "REPLICA_REFUSED",
    "RETRYABLE",
    "STATUS_BATCHING",
    "STATUS_BREAKER",
    "STATUS_HEALTH",
    "STATUS_LOAD",
    "STATUS_PID",
    "STATUS_RAY",
    "STATUS_RECENT_ERRORS",
    "STATUS_REPLICAS",
    "STATUS_WAITING_IN_CALLER",
    "STREAM_ITEMS",
]

# ------------------------------------------------------------------ response metadata

# MAY_HAVE_RUN ("kservice.may_have_run"), defined beside ServiceResponse: whether a request that failed
# in the runtime may have reached the service (False: it provably never did, so any retry may re-send it).
# CONNECTION_CLOSED ("kservice.connection_closed"), defined beside ServiceResponse too: True on the refusal
# of a request a transport could not send because its connection is closed for good (nothing was sent);
# the manager delivers it on the name's new route, if any, and a circuit breaker does not count it.
# ERROR_STATE ("kservice.error_state"), defined beside ServiceResponse too: on a method's error that crossed a
# process, its exception's arguments and attributes, pickled; the caller's error gets them back.

#: ``False``: re-sending cannot help or is unsafe, whatever the error (an open breaker, a replica set with
#: no live replica). Retry policies give up at once; absent or True: the policy decides as usual.
RETRYABLE = "kservice.retryable"
#: True on a failure that took one replica out of rotation while others still serve: the service is not
#: down, so a circuit breaker does not count it against the service.
REPLICA_DOWN = "kservice.replica_down"
#: True when a replica refused a call without running it (it is stopping or failed to build): the caller
#: sends the call to another replica (internal to the ``ray`` transport, named here so nothing else reuses it).
REPLICA_REFUSED = "kservice.replica_refused"
#: True on a ServiceOverloadedError the service's task gave at its admission limit (its request queue
#: stayed full for ``service.local.queue_timeout``): the service is up and serving at capacity, and the
#: call never ran. A circuit breaker does not count it (neither a failure nor a success).
AT_CAPACITY = "kservice.at_capacity"
#: True on the ServiceUnavailableError of a call made while its service's host was being replaced (health
#: recovery respawning a ``process`` host): nothing was sent, and a retry waits for the new host. A circuit
#: breaker does not count it (neither a failure nor a success): the service is already being brought back.
HOST_REPLACING = "kservice.host_replacing"
#: True when the breaker refused the call because its circuit is open (the call was never sent).
CIRCUIT_OPEN = "kservice.circuit_open"
#: True on a response a fallback produced instead of the service's own answer.
DEGRADED = "kservice.degraded"
#: Why a fallback answered (one of the fallback plugin's reasons: ``error``, ``timeout``, ``unavailable``...).
FALLBACK = "kservice.fallback"
#: ``"hit"`` on a response the result cache answered without calling the service.
CACHE = "kservice.cache"
#: On the end of a stream (its response as client after-hooks and observers see it), how many items the
#: caller got or was given. Present on every stream's end and on no call's response, so a client
#: middleware tells a stream's end from a call's answer.
STREAM_ITEMS = "kservice.stream.items"

# ------------------------------------------------------------------ status sections (ServiceStatus.extra)

#: the breaker plugin's state of the service's circuit, in this process
STATUS_BREAKER = "breaker"
#: the health plugin's view: last check, failures, recoveries
STATUS_HEALTH = "health"
#: the metrics plugin's load: in-flight and queued calls, the recent window's rates and latencies
STATUS_LOAD = "load"
#: the calllog plugin's most recent failed calls
STATUS_RECENT_ERRORS = "recent_errors"
#: the pid of the process hosting the service (``process`` tasks)
STATUS_PID = "pid"
#: the ``ray`` task's deployment: namespace, deployment id, lifetime, balancer, replica count
STATUS_RAY = "ray"
#: one entry per replica (``ray`` tasks)
STATUS_REPLICAS = "replicas"
#: calls waiting in this process for a free replica slot (``ray`` tasks)
STATUS_WAITING_IN_CALLER = "waiting_in_caller"
#: the ``ray`` connection's batching counters
STATUS_BATCHING = "batching"

# ------------------------------------------------------------------ address info (ServiceAddress.info)

#: the service's methods declared safe to run more than once (``@idempotent``, ``@service(idempotent_methods=)``,
#: its ``idempotent:`` config), as a list of names, for callers that resolve the service without its class
#: (a ``kservice serve`` host found through the registry): their retry policy may re-send those after a fault
ADDRESS_IDEMPOTENT = "idempotent"
