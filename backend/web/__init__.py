"""The HTTP side: Flask app factory, routes, the /predict wait-and-hand-over, OpenAPI."""
