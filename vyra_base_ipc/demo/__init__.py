"""The demo module: a backend serving BackendService and ModuleService, and a
frontend calling it through IPCHandler."""
