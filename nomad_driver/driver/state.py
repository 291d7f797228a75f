"""What a task's TaskHandle.driver_state holds: everything RecoverTask needs, written once."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import msgpack

from nomad_driver.util.errors import InvalidArgument

FORMAT = "pyhpc/1"


class StateError(InvalidArgument, ValueError):
    """driver_state bytes that this plugin cannot use."""


@dataclass(frozen=True)
class DriverState:
    run_dir: str
    supervisor_pid: int
    init_pid: int
    started_at: float

    def encode(self) -> bytes:
        return bytes(msgpack.packb({"format": FORMAT, **asdict(self)}, use_bin_type=True))

    @classmethod
    def decode(cls, data: bytes) -> DriverState:
        try:
            raw = msgpack.unpackb(data, raw=False)
        except Exception as err:  # noqa: BLE001 - any garbage is the same error to the caller
            raise StateError(f"driver_state is not msgpack: {err}") from err
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
            raise StateError(f"driver_state has format {found!r}, this plugin reads {FORMAT!r}")
        try:
            return cls(
                run_dir=str(raw["run_dir"]),
                supervisor_pid=int(raw["supervisor_pid"]),
                init_pid=int(raw["init_pid"]),
                started_at=float(raw["started_at"]),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise StateError(f"driver_state is missing or has a bad field: {err}") from err
