"""Demo frontend process: calls the demo backend through IPCHandler and
prints the answers."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Sequence

from vyra_base_ipc import IPCError, IPCHandler
from vyra_base_ipc import backend_service_pb2 as backend_pb
from vyra_base_ipc import backend_service_pb2_grpc as backend_grpc
from vyra_base_ipc import module_service_pb2 as module_pb
from vyra_base_ipc import module_service_pb2_grpc as module_grpc


async def run(socket_path: str | None, module_name: str | None) -> None:
    async with IPCHandler(socket_path, backend_grpc.BackendServiceStub, module_name=module_name,
                          timeout=2.0) as backend, \
            IPCHandler(socket_path, module_grpc.ModuleServiceStub, module_name=module_name,
                       timeout=2.0) as module:
        print(f'connected to {backend.socket_path}')
        status = await backend.call_method('GetStatus', backend_pb.StatusRequest())
        print(f'BackendService.GetStatus -> status={status.status!r} '
              f'uptime_seconds={status.uptime_seconds:.3f}')
        processed = await backend.call_method('ProcessData', module_pb.DataRequest(data=b'hello vyra'))
        print(f'BackendService.ProcessData(b"hello vyra") -> {processed.result!r}')
        for name in ('ping', 'status', 'self_destruct'):
            answer = await module.call_method('ExecuteCommand', module_pb.CommandRequest(command=name))
            print(f'ModuleService.ExecuteCommand({name!r}) -> status_code={answer.status_code} '
                  f'result={answer.result!r}')
        data = await module.call_method('GetData', module_pb.DataRequest(key='status'))
        print(f'ModuleService.GetData("status") -> {json.loads(data.result)}')
        try:
            await module.call_method('GetData', module_pb.DataRequest(key='no_such_item'))
        except IPCError as error:
            print(f'ModuleService.GetData("no_such_item") -> {type(error).__name__}: {error}')


def main(args: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--socket-path')
    parser.add_argument('--module-name', default=None)
    options = parser.parse_args(args)
    module_name = options.module_name
    if options.socket_path is None and module_name is None:
        module_name = 'demo'
    try:
        asyncio.run(run(options.socket_path, module_name))
    except IPCError as error:
        print(f'IPC call failed: {error}')
        return 1
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
