"""TensorBoard's event records checksummed in C (vaelab.event_files): the same checksums as TensorBoard's own, so
TensorBoard reads vaelab's event files, and vaelab's pictures and vaelab-resume's reading switch it on."""

import subprocess
import sys
import types

import pytest
import torch
from tensorboard.compat.tensorflow_stub import pywrap_tensorflow
from tensorboard.summary.writer import record_writer

from vaelab import event_files
from vaelab.errors import UserError
from vaelab.pictures import base
from vaelab.runs import resume


def tensorboards_masked_crc32c(data: bytes) -> int:
    """TensorBoard's masked_crc32c as its source reads, on its own CRC-32C (a Python loop, never replaced)."""
    u32, x = pywrap_tensorflow.u32, pywrap_tensorflow.u32(pywrap_tensorflow.crc32c(data))
    return u32(((x >> 15) | u32(x << 17)) + 0xA282EAD8)


def test_the_checksum_is_tensorboards():
    assert pywrap_tensorflow.crc32c(b"123456789") == 0xE3069283  # the reference is CRC-32C (its published check value)
    generator = torch.Generator().manual_seed(0)
    for size in (0, 1, 3, 8, 9, 255, 4096, 65_537, 200_003):
        data = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=generator).numpy().tobytes()
        assert event_files.masked_crc32c(data) == tensorboards_masked_crc32c(data), size
        assert event_files.masked_crc32c(bytearray(data)) == tensorboards_masked_crc32c(data)
    assert event_files.masked_crc32c(b"\xff" * 64) == tensorboards_masked_crc32c(b"\xff" * 64)  # a top bit in each


def test_tensorboard_writes_and_reads_with_it_and_its_own_reader_accepts_the_files(tmp_path):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from torch.utils.tensorboard import SummaryWriter

    assert event_files.use_fast_checksums()  # google-crc32c's C build: on every platform vaelab's CI runs on
    assert record_writer.masked_crc32c is event_files.masked_crc32c is pywrap_tensorflow.masked_crc32c
    noise = torch.rand(3, 256, 256, generator=torch.Generator().manual_seed(1))  # about 200 KB as a PNG
    with SummaryWriter(tmp_path) as writer:
        writer.add_image("noise", noise, 7)
        writer.add_scalar("x", 1.5, 7)
    (file,) = tmp_path.glob("events.out.tfevents.*")
    read = lambda loader: [v.tag for event in loader for v in event.summary.value]
    assert read(EventFileLoader(str(file)).Load()) == ["noise", "x"]
    # TensorBoard's own checksums in a process that never imported vaelab (its loader stops at the first record whose
    # checksum fails: the whole list means every record's checksum is TensorBoard's)
    script = (
        "import sys; from tensorboard.backend.event_processing.event_file_loader import EventFileLoader; "
        "print([v.tag for e in EventFileLoader(sys.argv[1]).Load() for v in e.summary.value]); "
        "assert 'vaelab' not in sys.modules"
    )
    fresh = subprocess.run([sys.executable, "-c", script, str(file)], capture_output=True, text=True, timeout=120)
    assert fresh.returncode == 0 and fresh.stdout.strip() == "['noise', 'x']", fresh.stderr
    # ... and with vaelab's checksums the loader stops at a picture record with one bit flipped
    raw = bytearray(file.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    file.write_bytes(bytes(raw))
    assert read(EventFileLoader(str(file)).Load()) == []


def test_the_pictures_and_resumes_reading_switch_it_on(tmp_path, monkeypatch):
    calls = []
    for module in (base, resume):
        monkeypatch.setattr(module, "use_fast_checksums", lambda: calls.append(1))
    no_data = types.SimpleNamespace(datamodule=None)
    with pytest.raises(UserError):  # setup switches it on first, before it looks at the data
        base.PictureCallback().setup(no_data, None, "fit")
    assert calls == [1]
    (tmp_path / "events.out.tfevents.1").write_bytes(b"")
    assert resume.first_step_logged_after(tmp_path, resume.ResumePoint(path=tmp_path / "c", step=4, saved_at=0.0)) is None
    assert calls == [1, 1]


def test_without_a_c_build_tensorboards_own_is_kept(monkeypatch):
    monkeypatch.setattr(event_files.google_crc32c, "implementation", "python")
    switch = event_files.use_fast_checksums.__wrapped__  # the uncached function
    replaced = record_writer.masked_crc32c
    assert switch() is False and record_writer.masked_crc32c is replaced
