"""The google.rpc.Status StatusService's "rich" hows end their calls with
(test/servers/status_service.py), for the servers and the tests that check it."""

from __future__ import annotations

from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

#: The trailer of a google.rpc.Status, as grpc_status.rpc_status sends it.
STATUS_DETAILS_KEY = 'grpc-status-details-bin'
RICH_MESSAGE = 'rich status'


def rich_status() -> status_pb2.Status:
    """The google.rpc.Status of the "rich" hows: INVALID_ARGUMENT with a
    BadRequest and an ErrorInfo, as grpc's richer error model carries them."""
    bad_request, error_info = any_pb2.Any(), any_pb2.Any()
    bad_request.Pack(error_details_pb2.BadRequest(field_violations=[
        error_details_pb2.BadRequest.FieldViolation(field='how', description='asked to fail')]))
    error_info.Pack(error_details_pb2.ErrorInfo(reason='ASKED', domain='vyra.ipc.test', metadata={'k': 'ü'}))
    return status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=RICH_MESSAGE,
                             details=[bad_request, error_info])

