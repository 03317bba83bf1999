"""Quality metrics: metric specs (`specs`, no torch), feature extractors (`extractors`) and the engine (`quality`).

Importing this package imports nothing heavy: reports read `specs` without torch.
"""
