"""Image input and result export."""

__all__ = ["MAX_PIXELS"]

#: default limit on an image's pixel count (Pillow's own decompression-bomb limit, about 179 megapixels); defined
#: here, where importing it loads nothing (the command line's option default), and re-exported by
#: :mod:`attnseg.io.images`
MAX_PIXELS = 2 * 89_478_485
