"""Builders of what the project ships, not benchmarks: the demo models (``train_demo_model``), the
label-free confidence model and a model card's own (``calibrate``), and the README's example images (``examples``)."""
