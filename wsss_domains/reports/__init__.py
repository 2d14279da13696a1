"""Self-contained HTML reports: the building blocks the run, evaluation and matrix pages share.

``html``: page skeleton, escaped tables, IoU bars, confusion matrix, embedded PNGs, the worst-first
gallery and its filter, the command and environment. ``pictures``: the overlay pictures of a
split's images for the gallery. ``environment``: what a page records about the command and the
machine. ``browser``: headless Chromium, to check a page or record its screenshot.
"""
