"""The HTTP server in front of the app: uvicorn with the service's own protocol.

- :mod:`.protocol`: the edge protocol, uvicorn's httptools protocol with the caps and deadlines
  uvicorn lacks, the service's envelope on its own answers;
- :mod:`.heads`: what the protocol refuses in a request's head before the app sees it;
- :mod:`.quick`: answers the app gives at once, written without an ASGI task;
- :mod:`.server`: uvicorn's server, asleep while idle, in one process or several, and what the
  protocol needs below HTTP (connection caps, unsent bytes, the send deadline, framing).
"""
