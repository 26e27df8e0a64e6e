"""Qt-free glue between the QGSegmentation Slicer module and the backend.

Everything here is importable without Qt, without the Slicer application and without torch:
scene I/O takes the MRML scene and logics as arguments (`scene_io`), job folders and specs
(`jobs`), the worker child-process runner (`runner`), the review model (`review`), the panel
state machine (`state`), dependency checks (`environment`) and a tiny `Signal` class.
Only `scene_io` needs MRML classes (from Slicer itself or the `slicer-core` wheel), and it
imports them lazily so the rest of this package works in any Python.
"""
