"""StartTask errors as Nomad's Go client reads them: a gRPC status whose first detail is a
hashicorp.nomad.plugins.shared.structs.RecoverableError when a retry may help."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from grpc_status import rpc_status

from nomad_driver.driver.service import abort
from nomad_driver.proto import driver_pb2, driver_pb2_grpc, structs_pb2


class Failing(driver_pb2_grpc.DriverServicer):  # type: ignore[misc]
    recoverable: bool | None = None

    def StartTask(self, request: Any, context: grpc.ServicerContext) -> Any:
        abort(context, grpc.StatusCode.FAILED_PRECONDITION, "no luck", self.recoverable)


@pytest.fixture
def stub() -> Iterator[tuple[Any, Failing]]:
    servicer = Failing()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    driver_pb2_grpc.add_DriverServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield driver_pb2_grpc.DriverStub(channel), servicer
    channel.close()
    server.stop(0)


def start(stub: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        stub.StartTask(driver_pb2.StartTaskRequest(), timeout=10)
    return err.value


def test_recoverable_error_travels_as_the_first_status_detail(stub: tuple[Any, Failing]) -> None:
    client, servicer = stub
    servicer.recoverable = True
    err = start(client)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    status = rpc_status.from_call(err)
    assert status is not None and status.message == "no luck"
    detail = status.details[0]
    assert detail.type_url == (
        "type.googleapis.com/hashicorp.nomad.plugins.shared.structs.RecoverableError"
    )
    unpacked = structs_pb2.RecoverableError()
    assert detail.Unpack(unpacked) and unpacked.recoverable


def test_plain_error_has_no_detail(stub: tuple[Any, Failing]) -> None:
    client, servicer = stub
    servicer.recoverable = None
    err = start(client)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.details() == "no luck"
    assert rpc_status.from_call(err) is None


def every_error_class() -> list[type[BaseException]]:
    import importlib
    import pkgutil

    import nomad_driver
    from nomad_driver.util.errors import PyhpcError

    for info in pkgutil.walk_packages(nomad_driver.__path__, "nomad_driver."):
        if ".proto." not in info.name and not info.name.endswith("__main__"):
            importlib.import_module(info.name)
    found: list[type[BaseException]] = []
    todo: list[type[BaseException]] = [PyhpcError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


def test_every_error_of_pyhpc_names_a_status_the_driver_can_send() -> None:
    from nomad_driver.driver.service import status_of

    classes = every_error_class()
    assert len(classes) > 25, classes  # the package's errors, not an empty walk
    for cls in classes:
        assert cls.grpc_status in grpc.StatusCode.__members__, cls  # type: ignore[attr-defined]
        code, _ = status_of(cls.__new__(cls))
        assert code.name == cls.grpc_status, cls  # type: ignore[attr-defined]


def test_the_table_gives_each_kind_its_status_and_retry() -> None:
    from nomad_driver.driver.service import status_of
    from nomad_driver.runtime.client import StartError
    from nomad_driver.runtime.security import PolicyError
    from nomad_driver.signing.vault import VaultError
    from nomad_driver.wire.schema import ConfigError

    S = grpc.StatusCode
    assert status_of(PolicyError("no")) == (S.PERMISSION_DENIED, None)
    assert status_of(ConfigError("task", ["bad"])) == (S.INVALID_ARGUMENT, None)
    assert status_of(StartError("slow node", recoverable=True)) == (S.FAILED_PRECONDITION, True)
    assert status_of(StartError("bad command")) == (S.FAILED_PRECONDITION, None)
    assert status_of(VaultError("down")) == (S.UNAVAILABLE, True)
    assert status_of(TimeoutError("pull")) == (S.DEADLINE_EXCEEDED, True)
    assert status_of(FileNotFoundError("gone")) == (S.FAILED_PRECONDITION, None)
    assert status_of(OSError(28, "full")) == (S.FAILED_PRECONDITION, True)
