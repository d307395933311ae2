"""Image access for the backend lives in `pipeline.image_access` (shared with pre-annotation); re-exported here."""
from pipeline.image_access import ImageAccess, ImageAccessError, read_image_bytes

__all__ = ["ImageAccess", "ImageAccessError", "read_image_bytes"]
