"""Decoding inside a TensorFlow graph, as :func:`models.backbone.imaging.decode_and_resize` decodes in Python.

The exported SavedModel (``models/backbone/export.py``) takes encoded bytes, so TF Serving clients send
files, not pixels; a query must then be decoded exactly as the corpus was. JPEG is decoded with
the accurate integer DCT at the same reduced scale Pillow's draft mode picks (bit-identical pixels
on the project's photos), EXIF orientation is read from the header bytes and applied, alpha is
composited on white, and the squash resize is ``tf.image.resize(bilinear, antialias=True)``
rounded to integers, which differs from Pillow's fixed-point bilinear by at most one grey level
(``benchmarks/export_parity.py`` measures what that does to features). Its own module because it
is a twin of ``models/backbone/imaging.py`` and changes with it, not with the export layout.
"""

from __future__ import annotations

from models.backbone.imaging import DEFAULT_MAX_PIXELS

RESIZE = "tf.image.resize(bilinear, antialias=True), rounded to uint8 levels"
_EXIF_SCAN_BYTES = 1 << 16  # APP1 (EXIF) precedes the image data; IFD0 sits near its start
_JPEG_RATIOS = (1, 2, 4, 8)


def _header_bytes(data, n: int):
    """The first ``n`` bytes of a scalar string as int64, zero-padded (safe for any length)."""
    import tensorflow as tf

    head = tf.io.decode_raw(tf.strings.substr(data, 0, n), tf.uint8)
    head = tf.pad(head, [[0, n - tf.shape(head)[0]]])
    return tf.cast(tf.reshape(head, [n]), tf.int64)


def _jpeg_tiff_offset(data):
    """Offset of the TIFF header inside the first APP1 ``Exif`` segment of a JPEG; -1 when none.

    Walks the marker segments (a few dozen at most) until APP1 Exif, SOS or a non-marker.
    """
    import tensorflow as tf

    n = _EXIF_SCAN_BYTES
    b = _header_bytes(data, n + 16)

    def at(i):
        return tf.gather(b, tf.clip_by_value(i, 0, n + 15))

    exif_magic = tf.constant([0x45, 0x78, 0x69, 0x66, 0x00, 0x00], tf.int64)  # "Exif\0\0"

    def cond(pos, tiff, done):
        return tf.logical_and(tf.logical_not(done), pos < n)

    def body(pos, tiff, done):
        marker = at(pos + 1)
        standalone = tf.logical_or(
            tf.logical_or(tf.equal(marker, 0x01), tf.equal(marker, 0xD8)),
            tf.logical_and(marker >= 0xD0, marker <= 0xD7),
        )
        fill = tf.equal(marker, 0xFF)
        stop = tf.logical_or(tf.not_equal(at(pos), 0xFF),
                             tf.logical_or(tf.equal(marker, 0xDA), tf.equal(marker, 0xD9)))
        seglen = at(pos + 2) * 256 + at(pos + 3)
        is_exif = tf.logical_and(
            tf.equal(marker, 0xE1),
            tf.reduce_all(tf.equal(at(pos + 4 + tf.range(6, dtype=tf.int64)), exif_magic)),
        )
        found = tf.logical_and(tf.logical_not(stop), is_exif)
        step = tf.where(fill, tf.constant(1, tf.int64), tf.where(standalone, tf.constant(2, tf.int64), 2 + seglen))
        return pos + step, tf.where(found, pos + 10, tiff), tf.logical_or(stop, found)

    is_jpeg = tf.logical_and(tf.equal(b[0], 0xFF), tf.equal(b[1], 0xD8))
    _, tiff, _ = tf.while_loop(
        cond, body, (tf.constant(2, tf.int64), tf.constant(-1, tf.int64), tf.logical_not(is_jpeg)),
        maximum_iterations=512,
    )
    return tiff


def _png_tiff_offset(data):
    """Offset of the ``eXIf`` chunk's data (a TIFF header) in a PNG; -1 when none."""
    import tensorflow as tf

    parts = tf.strings.split(data, sep="eXIf", maxsplit=1)
    return tf.where(tf.size(parts) > 1, tf.cast(tf.strings.length(parts[0]), tf.int64) + 4, -1)


def _tiff_orientation(data, offset):
    """Tag 0x0112 of IFD0 of the TIFF structure at ``offset`` (either byte order); 1 when unreadable."""
    import tensorflow as tf

    n = _EXIF_SCAN_BYTES
    window = tf.io.decode_raw(tf.strings.substr(data, tf.maximum(offset, 0), n), tf.uint8)
    b = tf.cast(tf.reshape(tf.pad(window, [[0, n + 16 - tf.shape(window)[0]]]), [n + 16]), tf.int64)

    def at(i):
        return tf.gather(b, tf.clip_by_value(i, 0, n + 15))

    little = tf.reduce_all(tf.equal(b[:4], tf.constant([0x49, 0x49, 0x2A, 0x00], tf.int64)))  # "II*\0"
    big = tf.reduce_all(tf.equal(b[:4], tf.constant([0x4D, 0x4D, 0x00, 0x2A], tf.int64)))  # "MM\0*"

    def u16(i):
        return tf.where(little, at(i) + 256 * at(i + 1), 256 * at(i) + at(i + 1))

    def u32(i):
        return tf.where(little, u16(i) + 65536 * u16(i + 2), 65536 * u16(i) + u16(i + 2))

    ifd = u32(4)
    entries = ifd + 2 + 12 * tf.range(tf.minimum(u16(ifd), 256), dtype=tf.int64)
    hit = tf.where(tf.equal(u16(entries), 0x0112))[:, 0]
    value = tf.cond(tf.size(hit) > 0, lambda: u16(entries[hit[0]] + 8), lambda: tf.constant(1, tf.int64))
    valid = tf.logical_and(tf.logical_and(offset >= 0, tf.logical_or(little, big)),
                           tf.logical_and(value >= 1, value <= 8))
    return tf.cast(tf.where(valid, value, 1), tf.int32)


def exif_orientation(data):
    """EXIF orientation (1..8) of a JPEG (APP1) or PNG (eXIf chunk) in a scalar string; 1 otherwise.

    Every read is clipped into a fixed, zero-padded window, so a malformed file gives 1,
    never an error (the pipeline also ignores broken EXIF blocks).
    """
    import tensorflow as tf

    is_png = tf.equal(tf.strings.substr(data, 0, 8), b"\x89PNG\r\n\x1a\n")
    offset = tf.cond(is_png, lambda: _png_tiff_offset(data), lambda: _jpeg_tiff_offset(data))
    return _tiff_orientation(data, offset)


def apply_orientation(image, orientation):
    """Pillow's ``ImageOps.exif_transpose`` for an HWC tensor and an orientation 1..8."""
    import tensorflow as tf

    def transpose(x):
        return tf.transpose(x, [1, 0, 2])

    branches = [
        lambda: image,                                   # 1 normal
        lambda: tf.reverse(image, [1]),                  # 2 mirror (FLIP_LEFT_RIGHT)
        lambda: tf.reverse(image, [0, 1]),               # 3 ROTATE_180
        lambda: tf.reverse(image, [0]),                  # 4 FLIP_TOP_BOTTOM
        lambda: transpose(image),                        # 5 TRANSPOSE
        lambda: tf.image.rot90(image, k=3),              # 6 ROTATE_270 (90° clockwise)
        lambda: tf.reverse(transpose(image), [0, 1]),    # 7 TRANSVERSE
        lambda: tf.image.rot90(image, k=1),              # 8 ROTATE_90 (90° counter-clockwise)
    ]
    return tf.switch_case(tf.clip_by_value(orientation - 1, 0, 7), branches)


def _header_size(data):
    """(height, width) from the header for PNG, GIF and BMP; (-1, -1) for other formats."""
    import tensorflow as tf

    b = _header_bytes(data, 32)

    def be32(i):
        return ((b[i] * 256 + b[i + 1]) * 256 + b[i + 2]) * 256 + b[i + 3]

    def le16(i):
        return b[i] + 256 * b[i + 1]

    def le32s(i):
        v = le16(i) + 65536 * le16(i + 2)
        return tf.where(v >= 2**31, v - 2**32, v)  # BMP height is negative for top-down rows

    png = tf.reduce_all(tf.equal(b[:8], tf.constant([0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A], tf.int64)))
    gif = tf.reduce_all(tf.equal(b[:3], tf.constant([0x47, 0x49, 0x46], tf.int64)))
    bmp = tf.reduce_all(tf.equal(b[:2], tf.constant([0x42, 0x4D], tf.int64)))
    h = tf.where(png, be32(20), tf.where(gif, le16(8), tf.where(bmp, tf.abs(le32s(22)), -1)))
    w = tf.where(png, be32(16), tf.where(gif, le16(6), tf.where(bmp, tf.abs(le32s(18)), -1)))
    return h, w


def _check_pixels(h, w, max_pixels: int, where: str):
    import tensorflow as tf

    return tf.debugging.assert_less_equal(
        h * w, tf.constant(max_pixels, tf.int64),
        message=f"ImageTooLargeError: the {where} claims more than {max_pixels} pixels",
    )


def _to_rgb(image):
    """Any channel count (1 grey, 2 grey+alpha, 3 RGB, 4 RGBA) → float32 RGB; alpha onto white."""
    import tensorflow as tf

    x = tf.cast(image, tf.float32)

    def over_white(rgb, alpha):
        a = alpha / 255.0
        return tf.round(rgb * a + 255.0 * (1.0 - a))

    c = tf.shape(x)[-1]
    return tf.switch_case(
        tf.clip_by_value(c - 1, 0, 3),
        [
            lambda: tf.tile(x[..., :1], [1, 1, 3]),
            lambda: over_white(tf.tile(x[..., :1], [1, 1, 3]), x[..., 1:2]),
            lambda: x[..., :3],
            lambda: over_white(x[..., :3], x[..., 3:4]),
        ],
    )


def decode_image(data, size: int, max_pixels: int = DEFAULT_MAX_PIXELS, reduced_decode: bool = True,
                 antialias: bool = True):
    """One encoded image (scalar tf.string) → float32 [size, size, 3] with integer values in [0, 255].

    The graph twin of :func:`models.backbone.imaging.decode_and_resize`. The pixel limit is
    checked on the header before decoding for JPEG, PNG, GIF and BMP; any decoder
    error surfaces as ``InvalidArgumentError`` for the request. ``antialias=False`` exists only so
    the parity benchmark can show what it buys. Wrap it in ``tf.function(autograph=False)``: the
    control flow is explicit, and autograph conversion only slows tracing down.
    """
    import tensorflow as tf

    def jpeg():
        shape = tf.cast(tf.io.extract_jpeg_shape(data), tf.int64)
        h, w = shape[0], shape[1]
        with tf.control_dependencies([_check_pixels(h, w, max_pixels, "JPEG header")]):
            if reduced_decode:
                # Pillow's draft(): the largest of 8, 4, 2 not above min(w // size, h // size).
                m = tf.minimum(w // size, h // size)
                branch = tf.where(m >= 8, 3, tf.where(m >= 4, 2, tf.where(m >= 2, 1, 0)))
            else:
                branch = tf.constant(0, tf.int64)
            decoded = tf.switch_case(
                tf.cast(branch, tf.int32),
                [
                    (lambda r=r: tf.io.decode_jpeg(data, channels=3, ratio=r, dct_method="INTEGER_ACCURATE"))
                    for r in _JPEG_RATIOS
                ],
            )
        return tf.cast(decoded, tf.float32)

    def other():
        h, w = _header_size(data)
        with tf.control_dependencies([_check_pixels(h, w, max_pixels, "image header")]):
            decoded = tf.io.decode_image(data, channels=0, expand_animations=False, dtype=tf.uint8)
        shape = tf.cast(tf.shape(decoded), tf.int64)
        with tf.control_dependencies([_check_pixels(shape[0], shape[1], max_pixels, "decoded image")]):
            return _to_rgb(decoded)

    tf.debugging.assert_positive(tf.strings.length(data), message="ImageDecodeError: empty file")
    image = apply_orientation(tf.cond(tf.io.is_jpeg(data), jpeg, other), exif_orientation(data))
    image.set_shape([None, None, 3])
    hw = tf.shape(image)[:2]
    resized = tf.cond(
        tf.reduce_all(tf.equal(hw, [size, size])),
        lambda: image,
        lambda: tf.round(tf.image.resize(image, [size, size], method="bilinear", antialias=antialias)),
    )
    return tf.reshape(tf.clip_by_value(resized, 0.0, 255.0), [size, size, 3])


def decode_batch(images, size: int, max_pixels: int = DEFAULT_MAX_PIXELS, reduced_decode: bool = True,
                 antialias: bool = True):
    """tf.string [n] → float32 [n, size, size, 3]."""
    import tensorflow as tf

    return tf.map_fn(
        lambda d: decode_image(d, size, max_pixels, reduced_decode, antialias),
        images,
        fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32),
        parallel_iterations=8,
    )


# -- the exported module --------------------------------------------------------------------------
