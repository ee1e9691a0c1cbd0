"""The `make run` demo: a control plane, an enrolled agent, and sample systems for it to reach."""
