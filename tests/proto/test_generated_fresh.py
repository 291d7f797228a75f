"""The committed protobuf modules must be what the .proto files generate today."""

from pathlib import Path

from nomad_driver.proto import generate


def test_generated_modules_match_the_proto_files(tmp_path: Path) -> None:
    fresh = generate.generate(tmp_path)
    assert fresh, "protoc produced nothing"
    for path in fresh:
        committed = generate.PROTO_DIR / path.name
        assert committed.exists(), (
            f"{path.name} is not committed; run python -m nomad_driver.proto.generate"
        )
        assert committed.read_text() == path.read_text(), (
            f"{path.name} is stale; run python -m nomad_driver.proto.generate"
        )


def test_wire_names_match_nomad() -> None:
    from nomad_driver.proto import base_pb2, device_pb2, driver_pb2, structs_pb2

    assert driver_pb2.DESCRIPTOR.services_by_name["Driver"].full_name == (
        "hashicorp.nomad.plugins.drivers.proto.Driver"
    )
    assert base_pb2.DESCRIPTOR.services_by_name["BasePlugin"].full_name == (
        "hashicorp.nomad.plugins.base.proto.BasePlugin"
    )
    assert device_pb2.DESCRIPTOR.services_by_name["DevicePlugin"].full_name == (
        "hashicorp.nomad.plugins.device.DevicePlugin"
    )
    assert structs_pb2.RecoverableError.DESCRIPTOR.full_name == (
        "hashicorp.nomad.plugins.shared.structs.RecoverableError"
    )
    fields = driver_pb2.LinuxResources.DESCRIPTOR.fields_by_name
    assert fields["PercentTicks"].number == 8 and fields["cpuset_cgroup"].number == 9
    mem = driver_pb2.MemoryUsage.DESCRIPTOR.fields_by_name
    assert (mem["measured_fields"].number, mem["usage"].number, mem["swap"].number) == (6, 7, 8)
    assert driver_pb2.TaskConfig.DESCRIPTOR.fields_by_name["parent_job_id"].number == 22
    assert base_pb2.DRIVER == 2 and base_pb2.DEVICE == 3
