"""Processes apart from the server's: the worker that runs one training job, and training on this machine.

``python -m server.jobs.worker --job ID`` is what the server's job runner starts for each job;
``python -m server.jobs.train_local`` trains the same way from a folder of images, for ``tta train``.
"""
