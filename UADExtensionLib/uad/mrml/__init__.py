"""The Slicer side of UADExtension that needs no Qt: scene nodes, the detection logic and the backend process.

Everything here runs unchanged inside the Slicer application and under the ``slicer-core`` wheel, so the pytest
suite exercises it against a real ``vtkMRMLScene``. The scene is always passed in explicitly; nothing reads
``slicer.mrmlScene``. Submodules are imported on demand (``uad.mrml.process`` needs neither slicer nor numpy).
"""
