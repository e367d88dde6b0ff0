"""The HTTP room: the server the clients talk to and the client that talks to the backends.

``server`` + ``connection`` accept and parse client requests (httptools), ``messages`` shapes
requests and responses, ``client`` keeps the pooled connections to the backends, ``upstream``
sends one attempt. Knows nothing about policies or KV.
"""
