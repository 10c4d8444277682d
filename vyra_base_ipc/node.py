"""The IPC server the ROS 2 way: configured by node parameters.

- :class:`IPCServerNode` and :func:`main`: the ``ipc_server`` executable, a
  node that serves a module's IPC socket beside the module's own node.
- :func:`host_ipc_server` / :class:`IPCServerHost`: the same server hosted
  inside a module's own node, reading the same parameters from it.

Either way the :class:`~vyra_base_ipc.server.IPCServer` runs on a dedicated
asyncio :class:`~vyra_base_ipc._loop_thread.EventLoopThread`: IPC handlers never
run on the rclpy executor and ROS callbacks never wait for the event loop, so
neither can block the other. IPC handlers call ROS services with
:class:`vyra_base_ipc.ros_bridge.ServiceCaller`.

Parameters (declared with a description, checked and documented in
:mod:`vyra_base_ipc._node_parameters`, whose names this module re-exports):
``module_name``, ``socket_path``, ``ttrpc_enabled``, ``ttrpc_socket_path``,
``shared_memory_enabled``, ``shared_memory_threshold``, ``busy_poll_us``,
``keep_freed_memory_mb``, ``servicers``, ``grace_period``, ``max_message_bytes``,
``maximum_concurrent_rpcs``, ``diagnostics_period``.

The server's status goes to ``/diagnostics`` every ``diagnostics_period``
seconds (see :mod:`vyra_base_ipc._diagnostics`).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import sys
import threading
from typing import Any, Iterable, Sequence

from rcl_interfaces.msg import SetParametersResult
import rclpy
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.impl.implementation_singleton import rclpy_implementation
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.signals import SignalHandlerOptions

from ._allocator import keep_freed_memory
from ._diagnostics import IPCDiagnostics
from ._limits import ServerLimits, raise_descriptor_limit
from ._loop_thread import EventLoopThread
from ._node_parameters import (
    DECLARED_PARAMETERS,
    PARAMETERS,
    IPCServerConfig,
    ParameterSpec,
    declare_ipc_parameters,
    load_servicer,
    parameter_value,
    read_ipc_config,
)
from ._node_run import (
    EXIT_BAD_PARAMETER,
    EXIT_SERVER_FAILED,
    STOP_LOG_FORMAT,
    exit_now_if_handlers_remain,
    run_node,
    shutdown_node,
    spin_until_shutdown,
)
from ._options import DEFAULT_GRACE_PERIOD, MAX_SECONDS
from ._ros_logging import logging_through_node
from ._stop_signals import StopSignals
from .address import validate_module_name
from .exceptions import ParameterError
from .module_service import ModuleService
from .module_service_pb2_grpc import ModuleServiceServicer
from .server import IPCServer

__all__ = [
    'DECLARED_PARAMETERS',
    'EXIT_BAD_PARAMETER',
    'EXIT_SERVER_FAILED',
    'IPCServerConfig',
    'IPCServerHost',
    'IPCServerNode',
    'PARAMETERS',
    'ParameterError',
    'ParameterSpec',
    'StopSignals',
    'declare_ipc_parameters',
    'host_ipc_server',
    'load_servicer',
    'main',
    'read_ipc_config',
    'run_node',
    'shutdown_node',
    'spin_until_shutdown',
]

_logger = logging.getLogger(__name__)

_RCLError = rclpy_implementation.RCLError
_InvalidHandle = rclpy_implementation.InvalidHandle

#: How long stopping may take beyond the grace period before the host gives
#: up waiting: IPCServer.stop() itself waits up to 1 s past the grace for
#: cancelled handlers (``def`` ones too) and connections, then the loop thread ends.
_STOP_MARGIN = 1.5

# -- hosting ------------------------------------------------------------------------


class IPCServerHost:
    """An :class:`IPCServer` hosted in a node's process, configured by that
    node's parameters.

    The constructor declares :data:`PARAMETERS` on ``node``; :meth:`start`
    reads them, imports the ``servicers``, and starts the server on a
    dedicated event-loop thread; :meth:`close` stops it (with the grace
    period) and ends that thread. Call :meth:`close` from the node's
    ``destroy_node()`` or a ``finally``; it works after ``rclpy.shutdown()``
    too and logs through :mod:`logging`, not the node (rosout may be gone).

    Thread affinity: :meth:`start`, :meth:`stop` and :meth:`close` block the
    calling thread and must not be called on the loop thread (e.g. from an IPC
    handler). Async handlers run on :attr:`loop_thread`, plain ``def``
    handlers on the server's worker threads; rclpy callbacks on whatever the
    node's executor uses. A ROS callback may hand work to the IPC loop with
    ``loop_thread.submit()``; it must not *wait* for work that itself calls a
    ROS service of a node spun by the same single-threaded executor (the
    response could never be delivered).

    The module's name is the ``module_name`` parameter: the launch argument
    ``module_name:=<name>``, ``--ros-args -p module_name:=<name>`` or a
    parameter file; else ``VYRA_MODULE_NAME`` or ``MODULE_NAME`` from the
    environment; else the ``module_name`` given here; else :meth:`start`
    raises :class:`ParameterError` saying all this.

    :param node: the hosting node.
    :param servicers: servicers created in code, served besides those named by
        the ``servicers`` parameter (servicer objects or ``(servicer,
        add_function)`` pairs, as for :class:`IPCServer`).
    :param module_name: the module's name when neither the parameter nor the
        environment gives one (``None`` or ``''``: none, as for :class:`IPCServer`).
    :raises TypeError, ValueError: ``module_name`` is not a valid module name.
    """

    def __init__(self, node: Node, servicers: Iterable[Any] = (), *, module_name: str | None = None) -> None:
        module_name = module_name or ''  # (None was rclpy's "type PARAMETER_NOT_SET", naming nothing)
        if module_name:
            validate_module_name(module_name)
        self.node = node
        self._given = list(servicers)
        self._declare_error: ParameterError | None = None
        try:
            declare_ipc_parameters(node, module_name=module_name)
        except ParameterError as error:
            self._declare_error = error
        self._grace_period = DEFAULT_GRACE_PERIOD
        grace = parameter_value(node, 'grace_period')
        if isinstance(grace, float):
            self._grace_period = grace
        node.add_on_set_parameters_callback(self._check_parameters)
        # Taken once the change is made: another check (the hosting node's
        # own) may still refuse the whole set after this one accepted it.
        node.add_post_set_parameters_callback(self._parameters_set)
        self.loop_thread = EventLoopThread(name=f'ipc-{node.get_name()}', on_failure=self._loop_ended)
        self.config: IPCServerConfig | None = None
        self.server: IPCServer | None = None
        #: The publisher of the server's status on /diagnostics, once started
        #: (``None`` with ``diagnostics_period`` 0).
        self.diagnostics: IPCDiagnostics | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._stopped = False

    @property
    def grace_period(self) -> float:
        """The current ``grace_period`` parameter."""
        return self._grace_period

    def start(self) -> IPCServer:
        """Read the parameters, import the servicers and start serving.

        Returns once the socket is published.

        :raises ParameterError: a parameter is unusable, including a
            ``socket_path`` the server cannot bind (in use by a live server,
            directory not writable, ...); nothing is left running. Any other
            exception (e.g. ``KeyboardInterrupt``) also leaves nothing running;
            a server already serving is stopped with the grace period. A
            signal that shuts ROS down while starting is no error: the server
            serves (without /diagnostics) until :meth:`close`.
        :raises RuntimeError: if called twice or after :meth:`close`.
        """
        with self._lock:
            if self._closed or self.server is not None:
                raise RuntimeError('IPCServerHost.start() called twice or after close()')
            if self._declare_error is not None:
                raise self._declare_error
            config = self.config = read_ipc_config(self.node)
            servicers = [*(load_servicer(spec) for spec in config.servicers), *self._given]
            for servicer in servicers:
                attach = getattr(servicer, 'attach_ipc_host', None)
                if callable(attach):
                    attach(self)
            if not any(isinstance(s, ModuleServiceServicer) for s in servicers):
                servicers.insert(0, ModuleService(config.module_name))
            try:
                server = IPCServer(config.socket_path, servicers=servicers,
                                   grace_period=config.grace_period,
                                   max_message_bytes=config.max_message_bytes,
                                   ttrpc=config.ttrpc_socket_path is not None,
                                   ttrpc_socket_path=config.ttrpc_socket_path,
                                   shared_memory=config.shared_memory,
                                   maximum_concurrent_rpcs=config.maximum_concurrent_rpcs)
            except (TypeError, ValueError) as error:
                raise ParameterError('servicers', str(error)) from None
            # The host says when it serves and stops, through its node, once.
            server._announce = False
            if config.keep_freed_memory:
                self._keep_freed_memory(config.keep_freed_memory)
            self.loop_thread.busy_poll = config.busy_poll
            self.loop_thread.start()
            try:
                # Set first: from the moment its socket may exist, close() can stop it.
                self.server = server
                self.loop_thread.run(server.start())
            except OSError as error:
                self.server = None
                self.loop_thread.stop()
                fast = config.ttrpc_socket_path is not None and \
                    error.filename == str(config.ttrpc_socket_path)
                path = config.ttrpc_socket_path if fast else config.socket_path
                raise ParameterError('ttrpc_socket_path' if fast else 'socket_path',
                                     f'cannot serve on {str(path)!r}: {error}') from None
            except BaseException:
                self.server = None
                self._stop_server(server, 0.0)
                self.loop_thread.stop()
                raise
            try:
                if config.diagnostics_period > 0:
                    try:
                        self.diagnostics = IPCDiagnostics(
                            self.node, lambda: self.server, config.diagnostics_period, config.module_name,
                            failure=lambda: self.loop_thread.failure, loop=self._running_loop)
                    except (_RCLError, _InvalidHandle):
                        if self.node.context.ok():
                            raise
                        # ROS shut down (a signal) while the server started: no publishing.
            except BaseException:
                # Interrupted here (KeyboardInterrupt), or no publisher while ROS runs:
                # stop rather than leave a server that nobody may stop; calls may be
                # in flight already, so with the grace period.
                self.server = None
                self._stop_server(server, self._grace_period)
                self.loop_thread.stop()
                raise
        message = (f'IPC server of module {config.module_name!r} (node '
                   f'{self.node.get_fully_qualified_name()}) serving '
                   f'{", ".join(server.service_names)} on {config.socket_path}'
                   + (f' (fast lane: {config.ttrpc_socket_path})' if config.ttrpc_socket_path else ''))
        self._log(message)
        return server

    def stop(self, grace: float | None = None) -> None:
        """Stop the server: health NOT_SERVING, ``grace`` seconds (default: the
        ``grace_period`` parameter) for in-flight calls, socket file removed.

        Blocks at most ``grace`` + 1.5 s. Idempotent; a no-op if never started.
        """
        server = self.server
        if server is None or self._stopped:
            return
        self._stopped = True
        grace = self._grace_period if grace is None else grace
        diagnostics = self.diagnostics
        if diagnostics is not None:  # (ERROR at once: the grace period may be long)
            diagnostics.stopping(grace)
        try:
            self._stop_server(server, grace)
        finally:
            if diagnostics is not None:
                diagnostics.stopping(None)
        _logger.info('IPC server on %s stopped', server.socket_path)

    def close(self, grace: float | None = None) -> None:
        """:meth:`stop`, then end the event-loop thread. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.stop(grace)
        if self.diagnostics is not None:
            self.diagnostics.close()  # says ERROR once more, where ROS still runs
        self.loop_thread.stop(timeout=_STOP_MARGIN)

    def __enter__(self) -> 'IPCServerHost':
        if self.server is None:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _keep_freed_memory(self, limit: int) -> None:
        if keep_freed_memory(limit):
            self._log(f'keeping up to {limit >> 20} MiB of freed memory for large messages '
                      '(keep_freed_memory_mb)')
        else:
            self._log('keep_freed_memory_mb: not applied, the C library is not glibc')

    def _log(self, message: str) -> None:
        # Through the node (rosout, the ROS console format) while ROS runs;
        # after rclpy.shutdown() through logging.
        if self.node.context.ok():
            self.node.get_logger().info(message)
        else:
            _logger.info('%s', message)

    def _stop_server(self, server: IPCServer, grace: float) -> None:
        # Through logging, not the node: stopping runs while a signal may be
        # shutting ROS down on another thread, and rcl's logger then crashed
        # a hosting node (SIGSEGV seen in CI).
        _logger.info('stopping IPC server on %s (grace %.3g s)', server.socket_path, grace)
        try:  # (a second Ctrl-C, under rclpy's signal handlers a KeyboardInterrupt, waited through)
            self.loop_thread.run(server.stop(grace), timeout=grace + _STOP_MARGIN, interruptible=False)
            return
        except TimeoutError:
            _logger.warning('IPC server on %s did not stop within %.3g s', server.socket_path,
                            grace + _STOP_MARGIN)
            return
        except RuntimeError as error:
            if self.loop_thread.is_running:  # (not the loop's end: called on the loop thread)
                _logger.warning('IPC server on %s could not be stopped: %s', server.socket_path, error)
                return
        # Its loop ended (an exception escaped it): stop() cannot run, but the
        # socket files must still go. Ended thread joined first: nothing else
        # touches the server then.
        _logger.warning('IPC server on %s: its event loop ended; removing its socket files without '
                        'a graceful stop', server.socket_path)
        self.loop_thread.stop(timeout=_STOP_MARGIN)
        try:
            server.abandon()
        except RuntimeError as error:  # the loop's thread did not end in time
            _logger.warning('IPC server on %s could not be stopped: %s', server.socket_path, error)

    def _running_loop(self) -> asyncio.AbstractEventLoop | None:
        """The server's event loop while it runs, else ``None``."""
        try:
            return self.loop_thread.loop
        except RuntimeError:
            return None

    def _loop_ended(self, failure: BaseException) -> None:
        """(On the loop's thread, once the loop ended under the server) Remove
        its socket files at once: a hosting node lives on, and clients would
        otherwise find a socket nobody answers until close()."""
        server = self.server
        if server is not None:
            _logger.warning('IPC server on %s: its event loop ended (%r); removing its socket files',
                            server.socket_path, failure)
            server.abandon()

    def _check_parameters(self, parameters: list[Parameter[Any]]) -> SetParametersResult:
        for parameter in parameters:
            if parameter.name != 'grace_period':
                continue
            value = parameter.value
            if not isinstance(value, float) or not 0 <= value <= MAX_SECONDS:
                return SetParametersResult(
                    successful=False, reason=f'grace_period must be a finite number of seconds >= 0 '
                                             f'and at most {MAX_SECONDS:g}, not {value!r}')
        return SetParametersResult(successful=True)

    def _parameters_set(self, parameters: list[Parameter[Any]]) -> None:
        for parameter in parameters:
            if parameter.name == 'grace_period':
                self._grace_period = parameter.value


def host_ipc_server(node: Node, servicers: Iterable[Any] = (), *,
                    module_name: str | None = None) -> IPCServerHost:
    """Serve the module's IPC socket from inside ``node``'s process: declare the
    IPC server parameters on ``node``, read them, and start the server on its
    own event-loop thread (``IPCServerHost(node, servicers,
    module_name=module_name)``, then :meth:`~IPCServerHost.start`). Close the
    returned host in ``destroy_node()``.

    For example::

        class MyModuleNode(Node):
            def __init__(self) -> None:
                super().__init__('my_module')
                self.ipc = host_ipc_server(self, [MyBackendService()], module_name='my_module')

            def destroy_node(self) -> None:
                if hasattr(self, 'ipc'):
                    self.ipc.close()
                super().destroy_node()

    If this raises, ``self.ipc`` is never set, yet ``rclpy.shutdown()`` still
    calls the node's ``destroy_node()`` (rclpy's context destroys every node
    it created, even one whose ``__init__`` raised). The README's pattern
    avoids the check: create the :class:`IPCServerHost` first (which starts
    nothing), then call ``start()`` on it.

    :raises ParameterError: as :meth:`IPCServerHost.start`, e.g. no module name
        (see :class:`IPCServerHost` for where it comes from).
    :raises TypeError, ValueError: ``module_name`` is not a valid module name.
    """
    host = IPCServerHost(node, servicers, module_name=module_name)
    try:
        host.start()
    except BaseException:
        host.close()
        raise
    return host


# -- the ipc_server executable -----------------------------------------------------


class IPCServerNode(Node):
    """The ``ipc_server`` node: nothing but a module's IPC server.

    Declares :data:`PARAMETERS` on construction (a wrong parameter type is
    reported by :meth:`start`); :meth:`start` starts serving;
    ``destroy_node()`` stops the server with the grace period.

    :param node_name: default node name (``-r __node:=...`` overrides it).
    :param servicers: servicers created in code, besides the ``servicers``
        parameter.
    """

    def __init__(self, node_name: str = 'ipc_server', *, servicers: Iterable[Any] = (),
                 **kwargs: Any) -> None:
        super().__init__(node_name, **kwargs)
        self.host = IPCServerHost(self, servicers)

    def start(self) -> IPCServer:
        """:raises ParameterError: as :meth:`IPCServerHost.start`."""
        return self.host.start()

    def destroy_node(self) -> None:
        """Close the IPC server host (:meth:`IPCServerHost.close`), then destroy the node."""
        self.host.close()
        super().destroy_node()


def main(args: Sequence[str] | None = None, *, received: list[str] | None = None) -> int:
    """Run ``ipc_server`` until SIGINT, SIGTERM, SIGHUP or ROS shutdown.

    Then stops the server within the grace period, removes its socket and
    returns 0; further signals meanwhile are logged and ignored, and once it
    returns they are ignored. An unusable parameter is logged, naming the
    parameter, and gives :data:`EXIT_BAD_PARAMETER`; a server whose event
    loop ended under it (see :attr:`EventLoopThread.failure`) is logged as
    fatal and gives :data:`EXIT_SERVER_FAILED`.

    A process's entry point: it installs SIGINT/SIGTERM/SIGHUP handlers for
    the rest of the process's life, instead of rclpy's.

    :param received: the list into which the caller's own handlers noted the
        stop signals that came before this ran (the ``ipc_server`` entry
        point, :mod:`vyra_base_ipc_server`, takes them while this package
        imports); with any in it, returns 0 at once. It goes on filling up.
    """
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format=STOP_LOG_FORMAT)
    stop_signals = StopSignals(received)
    stop_signals.install()
    if stop_signals.received:
        _logger.info('%s received while starting: exiting', ', '.join(stop_signals.received))
        stop_signals.ignore()
        return 0
    # A process of its own: its open-file limit fits what peers may make the
    # server hold (the soft limit is often 1,024), as far as the hard one allows.
    before = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    now = raise_descriptor_limit(ServerLimits().descriptors_needed(lanes=2))
    if now != before:
        _logger.info('open-file limit (RLIMIT_NOFILE) raised from %d to %d for the IPC server', before, now)
    try:
        # The stop signals are this process's own (no rclpy handlers, which
        # would shut ROS down first): the server stops, says ERROR on
        # /diagnostics while ROS still runs, and only then ROS shuts down.
        rclpy.init(args=None if args is None else list(args), signal_handler_options=SignalHandlerOptions.NO)
    except _RCLError as error:
        # rcl rejects malformed -p values, and parameter files it cannot read or
        # parse, before any node exists; quoting helps only the former.
        hint = '' if 'params file' in str(error) else \
            '; values containing ":" need YAML quotes, e.g. -p "servicers:=[\'package.module:ClassName\']"'
        _logger.error('cannot parse the ROS arguments (%s)%s', error, hint)
        return EXIT_BAD_PARAMETER
    if stop_signals.received:  # during start-up: no node to make
        rclpy.try_shutdown()
    node: IPCServerNode | None = None
    executor: SingleThreadedExecutor | None = None
    status = 0
    try:
        # Made before serving: a signal arriving from here on only ends spin().
        executor = SingleThreadedExecutor()
        node = IPCServerNode()
        executor.add_node(node)
        # Logging on the console in ROS's format, on /rosout and at the node's
        # --log-level while ROS runs; through logging to stderr as it stops.
        with logging_through_node(node):
            node.start()
            loop_thread = node.host.loop_thread
            spin_until_shutdown(executor,
                                alive=lambda: loop_thread.failure is None and stop_signals.running())
            if loop_thread.failure is not None:
                # Exit, so that a launch file's respawn (or the supervisor) starts it anew.
                node.get_logger().fatal(
                    f"the IPC server's event loop ended ({loop_thread.failure!r}): exiting")
                status = EXIT_SERVER_FAILED
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except ParameterError as error:
        if node is not None:
            node.get_logger().error(str(error))
        else:
            _logger.error('%s', error)
        status = EXIT_BAD_PARAMETER
    except _RCLError:
        if rclpy.ok():
            raise
        # SIGINT/SIGTERM arrived while the node was being created.
    finally:
        shutdown_node(executor, node)
        _logger.info('ipc_server stopped')
    # A late signal must not kill the exiting process.
    stop_signals.ignore()
    exit_now_if_handlers_remain(status)
    return status


if __name__ == '__main__':
    raise SystemExit(main())
