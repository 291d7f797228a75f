"""The Nomad device plugin for NVIDIA GPUs (NVML), served by the same package as the driver."""
