"""Compile the benchmark's proto at run time, into a directory of the caller's
choosing, so that no generated code lives in the source tree."""

from __future__ import annotations

from pathlib import Path

__all__ = ['PROTO_ROOT', 'compile_bench_protos']

PROTO_ROOT = Path(__file__).resolve().parent / 'protos'
#: The package's own protos (the benchmark's messages use vyra.ipc.SharedBufferRef).
PACKAGE_PROTOS = Path(__file__).resolve().parent.parent / 'protos'


def compile_bench_protos(output: Path) -> Path:
    """Generate ``vyra_bench/bench_pb2*.py`` under ``output`` and return ``output``.

    ``output`` must then be on ``sys.path`` (or ``PYTHONPATH`` of a child) for
    ``import vyra_bench.bench_pb2`` to work.

    :raises RuntimeError: if protoc fails.
    """
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / '_proto'
    protos = sorted(str(path.relative_to(PROTO_ROOT)) for path in PROTO_ROOT.rglob('*.proto'))
    output.mkdir(parents=True, exist_ok=True)
    status = protoc.main(['grpc_tools.protoc', f'--proto_path={PROTO_ROOT}',
                          f'--proto_path={PACKAGE_PROTOS}', f'--proto_path={well_known}',
                          f'--python_out={output}', f'--grpc_python_out={output}', *protos])
    if status != 0:
        raise RuntimeError(f'protoc failed with status {status} on {protos}')
    return output
