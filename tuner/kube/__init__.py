"""Kubernetes: the rendered Job (GPU types, memory fit, precision per type) and the API calls of
`tuner submit`, `status`, `logs` and `cancel`."""
