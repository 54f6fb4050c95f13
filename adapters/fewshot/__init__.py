"""Few-shot adapters: trained once on a user's labelled images, kept in the registry, applied per request.

``artifact`` is the file format and how each part acts on the frozen model's features; ``train`` fits an
adapter (ARF's anchors included); ``merging`` combines several (ConDU/EMR, TIES, task arithmetic);
routing picks adapters per image from their prototypes (``artifact.route_scores``).
"""
