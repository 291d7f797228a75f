"""The root of pyhpc's own errors. Each kind says how the driver answers Nomad with it: a gRPC
status (by name, so no layer below the driver needs gRPC) and whether Nomad's restart policy
may try again. The driver maps them in one place (driver/service.py: `status_of`)."""

from __future__ import annotations


class PyhpcError(Exception):
    """A failure pyhpc can name. grpc_status: the status the driver answers with;
    recoverable: True where a retry may help, None where nothing is claimed."""

    grpc_status = "FAILED_PRECONDITION"
    recoverable: bool | None = None


class InvalidArgument(PyhpcError):
    """What was asked is malformed: a retry of the same request fails the same way."""

    grpc_status = "INVALID_ARGUMENT"


class Refused(PyhpcError):
    """What was asked is well-formed and not allowed (policy, signatures, access)."""

    grpc_status = "PERMISSION_DENIED"


class Unavailable(PyhpcError):
    """A service pyhpc needs (Vault, a registry) did not answer: a retry may."""

    grpc_status = "UNAVAILABLE"
    recoverable = True
