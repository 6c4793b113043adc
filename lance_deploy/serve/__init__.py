"""Serving Lance: an OpenAI-style HTTP API with a job queue, a web UI, and scale-out on Ray Serve.

A front end beside `cli/`: it validates requests with the pipeline's own rules and runs them through
the same stage functions. Needs the `serve` extra (and `ray` for scale-out).
"""
