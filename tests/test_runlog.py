"""Run metrics land in CSV, a TensorBoard event file and a PNG."""

import csv
import struct

from tensorboardX.proto import event_pb2

from experiments.runlog import RunLog


def read_events(path):
    """Scalars from a TFRecord-framed event file (length, crc, payload, crc)."""
    out, data = [], open(path, "rb").read()
    while data:
        (length,) = struct.unpack("<Q", data[:8])
        event = event_pb2.Event.FromString(data[12:12 + length])
        data = data[12 + length + 4:]
        out += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
    return out


def test_runlog_writes_csv_events_and_png(tmp_path):
    log = RunLog(str(tmp_path))
    for step, loss in enumerate([3.0, 2.0, 1.5]):
        log.log(step, loss=loss)
    log.log(2, accuracy=0.25)
    log.close()
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [float(r["loss"]) for r in rows if r["loss"]] == [3.0, 2.0, 1.5] and rows[-1]["accuracy"] == "0.25"
    (event_file,) = (tmp_path / "tb").iterdir()
    assert read_events(event_file) == [(0, "loss", 3.0), (1, "loss", 2.0), (2, "loss", 1.5), (2, "accuracy", 0.25)]
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
