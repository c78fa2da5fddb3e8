"""HTTP plumbing every controller shares: route options, the audit context of a request, the OpenAPI
error declarations.

It sits below every feature package (it imports only :mod:`appliance.errors`, the audit context type
and Litestar), so controllers use it without reaching up into :mod:`appliance.server`, which wires
the app together and is imported by nothing.
"""
