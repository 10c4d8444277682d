"""Build script of the vyra_base_ipc ament_python package.

The Python code for ``protos/`` is generated here, at build time, with the
grpcio-tools of the environment doing the build (never committed): into the
build tree for ``colcon build`` / ``pip install .``, and into the source tree
for ``colcon build --symlink-install`` / ``pip install -e .`` (git-ignored).
"""

from glob import glob
import os
from pathlib import Path

from setuptools import Command, find_namespace_packages, setup
from setuptools.command.build_py import build_py
from setuptools.command.develop import develop

package_name = 'vyra_base_ipc'
here = Path(__file__).resolve().parent
proto_root = here / 'protos'

# One version for the whole gRPC family: generated code and runtime must agree.
grpc_version = '1.85.1'


def generate_protos(output_dir: Path) -> None:
    """Compile every .proto under ``protos/`` into ``output_dir``."""
    import grpc_tools
    from grpc_tools import protoc  # a build requirement (pyproject.toml)

    protos = sorted(str(p.relative_to(proto_root)) for p in proto_root.rglob('*.proto'))
    well_known = Path(grpc_tools.__file__).parent / '_proto'
    output_dir.mkdir(parents=True, exist_ok=True)
    status = protoc.main([
        'grpc_tools.protoc',
        f'--proto_path={proto_root}',
        f'--proto_path={well_known}',
        f'--python_out={output_dir}',
        f'--pyi_out={output_dir}',
        f'--grpc_python_out={output_dir}',
        *protos,
    ])
    if status != 0:
        raise RuntimeError(f'protoc failed with status {status} on {protos}')


class GenerateProtos(Command):
    """``setup.py generate_protos``: generate into the source tree."""

    description = 'generate Python code for protos/ into the source tree'
    user_options: list = []

    def initialize_options(self) -> None:
        """No options."""

    def finalize_options(self) -> None:
        """No options."""

    def run(self) -> None:
        """Generate into the source tree."""
        generate_protos(here)


class BuildPyWithProtos(build_py):
    """``build_py`` that also generates the protobuf code: into the build
    tree, or into the source tree for an editable install."""

    def run(self) -> None:
        """Build the package, then generate its protobuf code."""
        super().run()
        if not self.editable_mode:
            generate_protos(Path(self.build_lib))
        else:
            generate_protos(here)


class DevelopWithProtos(develop):
    """``develop`` that generates the protobuf code into the source tree first."""

    def run(self) -> None:
        """Generate into the source tree, then install for development."""
        generate_protos(here)
        super().run()


setup(
    name=package_name,
    version='0.1.0',
    packages=find_namespace_packages(
        include=['vyra_base_ipc', 'vyra_base_ipc.*', 'vyra_base', 'vyra_base.*']),
    package_data={package_name: ['py.typed']},
    data_files=[
        ('share/ament_index/resource_index/packages', [f'resource/{package_name}']),
        (f'share/{package_name}', ['package.xml']),
        (f'share/{package_name}/launch', glob('launch/*.launch.py')),
        (f'share/{package_name}/config', glob('config/*.yaml')),
        *[
            (f'share/{package_name}/protos/{os.path.relpath(d, "protos")}',
             glob(os.path.join(d, '*.proto')))
            for d in sorted({os.path.dirname(p) for p in glob('protos/**/*.proto', recursive=True)})
        ],
    ],
    install_requires=[
        'setuptools',
        f'grpcio=={grpc_version}',
        f'grpcio-health-checking=={grpc_version}',
        f'grpcio-reflection=={grpc_version}',
        'protobuf>=6.31.1',
        'PyYAML>=6',
    ],
    extras_require={
        'test': [
            'pytest>=8',
            'pytest-asyncio>=1.0',
            'pytest-timeout>=2.3',
        ],
    },
    zip_safe=False,
    maintainer='VYRA developers',
    maintainer_email='dev@vyra.invalid',
    description='gRPC over Unix domain sockets inside a VYRA module',
    license='Apache-2.0',
    python_requires='>=3.10',
    cmdclass={
        'build_py': BuildPyWithProtos,
        'develop': DevelopWithProtos,
        'generate_protos': GenerateProtos,
    },
    entry_points={
        'console_scripts': [
            'ipc_server = vyra_base_ipc.node:main',
            'demo_module_node = vyra_base_ipc.demo.module_node:main',
            'demo_backend = vyra_base_ipc.demo.backend:main',
            'demo_frontend = vyra_base_ipc.demo.frontend:main',
        ],
    },
)
