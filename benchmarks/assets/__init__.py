"""Builders of what the project ships, not benchmarks: the demo models (``train_demo_model``), the
temperatures in their model cards (``calibrate``), and the README's example images (``examples``)."""
