"""TensorBoard's event files, written and read with their records' checksums computed in C.

Each record of an event file carries a masked CRC-32C of its bytes. TensorBoard without TensorFlow (vaelab's case)
computes it in a Python loop over every byte (tensorboard.compat.tensorflow_stub.pywrap_tensorflow.crc32c): 23.5 ms
for a 200 KB picture. Its writer thread does that holding the interpreter lock, taken in turns of 5 ms from the
training's thread: the default run's pictures (about 355 KB an epoch) made the traversals' epoch-end work 25-40 ms
instead of 14-16 ms (batch 128, 6 epochs, one torch thread). google-crc32c computes the same number in C (40 us for
200 KB); reading a run's event files back (vaelab-resume, TensorBoard's loader) checks every record the same way.
"""

from __future__ import annotations

import functools

import google_crc32c


def masked_crc32c(data: bytes) -> int:
    """The TFRecord checksum of `data`: its CRC-32C rotated right by 15 bits plus 0xA282EAD8, modulo 2**32, as
    TensorBoard's own `masked_crc32c` computes it (tests/test_event_files.py compares the two)."""
    crc = google_crc32c.value(bytes(data))
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


@functools.cache  # once a process
def use_fast_checksums() -> bool:
    """Point TensorBoard's event writer and reader at `masked_crc32c`; False (TensorBoard's own kept) where
    google-crc32c has no C build for this platform, whose Python fallback is no faster."""
    if google_crc32c.implementation != "c":
        return False
    from tensorboard.compat.tensorflow_stub import pywrap_tensorflow
    from tensorboard.summary.writer import record_writer

    record_writer.masked_crc32c = pywrap_tensorflow.masked_crc32c = masked_crc32c
    return True
