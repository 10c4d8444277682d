"""Build script of the vyra_base_ipc ament_python package.

The Python code for ``protos/`` is generated here, at build time, with the
grpcio-tools of the environment doing the build (never committed): into the
build tree for ``colcon build`` / ``pip install .``, and into the source tree
for ``colcon build --symlink-install`` / ``pip install -e .`` (git-ignored).
"""

from glob import glob
import os
from pathlib import Path
import sys

from setuptools import find_namespace_packages, setup

package_name = 'vyra_base_ipc'
here = Path(__file__).resolve().parent
# The build helper is part of this package and needs only setuptools and
# grpcio-tools: import it from the source tree, before anything is built.
sys.path.insert(0, str(here))
from vyra_base_ipc_build import proto_cmdclass  # noqa: E402

# One version for the whole gRPC family: generated code and runtime must agree.
grpc_version = '1.85.1'


setup(
    name=package_name,
    version='0.1.0',
    packages=find_namespace_packages(
        include=['vyra_base_ipc', 'vyra_base_ipc.*', 'vyra_base', 'vyra_base.*', 'vyra_base_ipc_build',
                 'vyra_base_ipc_server', 'vyra_base_ipc_cli']),
    # py.typed: mypy reads the types of each package users import (for the
    # vyra_base namespace portion, in its own directory, as PEP 561 asks).
    package_data={package_name: ['py.typed'], 'vyra_base.com.handler': ['py.typed'],
                  'vyra_base_ipc_build': ['py.typed'], 'vyra_base_ipc_server': ['py.typed']},
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
    python_requires='>=3.11',
    cmdclass=proto_cmdclass('protos', ship_vyra_protos=True),
    entry_points={
        'console_scripts': [
            'ipc_server = vyra_base_ipc_server:main',
            'vyra-ipc = vyra_base_ipc_cli:main',
            'demo_module_node = vyra_base_ipc_server.demo_module_node:main',
            'demo_backend = vyra_base_ipc.demo.backend:main',
            'demo_frontend = vyra_base_ipc.demo.frontend:main',
        ],
        # `ros2 ipc <verb>` where ros2cli is installed (only ros2cli imports
        # vyra_base_ipc.cli.ros2.*; the package works without it).
        'ros2cli.command': [
            'ipc = vyra_base_ipc.cli.ros2.command:IpcCommand',
        ],
        'ros2cli.extension_point': [
            'ros2ipc.verb = vyra_base_ipc.cli.ros2.verb:VerbExtension',
        ],
        'ros2ipc.verb': [
            'list = vyra_base_ipc.cli.ros2.verb:ListVerb',
            'describe = vyra_base_ipc.cli.ros2.verb:DescribeVerb',
            'call = vyra_base_ipc.cli.ros2.verb:CallVerb',
            'health = vyra_base_ipc.cli.ros2.verb:HealthVerb',
            'ping = vyra_base_ipc.cli.ros2.verb:PingVerb',
            'stats = vyra_base_ipc.cli.ros2.verb:StatsVerb',
        ],
    },
)
