"""The web console: one static page and a small aiohttp gateway that calls the three services over gRPC.

It holds no model logic: requests are converted to the services' protobuf messages, replies to
JSON (images as data URLs), and gRPC errors to HTTP statuses with the service's message.
"""
