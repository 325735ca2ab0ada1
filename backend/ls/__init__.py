"""Talking to Label Studio: the REST client and image fetching."""
