"""TTAServe: a CLIP test-time adaptation inference server."""
