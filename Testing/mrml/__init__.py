"""Tests of the Qt-free Slicer layer (uad.mrml) against a real vtkMRMLScene from slicer-core."""
