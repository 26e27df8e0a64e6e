"""Data layer: dataset descriptions, geometry-exact I/O, validation, preprocessing, caching,
samplers, and the synthetic phantom used by the demo and the tests.

Array convention everywhere in the package: numpy order (z, y, x) for 3D volumes, (y, x) for
2D slices, channel first when there is a channel axis. `Geometry` keeps SimpleITK's (x, y, z)
order for spacing/origin/size, exactly as read from the file.
"""
