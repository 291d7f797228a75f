"""Work across Nomad regions: dispatching parameterized jobs where there is room."""
