"""Decision support as a service: the HTTP API, the page, the audit log and CDS Hooks.

The service sits on top of the library: every recommendation it serves is the one
`dosewise.api` gives for the same run and input, and every request is audited.
"""
