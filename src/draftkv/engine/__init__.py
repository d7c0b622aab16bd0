"""The engine under the flow: attention capture and scoring, the cache layers, decode-time eviction and
the decode loop with its steps. It knows nothing of methods' names or of requests."""
