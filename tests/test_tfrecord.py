"""pipelines.tfrecord against tf.data's TFRecordDataset (the reference reader)."""

from __future__ import annotations

import io

import pytest
import tensorflow as tf

from pipelines import tfrecord


@pytest.mark.parametrize("records", [[b""], [b"a"], [b"x" * 100_000, b"", bytes(range(256)) * 3]])
def test_written_records_read_back_by_tf(tmp_path, records):
    path = tmp_path / "r.tfrecord"
    buf = io.BytesIO()
    sizes = [tfrecord.write_record(buf, r) for r in records]
    path.write_bytes(buf.getvalue())
    assert [r.numpy() for r in tf.data.TFRecordDataset(str(path))] == records
    assert sizes == [len(r) + 16 for r in records]


def test_same_bytes_as_tf_writer(tmp_path):
    path = str(tmp_path / "tf.tfrecord")
    with tf.io.TFRecordWriter(path) as w:
        w.write(b"hello")
        w.write(b"world" * 7)
    with open(path, "rb") as f:
        assert f.read() == tfrecord.frame(b"hello") + tfrecord.frame(b"world" * 7)


def test_corrupted_checksum_is_caught_by_tf(tmp_path):
    data = bytearray(tfrecord.frame(b"payload"))
    data[-1] ^= 0xFF
    path = tmp_path / "bad.tfrecord"
    path.write_bytes(bytes(data))
    with pytest.raises(tf.errors.DataLossError):
        list(tf.data.TFRecordDataset(str(path)))
