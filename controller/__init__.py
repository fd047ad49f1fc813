"""Studios controller: REST API, agent gRPC endpoint, placement and reconciliation.

Entry point: `studio-controller` (`controller.cli:main`); the process is
assembled in `controller.app`.
"""
