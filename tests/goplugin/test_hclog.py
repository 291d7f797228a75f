import io
import json
import logging
from pathlib import Path

from nomad_driver.goplugin.hclog import HclogHandler, format_record


class BrokenStream(io.StringIO):
    def write(self, s: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


def record(message: str, level: int = logging.INFO) -> logging.LogRecord:
    return logging.LogRecord("pyhpc.test", level, __file__, 1, message, None, None)


def test_record_has_string_level_message_and_microsecond_timestamp() -> None:
    line = json.loads(format_record(record("hello 5", logging.WARNING)))
    assert line["@level"] == "warn" and line["@message"] == "hello 5"
    assert line["@timestamp"].endswith("+00:00") and len(line["@timestamp"].split(".")[1]) == 12


def test_broken_stderr_falls_back_to_the_log_file(tmp_path: Path) -> None:
    fallback = tmp_path / "logs" / "plugin.log"
    handler = HclogHandler(BrokenStream(), str(fallback))
    handler.emit(record("after the agent restarted"))
    handler.emit(record("still logging"))
    lines = [json.loads(x)["@message"] for x in fallback.read_text().splitlines()]
    assert lines == ["after the agent restarted", "still logging"]
